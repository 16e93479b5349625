"""Helpers for agent-runtime tests: a rendered config for a local `fleetward runtime run`,
the real GitHouse tool service in a thread, a TCP proxy that can hold responses, Kafka
topics, commands and an events reader. Everything is real; only the model is the stand-in."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetward.api.agent import AgentSpec
from fleetward.api.envelopes import AgentCommand, ControlMessage, parse_event
from fleetward.api.guardrail import GuardrailSpec
from fleetward.api.runtimeconfig import (
    Credentials,
    ModelCredential,
    Persistence,
    ResolvedGuardrail,
    ResolvedSOP,
    RuntimeConfig,
    Server,
)
from fleetward.api.sop import SOPSpec
from fleetward.devcluster.process import free_port
from fleetward.toolkit import jwks_document, public_jwk

REPO = Path(__file__).resolve().parents[2]
FLEETWARD = str(Path(sys.executable).with_name("fleetward"))
SHARED_TOPICS = (
    "fleetward.events",
    "fleetward.control",
    "fleetward.control-acks",
    "fleetward.dlq",
    "fleetward.alerts",
    "fleetward.audit",
)

# --- GitHouse-shaped agent pieces -----------------------------------------------------------

REFUND_SOP = {
    "domain": "billing",
    "title": "Refund a duplicate or wrong charge",
    "version": "1.0.0",
    "triggers": {"intents": ["refund"], "keywords": ["refund", "charged twice", "money back"]},
    "instructions": "Verify the transaction belongs to the account before any refund; refund at most the charge.",
    "steps": [
        {"id": "verify-transaction", "instruction": "Verify the transaction.", "tool": "verify_transaction"},
        {
            "id": "issue-refund",
            "instruction": "Refund the verified transaction.",
            "tool": "issue_refund",
            "requires": ["verify-transaction"],
        },
    ],
}

DEPLOY_SOP = {
    "domain": "workers",
    "title": "Diagnose a failed Workers deployment",
    "version": "1.0.0",
    "triggers": {"keywords": ["deployment", "deploy", "worker"]},
    "instructions": "Read the deployment logs and explain the failure.",
    "steps": [{"id": "read-logs", "instruction": "Read the logs.", "tool": "worker_deploy_logs"}],
}

PII_GUARDRAIL = {
    "pii": {
        "entities": [
            {"type": "email", "strategy": "redact"},
            {"type": "credit_card", "strategy": "redact"},
            {"type": "api_key", "strategy": "redact"},
        ],
        "applyTo": ["input", "output", "toolResults"],
    },
    "injection": {"mode": "enforce", "action": "block"},
    "policy": {"bannedPhrases": ["bypass", "skip verification"], "action": "block"},
}


def tool(name: str, port: int, properties: dict[str, Any], *, mutating: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"GitHouse {name.replace('_', ' ')}.",
        "inputSchema": {
            "type": "object",
            "properties": properties,
            "required": sorted(properties),
            "additionalProperties": False,
        },
        "endpoint": f"http://127.0.0.1:{port}/tools/{name}",
        "mutating": mutating,
        "timeoutSeconds": 20,
    }


def billing_tools(port: int) -> list[dict[str, Any]]:
    return [
        tool("verify_transaction", port, {"account": {"type": "string"}, "transaction_id": {"type": "string"}}),
        tool(
            "issue_refund",
            port,
            {"transaction_id": {"type": "string"}, "amount_cents": {"type": "integer"}},
            mutating=True,
        ),
        tool("worker_deploy_logs", port, {"deployment_id": {"type": "string"}}),
    ]


def agent_spec(llm_url: str, tools: list[dict[str, Any]], *, model: str = "specialist", **extra: Any) -> dict[str, Any]:
    return {
        "role": "specialist",
        "model": {"name": model, "baseURL": llm_url, "timeoutSeconds": 30, "maxRetries": 0},
        "tools": tools,
        "sopSelector": {"matchLabels": {"domain": "billing"}},
        **extra,
    }


# --- Keys ---------------------------------------------------------------------------------------


@dataclass
class AgentKey:
    agent: str
    kid: str = field(default_factory=lambda: f"k-{uuid.uuid4().hex[:12]}")
    private: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def jwks(self) -> str:
        return jwks_document([public_jwk(self.private.public_key(), self.kid, self.agent)])


# --- The GitHouse tool service (real, in a thread) --------------------------------------------------


class GitHouseTools:
    """The GitHouse service app on a free loopback port, trusting the given JWKS file."""

    def __init__(
        self, jwks_file: Path | None, *, backend: Any = None, configmap: tuple[str, Any] | None = None
    ) -> None:
        """Trust the JWKS file, or with `configmap=(namespace, api_client)` the live trust
        bundle through a watch, as a deployed tool service does."""
        self.jwks_file = jwks_file
        self.configmap = configmap
        self.backend = backend
        self.port = free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GitHouseTools:
        from aiohttp import web

        from fleetward.toolkit.bundle import TrustBundle
        from fleetward.toolkit.examples.githouse.app import create_app
        from fleetward.toolkit.verify import ToolTokenVerifier

        async def main() -> None:
            if self.configmap is not None:
                namespace, api_client = self.configmap
                bundle = TrustBundle.from_configmap(namespace, api_client=api_client).start()
            else:
                bundle = TrustBundle.from_file(str(self.jwks_file)).start()
            runner = web.AppRunner(
                create_app(bundle, ToolTokenVerifier(bundle, issuer="fleetward"), backend=self.backend),
                access_log=None,
                handle_signals=False,
            )
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            while not self._stopped.is_set():
                await asyncio.sleep(0.05)
            await runner.cleanup()
            bundle.stop()

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as e:  # surfaced by start()
                self.error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, daemon=True, name="githouse-tools")
        self._thread.start()
        if not self._ready.wait(20) or self.error is not None:
            raise RuntimeError(f"GitHouse tools did not start: {self.error}")
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> GitHouseTools:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if path != "/metrics" else body.decode()

    def effects(self) -> list[dict[str, Any]]:
        return self.get("/_effects")

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.get("/metrics").splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


class HoldingProxy:
    """A TCP proxy in front of a tool service. With `hold` set it forwards each request at
    once but holds the response back until released: the tool has applied its effect while
    the caller has not seen the result yet (the window a crash test needs)."""

    def __init__(self, target_port: int, hold_path: str = "/") -> None:
        self.target_port = target_port
        self.hold_path = hold_path.encode()
        self.port = free_port()
        self.hold = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="holding-proxy")
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> HoldingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", self.port), self._loop
        ).result(10)
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        matched = asyncio.Event()  # this connection's request is one to hold (by path)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, holding: bool) -> None:
            try:
                while data := await src.read(65536):
                    first_line = data.split(b"\r\n", 1)[0]
                    if not holding and first_line.startswith((b"POST ", b"GET ", b"PUT ", b"DELETE ")):
                        # a new request on this (kept-alive) connection: hold its answer or not
                        if self.hold_path in first_line:
                            matched.set()
                        else:
                            matched.clear()
                    if holding and self.hold.is_set() and matched.is_set():
                        self.held.set()
                        while not self.release.is_set():
                            await asyncio.sleep(0.02)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    def __enter__(self) -> HoldingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.release.set()

        async def shutdown() -> None:
            # Connections still open are cancelled and finish here, not when their
            # coroutines are collected after the loop stopped ("Event loop is closed").
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# --- Kafka ----------------------------------------------------------------------------------------------


def ensure_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    new = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names if n not in existing]
    if new:
        for name, future in admin.create_topics(new).items():
            try:
                future.result(15)
            except Exception as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise AssertionError(f"creating topic {name}: {e}") from e


def produce(
    bootstrap: str,
    topic: str,
    value: str | bytes,
    key: str | None,
    headers: dict[str, str] | None = None,
    *,
    partition: int | None = None,
) -> tuple[int, int]:
    """Produce one record (to `partition` when given, else where its key hashes) and wait
    for it; returns its (partition, offset)."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    where: list[tuple[int, int]] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            where.append((msg.partition(), msg.offset()))

    placement = {} if partition is None else {"partition": partition}
    p.produce(topic, value, key=key, headers=list((headers or {}).items()), on_delivery=delivered, **placement)
    left = p.flush(15)
    assert left == 0 and where, f"the record was not delivered to {topic}"
    return where[0]


