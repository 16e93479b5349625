"""Startup, readiness and liveness probes (httpGet, tcpSocket, exec), with the
kubelet's thresholds: a probe result flips only after successThreshold successes or
failureThreshold failures in a row."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any


def resolve_port(port: Any, container: Any) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.ports or []:
        if p.name == port:
            return p.container_port
    raise ValueError(f"container {container.name} has no port named {port!r}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect answer counts as success, as in the kubelet
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def run_probe(probe: Any, container: Any, pod_ip: str, env: dict[str, str]) -> tuple[bool, str]:
    """One probe attempt: (success, message)."""
    timeout = probe.timeout_seconds or 1
    try:
        if probe.http_get is not None:
            h = probe.http_get
            host = h.host or pod_ip
            scheme = (h.scheme or "HTTP").lower()
            url = f"{scheme}://{host}:{resolve_port(h.port, container)}{h.path or '/'}"
            req = urllib.request.Request(url, headers={x.name: x.value for x in h.http_headers or []})
            try:
                with _opener.open(req, timeout=timeout) as resp:
                    code = resp.status
            except urllib.error.HTTPError as e:
                code = e.code
            return (200 <= code < 400), f"HTTP probe {url} returned {code}"
        if probe.tcp_socket is not None:
            port = resolve_port(probe.tcp_socket.port, container)
            with socket.create_connection((probe.tcp_socket.host or pod_ip, port), timeout=timeout):
                return True, "tcp ok"
        if probe.exec is not None:
            rc = subprocess.run(probe.exec.command, env=env, timeout=timeout, capture_output=True).returncode
            return rc == 0, f"exec probe exited {rc}"
        if probe.grpc is not None:
            return False, "grpc probes are not supported by the podlet"
    except Exception as e:  # connection refused, timeout, ...: a failed probe
        return False, f"probe failed: {e}"
    return False, "probe has no handler"


@dataclass
class ProbeState:
    """Tracks one probe of one running container."""

    probe: Any
    started_at: float = field(default_factory=time.monotonic)
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0
    result: bool | None = None  # None until the first decisive result
    last_message: str = ""

    def __post_init__(self) -> None:
        self.next_at = self.started_at + (self.probe.initial_delay_seconds or 0)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, message: str, now: float) -> bool | None:
        """Feed one attempt; returns the (possibly changed) decisive result."""
        self.next_at = now + (self.probe.period_seconds or 10)
        self.last_message = message
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= (self.probe.success_threshold or 1):
                self.result = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= (self.probe.failure_threshold or 3):
                self.result = False
        return self.result
