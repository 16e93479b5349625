"""Helpers for tests of the Rust gateway (gateway-rs, binary `fleetward-gateway`): find the
built binary, run it as a real process against a real Kafka, mint tokens, build events with
the shared Python models, read topics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetward.api.envelopes import SessionEvent
from fleetward.devcluster.layout import REPO

BUILD_COMMAND = "hack/build-gateway.sh"
AUDIENCE = "fleetward-gateway"
ISSUER = "https://idp.fleetward.test"


def gateway_binary() -> Path:
    """The release binary `hack/build-gateway.sh` builds; fails loudly when it is missing."""
    cache = Path(os.environ.get("FLEETWARD_CACHE") or REPO / ".cache")
    binary = cache / "cargo-target" / "release" / "fleetward-gateway"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(
            f"the gateway binary {binary} is not built; run `{BUILD_COMMAND}` "
            f"(with the same FLEETWARD_CACHE={os.environ.get('FLEETWARD_CACHE', '')!r})"
        )
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_claims(
    session: str,
    *,
    role: str = "user",
    agent: str = "support/router",
    sub: str = "alice",
    ttl: int = 300,
    **claims: Any,
) -> dict[str, Any]:
    """The claims of a token the gateway accepts (override or drop claims with `claims`; None drops)."""
    now = int(time.time())
    body: dict[str, Any] = {
        "sub": sub,
        "sid": session,
        "role": role,
        "agent": agent,
        "exp": now + ttl,
        "iat": now,
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    body.update(claims)
    return {k: v for k, v in body.items() if v is not None}


def mint(secret: str, session: str, **kw: Any) -> str:
    """An HS256 token the gateway accepts (keywords as in `token_claims`)."""
    return jwt.encode(token_claims(session, **kw), secret, algorithm="HS256")


def mint_agent(private_key: Ed25519PrivateKey, kid: str, session: str, *, agent: str, **kw: Any) -> str:
    """An EdDSA token signed with an agent's own key (`kid` = its id in the trust bundle)."""
    return jwt.encode(token_claims(session, agent=agent, **kw), private_key, algorithm="EdDSA", headers={"kid": kid})


def event(
    session: str,
    sequence: int,
    *,
    kind: str = "message",
    agent: str = "support/router",
    run: str = "run-1",
    data: dict[str, Any] | None = None,
) -> str:
    """A session event built (and validated) by the shared Python models."""
    payload = data if data is not None else {"role": "assistant", "text": f"event {sequence}"}
    ev = SessionEvent.new(
        kind, session_id=session, agent=agent, run_id=run, trace_id=uuid.uuid4().hex, sequence=sequence, data=payload
    )
    return ev.to_json()


@dataclass
class Topics:
    """Topic names unique to one test module, so tests never read each other's messages."""

    prefix: str = field(default_factory=lambda: f"gwtest-{uuid.uuid4().hex[:8]}")

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def acks(self) -> str:
        return f"{self.prefix}.control-acks"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def requests_prefix(self) -> str:
        return f"{self.prefix}.requests"

    def requests(self, agent: str) -> str:
        ns, name = agent.split("/")
        return f"{self.requests_prefix}.{ns}.{name}"

    def create(self, bootstrap: str, agents: list[str], partitions: int = 3) -> None:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        names = [self.events, self.control, self.acks, self.alerts] + [self.requests(a) for a in agents]
        for _name, fut in admin.create_topics([NewTopic(n, partitions, 1) for n in names]).items():
            fut.result(30)


class KafkaWriter:
    """Produce with delivery reports; returns (partition, offset) of each message."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})

    def send(self, topic: str, key: str, value: str, headers: dict[str, str] | None = None) -> tuple[int, int]:
        out: list[Any] = []
        self.producer.produce(
            topic, key=key, value=value, headers=headers, on_delivery=lambda err, msg: out.append((err, msg))
        )
        self.producer.flush(30)
        err, msg = out[0]
        assert err is None, f"produce to {topic} failed: {err}"
        return msg.partition(), msg.offset()


def read_topic(
    bootstrap: str,
    topic: str,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 30,
) -> list[dict[str, Any]]:
    """Every message of `topic` (from the beginning) as {key, value, headers}, polled until
    `until(messages)` is true or the timeout passes (then the list as it is)."""
    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"gwtest-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(out):
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            out.append(
                {
                    "key": m.key().decode() if m.key() else None,
                    "value": json.loads(m.value()),
                    "headers": {k: v.decode() for k, v in (m.headers() or [])},
                }
            )
        return out
    finally:
        c.close()


class GatewayProcess:
    """The real `fleetward-gateway` binary on a free port, logs (JSON) in a file."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        secret: str,
        log: Path,
        *args: str,
        instance: str = "gw-test",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.log = log
        self.secret = secret
        self.argv = [
            str(gateway_binary()),
            f"--listen=127.0.0.1:{self.port}",
            f"--kafka-bootstrap={bootstrap}",
            f"--events-topic={topics.events}",
            f"--control-topic={topics.control}",
            f"--control-acks-topic={topics.acks}",
            f"--alerts-topic={topics.alerts}",
            f"--requests-topic-prefix={topics.requests_prefix}",
            f"--jwt-audience={AUDIENCE}",
            f"--jwt-issuer={ISSUER}",
            f"--instance-id={instance}",
            f"--verify-group-id={topics.prefix}-verify",
            "--partition-refresh-seconds=2",
            *args,
        ]
        # The secret goes through the environment, as in a Deployment (never argv).
        self.env = {**os.environ, "FLEETWARD_GATEWAY_JWT_HS256_SECRET": secret, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> GatewayProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            if self.ready():
                return self
            time.sleep(0.2)
        raise AssertionError(f"gateway not ready after {timeout} s:\n{self.logs()[-3000:]}")

    def ready(self) -> bool:
        return self.http("/readyz")[0] == 200

    def http(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0 when absent)."""
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in self.http("/metrics")[1].splitlines():
            if line.startswith(want + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def url(self, session: str, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/v1/sessions/{session}/ws" + (f"?{query}" if query else "")

    def token(self, session: str, **kw: Any) -> str:
        return mint(self.secret, session, **kw)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"gateway did not stop within {timeout} s after signal {sig}") from None