def committed_offset(bootstrap: str, group: str, topic: str, partition: int) -> int:
    """The group's committed offset (negative when none), read without joining the group."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return c.committed([TopicPartition(topic, partition)], timeout=10)[0].offset
    finally:
        c.close()


def user_message(agent: str, session: str, text: str, key: str | None = None, **kw: Any) -> AgentCommand:
    return AgentCommand.new(
        "user_message",
        session_id=session,
        agent=agent,
        idempotency_key=key or f"idem-{uuid.uuid4().hex}",
        user={"sub": "jdoe@example.test", "role": "user"},
        data={"text": text},
        **kw,
    )


class TopicReader:
    """Reads a topic from the beginning (every partition) in a background thread."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        ensure_topics(bootstrap, [topic])
        self.records: list[tuple[str | None, bytes, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False}
        )
        deadline = time.monotonic() + 20
        parts: dict[int, Any] = {}
        while not parts and time.monotonic() < deadline:  # a topic just created has no partitions yet
            md = self._consumer.list_topics(topic, timeout=10)
            parts = {p: m for p, m in md.topics[topic].partitions.items() if m.leader >= 0}
            if not parts:
                time.sleep(0.1)
        assert parts, f"topic {topic} has no partitions with a leader"
        self._consumer.assign([TopicPartition(topic, p, 0) for p in parts])  # offset 0: the beginning
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"reader-{topic}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            headers = {k: v.decode() for k, v in (msg.headers() or []) if v is not None}
            with self._lock:
                self.records.append((msg.key().decode() if msg.key() else None, msg.value(), headers))
        self._consumer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def snapshot(self) -> list[tuple[str | None, bytes, dict[str, str]]]:
        with self._lock:
            return list(self.records)

    def wait(self, predicate: Callable[[list[Any]], Any], timeout: float, what: str, parse=lambda r: r) -> Any:
        deadline = time.monotonic() + timeout
        last: list[Any] = []
        while time.monotonic() < deadline:
            last = [parse(r) for r in self.snapshot()]
            result = predicate(last)
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"{what} did not happen within {timeout:.0f} s on {self.topic}; saw {len(last)} record(s)")


