"""Prometheus' Kubernetes pod discovery for the dev cluster, as a file_sd feed.

A Prometheus in a cluster finds pods with `kubernetes_sd_configs` (role pod) and keeps the
ones annotated `prometheus.io/scrape: "true"`. Debian's Prometheus package is built without
the Kubernetes discovery (its client libraries are not packaged: "field
kubernetes_sd_configs not found"), so this watcher does that part: it lists and watches the
cluster's pods through the API server, as the read-only `fleetward:prometheus` user, and
writes the annotated ones as file_sd target groups, which Prometheus re-reads on its own.
The targets and labels are what the usual relabelling gives (the community chart's
`kubernetes-pods` job): address `<pod IP>:<prometheus.io/port>`, path from
`prometheus.io/path`, labels `namespace`, `pod` and `app` (app.kubernetes.io/name).

Left out: pods not Running, and pods that only kwok simulates (their addresses lead
nowhere; a scale bench has a thousand of them).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

log = logging.getLogger("fleetward.devcluster")

SCRAPE = "prometheus.io/scrape"
PORT = "prometheus.io/port"
PATH = "prometheus.io/path"


def target_group(pod: client.V1Pod, skip_network: ipaddress.IPv4Network | None) -> dict[str, Any] | None:
    """The file_sd target group of one pod, or None when it is not to be scraped."""
    meta, status = pod.metadata, pod.status
    annotations = meta.annotations or {}
    if annotations.get(SCRAPE) != "true" or status is None or status.phase != "Running" or not status.pod_ip:
        return None
    if skip_network is not None and ipaddress.ip_address(status.pod_ip) in skip_network:
        return None
    port = annotations.get(PORT)
    if not port or not port.isdigit():
        return None  # the usual relabelling keeps the pod's declared ports; Fleetward's pods all say
    labels = {"namespace": meta.namespace, "pod": meta.name}
    if app := (meta.labels or {}).get("app.kubernetes.io/name"):
        labels["app"] = app
    if path := annotations.get(PATH):
        labels["__metrics_path__"] = path
    return {"targets": [f"{status.pod_ip}:{port}"], "labels": labels}


class PodDiscovery:
    """Keeps `path` (file_sd JSON) in step with the cluster's annotated pods, on a thread."""

    def __init__(self, kubeconfig: Path, path: Path, skip_network: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.path = path
        self.skip_network = ipaddress.ip_network(skip_network) if skip_network else None
        self._groups: dict[str, dict[str, Any]] = {}  # pod uid -> target group
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="prometheus-pod-discovery", daemon=True)
        self.synced = threading.Event()
        """Set once the first listing is written."""

    def start(self) -> PodDiscovery:
        self._write()  # an empty file at once: Prometheus starts with a valid file_sd
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        api = config.new_client_from_config(str(self.kubeconfig))
        core = client.CoreV1Api(api)
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._list_and_watch(core)
                delay = 0.5
            except Exception as e:  # the API server restarting, a 410: list again
                if self._stop.is_set():
                    break
                log.debug("pod discovery for Prometheus: %s; listing again in %.1f s", e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10)

    def _list_and_watch(self, core: client.CoreV1Api) -> None:
        listing = core.list_pod_for_all_namespaces(timeout_seconds=30)
        self._groups = {
            p.metadata.uid: group for p in listing.items if (group := target_group(p, self.skip_network)) is not None
        }
        self._write()
        self.synced.set()
        self._watch = watch.Watch()
        stream: Callable[..., Any] = self._watch.stream
        for event in stream(
            core.list_pod_for_all_namespaces, resource_version=listing.metadata.resource_version, timeout_seconds=300
        ):
            if self._stop.is_set():
                return
            pod = event["object"]
            if event["type"] == "ERROR":
                raise RuntimeError(f"watch error: {pod}")
            group = None if event["type"] == "DELETED" else target_group(pod, self.skip_network)
            before = self._groups.get(pod.metadata.uid)
            if group is None:
                self._groups.pop(pod.metadata.uid, None)
            else:
                self._groups[pod.metadata.uid] = group
            if group != before:
                self._write()

    def _write(self) -> None:
        groups = [self._groups[uid] for uid in sorted(self._groups)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.path)