class EventReader(TopicReader):
    def __init__(self, bootstrap: str, topic: str = "fleetward.events") -> None:
        super().__init__(bootstrap, topic)

    def session(self, session_id: str) -> list[Any]:
        return [e for e in (parse_event(v) for _, v, _ in self.snapshot()) if e.session_id == session_id]

    def wait_for(self, session_id: str, type_: str, timeout: float = 60) -> list[Any]:
        """The session's events up to and including the first of `type_`."""
        deadline = time.monotonic() + timeout
        events: list[Any] = []
        while time.monotonic() < deadline:
            events = self.session(session_id)
            for i, e in enumerate(events):
                if e.type == type_:
                    return events[: i + 1]
            time.sleep(0.05)
        raise AssertionError(
            f"no {type_} event in session {session_id} within {timeout:.0f} s; got "
            + json.dumps([(e.type, e.data.to_wire()) for e in events])[:3000]
        )


# --- An OTLP/HTTP trace receiver ---------------------------------------------------------------------


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    events: list[dict[str, Any]]
    resource: dict[str, Any]


def _any_value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    """Receives what an OpenTelemetry SDK exports to `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP/HTTP,
    protobuf, POST /v1/traces), decoded with the official `opentelemetry-proto` messages:
    the export path the product uses, end to end."""

    def __init__(self) -> None:
        import gzip
        import http.server

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        lock = self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                received = []
                for rs in request.resource_spans:
                    resource = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            received.append(
                                ReceivedSpan(
                                    trace_id=sp.trace_id.hex(),
                                    span_id=sp.span_id.hex(),
                                    parent_span_id=sp.parent_span_id.hex(),
                                    name=sp.name,
                                    kind=sp.kind,
                                    attributes={kv.key: _any_value(kv.value) for kv in sp.attributes},
                                    events=[
                                        {"name": e.name, **{kv.key: _any_value(kv.value) for kv in e.attributes}}
                                        for e in sp.events
                                    ],
                                    resource=resource,
                                )
                            )
                with lock:
                    receiver.spans.extend(received)
                    receiver.requests += 1
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="otlp-receiver")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a runtime needs to export here, at once (the batch processor waits 5 s by default)."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait(
        self, trace_id: str, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 20
    ) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if predicate(spans):
                return spans
            time.sleep(0.05)
        got = sorted(s.name for s in self.trace(trace_id))
        raise AssertionError(f"trace {trace_id}: the expected spans did not arrive within {timeout:.0f} s; got {got}")


# --- A local runtime process ------------------------------------------------------------------------------


@dataclass
class LocalAgent:
    namespace: str
    name: str
    dir: Path
    config: RuntimeConfig
    config_path: Path
    key: AgentKey
    port: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    starts: int = 0
    launcher: list[str] = field(default_factory=lambda: [FLEETWARD])
    """How `fleetward` is started (a benchmark may put a profiler in front)."""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def request_topic(self) -> str:
        return self.config.topics.request

    def start(self) -> LocalAgent:
        self.starts += 1
        self.log_path = self.dir / f"runtime-{self.starts}.log"
        out = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*self.launcher, "runtime", "run", "--config", str(self.config_path), "--listen", f"127.0.0.1:{self.port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=str(self.dir),
        )
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as resp:
                return resp.status == 200
        except Exception:
            return False

    def wait_ready(self, timeout: float = 60) -> LocalAgent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"runtime exited with {self.proc.returncode}:\n{self.log()}")
            if self.ready():
                return self
            time.sleep(0.1)
        raise AssertionError(f"runtime not ready within {timeout:.0f} s:\n{self.log()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self, tail: int | None = 6000) -> str:
        """The runtime's log (every start's), each file's last `tail` characters: short enough
        for an assertion message. `tail=None` for the whole log, to search it."""
        return "\n".join(
            p.read_text(errors="replace")[-tail if tail else 0 :] for p in sorted(self.dir.glob("runtime-*.log"))
        )

    def terminate(self, timeout: float = 40) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def render_local_agent(
    workdir: Path,
    *,
    bootstrap: str,
    spec: dict[str, Any],
    sops: dict[str, dict[str, Any]] | None = None,
    guardrails: dict[str, dict[str, Any]] | None = None,
    namespace: str = "rt",
    name: str | None = None,
    dsn: str | None = None,
    extra_env: dict[str, str] | None = None,
    model_prices: dict[str, dict[str, float]] | None = None,
) -> LocalAgent:
    """The config the operator would render (desired.runtime_config), with file paths moved
    into `workdir`, plus a fresh agent key; topics are created."""
    from fleetward.operator.desired.agent import AgentInputs, AgentRef, runtime_config
    from fleetward.operator.settings import KafkaSettings, OperatorSettings

    name = name or f"a{uuid.uuid4().hex[:10]}"
    workdir.mkdir(parents=True, exist_ok=True)
    key = AgentKey(f"{namespace}/{name}")
    (workdir / "signing-key.pem").write_bytes(key.pem())
    (workdir / "key-id").write_text(key.kid)
    (workdir / "api-key-0").write_text("sk-test-runtime-key")
    (workdir / "jwks.json").write_text(key.jwks())
    settings = OperatorSettings(
        namespace="fleetward-system",
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        model_prices=model_prices or {},  # the installation's price table (Helm value modelPrices)
    )
    inputs = AgentInputs(
        ref=AgentRef(namespace, name, uid=str(uuid.uuid4())),
        spec=AgentSpec.model_validate(spec),
        settings=settings,
        sops=[
            ResolvedSOP(name=n, version=s["version"], spec=SOPSpec.model_validate(s)) for n, s in (sops or {}).items()
        ],
        guardrails=[
            ResolvedGuardrail(name=n, spec=GuardrailSpec.model_validate(g)) for n, g in (guardrails or {}).items()
        ],
        key_id=key.kid,
        model_keys={0: b"sk-test-runtime-key"},
    )
    config = runtime_config(inputs)
    config = config.model_copy(
        update={
            "credentials": Credentials(
                signing_key_file=str(workdir / "signing-key.pem"),
                key_id=key.kid,
                models=[ModelCredential(index=0, api_key_file=str(workdir / "api-key-0"))],
            ),
            "persistence": Persistence(
                dsn_env="FLEETWARD_DATABASE_DSN" if dsn else None, sqlite_path=str(workdir / "state.db")
            ),
            "server": Server(port=free_port()),
        }
    ).with_hash()
    path = workdir / "config.json"
    path.write_text(config.to_json())
    ensure_topics(bootstrap, [config.topics.request, *SHARED_TOPICS])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETWARD_", "OTEL_"))}
    env.update({"POD_NAME": f"{name}-0", "FLEETWARD_SHUTDOWN_SECONDS": "15", **(extra_env or {})})
    if dsn:
        env["FLEETWARD_DATABASE_DSN"] = dsn
    return LocalAgent(namespace, name, workdir, config, path, key, config.server.port, env)


@contextmanager
def running(agent: LocalAgent, timeout: float = 90) -> Iterator[LocalAgent]:
    agent.start()
    try:
        agent.wait_ready(timeout)
        yield agent
    finally:
        agent.stop()


def control(type_: str, agents: list[str], generation: int, **kw: Any) -> ControlMessage:
    return ControlMessage.new(type_, kill_switch="test-switch", generation=generation, agents=agents, **kw)  # type: ignore[arg-type]
