"""Benchmark: agent runtime overhead per request and one replica's throughput (issue goal:
p50 under 5 ms, over 200 requests/s per replica, with the model answering instantly).

    .venv/bin/python bench/runtime_overhead.py                    # SQLite (the default), both variants
    .venv/bin/python bench/runtime_overhead.py --postgres         # PostgreSQL checkpoints
    .venv/bin/python bench/runtime_overhead.py --requests 100 --burst 200 --no-write

Everything is real except the model: one `fleetward runtime run` process (rendered the way
the operator renders it, with an SOP and a PII/injection/policy Guardrail) consuming its
request topic on the local Kafka broker, checkpointing to SQLite (the chart's default:
`runtime.databaseSecret` empty) or PostgreSQL; the LLM stand-in (`fleetward llm serve`, its
own process) answering at once; the GitHouse tool service (its own process) for the tool
variant. Two variants:

  plain   one model call that replies with text (no tool)
  tool    a model call asking for verify_transaction, the tool call, a second model call

Per variant:
- latency: N requests one at a time (each produced once the previous one's `resolved` was
  seen). overhead = (timestamp of the reply `message` event - wall time just before the
  request was produced) - the stand-in's own time for that request's model calls (its
  recorded `durationMs`) - for the tool variant, the tool service's mean time per call (its
  `githouse_tool_duration_seconds` histogram). What remains is the runtime: Kafka intake,
  dedupe ledger, guardrail scans, SOP retrieval (one embedding), the graph and its
  checkpoints, the HTTP clients, event ledger and produce.
- throughput: M requests produced in one burst; requests/s = M / (time from the first
  produce to the last `resolved` seen). The runtime works the request topic's 3 partitions,
  one command at a time each. Also the runtime's CPU time per request (/proc), which does
  not depend on what else the (shared) machine is doing: 1000 / cpu_ms is what one fully
  used core would sustain.

Results: docs/bench/runtime.json (appended, one line per run) and the table in
docs/bench/runtime.md (written by hand from it). Machine load is recorded with each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from results import record  # noqa: E402

from fleetward.api.envelopes import parse_event  # noqa: E402
from fleetward.devcluster.cluster import DevCluster  # noqa: E402
from fleetward.devcluster.process import free_port  # noqa: E402
from tests.support.runtime import (  # noqa: E402
    PII_GUARDRAIL,
    REFUND_SOP,
    LocalAgent,
    agent_spec,
    billing_tools,
    ensure_topics,
    render_local_agent,
    user_message,
)

RESULTS = REPO / "docs" / "bench" / "runtime.json"
FLEETWARD = str(Path(sys.executable).with_name("fleetward"))
GOAL_P50_MS = 5.0
GOAL_RPS = 200.0
STALL_SECONDS = 60.0

SCENARIOS = {
    "plain": [{"name": "reply", "match": {"lastRole": "user"}, "respond": {"content": "Your refund is on its way."}}],
    "tool": [
        {"name": "reply", "match": {"toolResultFor": "verify_transaction"}, "respond": {"content": "Verified."}},
        {
            "name": "verify",
            "match": {"lastRole": "user"},
            "respond": {
                "toolCalls": [
                    {"name": "verify_transaction", "arguments": {"account": "jdoe", "transaction_id": "txn_1002"}}
                ]
            },
        },
    ],
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds per thread group of a process: the event loop (main thread), librdkafka's
    threads (`rdk:*`), onnxruntime's pool and the Python worker threads (aiosqlite, to_thread)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        group = "event loop" if task.name == str(pid) else "librdkafka" if comm.startswith("rdk:") else "other threads"
        out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


class Process:
    """A child process with its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)

    def wait_http(self, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[:3]} exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def http_json(url: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@dataclass
class Seen:
    first_ts: float | None = None
    message_ts: float | None = None
    resolved_at: float | None = None
    outcome: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class EventWatcher:
    """Reads fleetward.events in a thread: per session, the reply's event timestamp and when
    the `resolved` event was seen here."""

    def __init__(self, bootstrap: str, agent: str) -> None:
        self.agent = agent
        self.sessions: dict[str, Seen] = {}
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        md = self.consumer.list_topics("fleetward.events", timeout=10)
        self.consumer.assign(
            [TopicPartition("fleetward.events", p, 0) for p in md.topics["fleetward.events"].partitions]
        )
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def expect(self, session: str) -> Seen:
        with self.lock:
            return self.sessions.setdefault(session, Seen())

    def run(self) -> None:
        while not self.stop_flag.is_set():
            msg = self.consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            seen_at = time.time()
            event = parse_event(msg.value())
            if event.agent != self.agent:
                continue
            seen = self.expect(event.session_id)
            if seen.first_ts is None:
                seen.first_ts = event.timestamp.timestamp()
            if event.type == "message":
                seen.message_ts = event.timestamp.timestamp()
            elif event.type in ("resolved", "failed", "escalated"):
                if event.type != "resolved":
                    say(f"  session {event.session_id}: {event.type} {event.data.to_wire()}")
                seen.outcome = event.type
                seen.resolved_at = seen_at
                seen.done.set()
        self.consumer.close()

    def close(self) -> None:
        self.stop_flag.set()
        self.thread.join(5)


@dataclass
class Rig:
    bootstrap: str
    agent: LocalAgent
    llm_url: str
    tools_url: str | None
    producer: Producer
    events: EventWatcher

    def send(self, session: str, text: str) -> float:
        cmd = user_message(self.agent.ref, session, text)
        t0 = time.time()
        self.producer.produce(self.agent.request_topic, cmd.to_json(), key=session)
        self.producer.poll(0)
        return t0

    def standin_ms(self) -> dict[str, float]:
        """The stand-in's own time per session (sum over the session's model calls)."""
        out: dict[str, float] = {}
        for r in http_json(f"{self.llm_url}/_standin/requests"):
            # The last tag is the request's own: earlier ones can come from the long-term
            # memory of the same user's previous runs, shown to the model before the request.
            tags = re.findall(r"\[(b-[0-9a-z-]+)\]", json.dumps(r["body"]))
            if tags and r["durationMs"] is not None:
                out[tags[-1]] = out.get(tags[-1], 0.0) + r["durationMs"]
        return out

    def tool_seconds(self) -> tuple[float, float]:
        """(sum, count) of the tool service's own call durations."""
        if not self.tools_url:
            return 0.0, 0.0
        with urllib.request.urlopen(f"{self.tools_url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = metric_sum(text, "githouse_tool_duration_seconds_sum")
        return total, metric_sum(text, "githouse_tool_duration_seconds_count")


def kafka_probe(bootstrap: str, n: int = 40) -> dict[str, float]:
    """The broker's own share: produce -> consume latency and a synchronous offset commit,
    with the intake's consumer settings, one record at a time (what the runtime's intake
    waits for before its work starts)."""
    from fleetward.runtime.intake import consumer_config

    topic = f"bench-probe-{uuid.uuid4().hex[:6]}"
    ensure_topics(bootstrap, [topic])
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    consumer = Consumer(consumer_config({"bootstrap.servers": bootstrap}, f"probe-{topic}", "bench"))
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(0.1)
    delivery, commit = [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            producer.produce(topic, b"probe", key=str(i))
            producer.flush(10)
            msg = None
            while msg is None or msg.error():
                msg = consumer.poll(1)
            delivery.append(1000 * (time.perf_counter() - t0))
            t1 = time.perf_counter()
            consumer.commit(offsets=[TopicPartition(topic, msg.partition(), msg.offset() + 1)], asynchronous=False)
            commit.append(1000 * (time.perf_counter() - t1))
    finally:
        consumer.close()
    return {
        "produce_to_consume_p50_ms": round(statistics.median(delivery), 2),
        "produce_to_consume_p90_ms": round(percentile(delivery, 0.9), 2),
        "sync_commit_p50_ms": round(statistics.median(commit), 2),
        "sync_commit_p90_ms": round(percentile(commit, 0.9), 2),
    }


def latency_phase(rig: Rig, variant: str, n: int, warmup: int) -> dict[str, Any]:
    samples: list[tuple[str, float]] = []
    to_first_event: list[float] = []
    produce_acked: list[float] = []
    tool_sum0, tool_count0 = rig.tool_seconds()
    assert rig.agent.proc is not None
    pid = rig.agent.proc.pid
    cpu0, threads0 = 0.0, {}
    http_json(f"{rig.llm_url}/_standin/requests", "DELETE")
    for i in range(warmup + n):
        session = f"b-{variant}-lat-{i}-{uuid.uuid4().hex[:6]}"
        seen = rig.events.expect(session)
        t0 = rig.send(session, f"[{session}] I was charged twice, please refund the duplicate charge")
        rig.producer.flush(10)
        acked = time.time()
        if not seen.done.wait(60):
            raise RuntimeError(f"no resolved event for {session} within 60 s; runtime log:\n{rig.agent.log()[-3000:]}")
        if seen.outcome != "resolved" or seen.message_ts is None:
            raise RuntimeError(f"{session}: {seen.outcome} without a reply message; see {rig.agent.log_path}")
        if i >= warmup:
            samples.append((session, seen.message_ts - t0))
            assert seen.first_ts is not None
            to_first_event.append(1000 * (seen.first_ts - t0))
            produce_acked.append(1000 * (acked - t0))
        if i == warmup - 1:  # the tool's time is counted over the measured requests only
            tool_sum0, tool_count0 = rig.tool_seconds()
            cpu0, threads0 = cpu_seconds(pid), cpu_by_thread(pid)
    cpu = cpu_seconds(pid) - cpu0
    threads = {k: v - threads0.get(k, 0.0) for k, v in cpu_by_thread(pid).items()}
    standin = rig.standin_ms()
    for _ in range(20):  # the stand-in records a call after answering it: the last may lag
        if all(s in standin for s, _ in samples):
            break
        time.sleep(0.1)
        standin = rig.standin_ms()
    tool_sum, tool_count = rig.tool_seconds()
    tool_mean_ms = 1000 * (tool_sum - tool_sum0) / (tool_count - tool_count0) if tool_count > tool_count0 else 0.0
    calls_per_request = 2 if variant == "tool" else 1
    missing = [s for s, _ in samples if s not in standin]
    if missing:
        raise RuntimeError(f"the stand-in has no record of {len(missing)} session(s), e.g. {missing[0]}")
    e2e = [1000 * d for _, d in samples]
    llm = [standin[s] for s, _ in samples]
    overhead = [e - m - (tool_mean_ms if variant == "tool" else 0.0) for e, m in zip(e2e, llm, strict=True)]
    return {
        "requests": n,
        "model_calls_per_request": calls_per_request,
        "e2e_p50_ms": round(statistics.median(e2e), 2),
        # produce -> the run's first event (Kafka delivery, intake, dedupe ledger, input scan):
        "to_first_event_p50_ms": round(statistics.median(to_first_event), 2),
        "to_first_event_p90_ms": round(percentile(to_first_event, 0.90), 2),
        # the request's own produce, until the broker acknowledged it (part of to_first_event):
        "produce_acked_p50_ms": round(statistics.median(produce_acked), 2),
        "produce_acked_p90_ms": round(percentile(produce_acked, 0.90), 2),
        "standin_p50_ms": round(statistics.median(llm), 2),
        "tool_service_mean_ms": round(tool_mean_ms, 2) if variant == "tool" else None,
        "overhead_p50_ms": round(statistics.median(overhead), 2),
        "overhead_p90_ms": round(percentile(overhead, 0.90), 2),
        "overhead_p99_ms": round(percentile(overhead, 0.99), 2),
        "overhead_min_ms": round(min(overhead), 2),
        "runtime_cpu_ms_per_request": round(1000 * cpu / n, 2),
        "runtime_cpu_ms_per_request_by_thread": {k: round(1000 * v / n, 2) for k, v in sorted(threads.items())},
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


def throughput_phase(rig: Rig, variant: str, m: int) -> dict[str, Any]:
    http_json(f"{rig.llm_url}/_standin/requests", "DELETE")
    assert rig.agent.proc is not None
    pid = rig.agent.proc.pid
    sessions = [f"b-{variant}-tp-{i}-{uuid.uuid4().hex[:6]}" for i in range(m)]
    seen = [rig.events.expect(s) for s in sessions]
    cpu0 = cpu_seconds(pid)
    load0 = os.getloadavg()[0]
    first = None
    for s in sessions:
        t = rig.send(s, f"[{s}] I was charged twice, please refund the duplicate charge")
        first = first or t
    rig.producer.flush(30)
    produced = time.time()
    # Wait until every request ended, or nothing ended for STALL_SECONDS (a stuck partition:
    # `finished` < `requests` in the result, and the rate is over what finished).
    done_before, progress_at = 0, time.monotonic()
    while (done := sum(x.done.is_set() for x in seen)) < m:
        if done != done_before:
            done_before, progress_at = done, time.monotonic()
        elif time.monotonic() - progress_at > STALL_SECONDS:
            say(f"  throughput: {m - done} request(s) did not finish; nothing ended for {STALL_SECONDS:.0f} s")
            break
        time.sleep(0.05)
    finished = [x for x in seen if x.resolved_at is not None]
    last = max(x.resolved_at for x in finished if x.resolved_at is not None)
    cpu = cpu_seconds(pid) - cpu0
    assert first is not None
    wall = last - first
    return {
        "requests": m,
        "finished": len(finished),
        "produce_seconds": round(produced - first, 3),
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(finished) / wall, 1),
        "not_resolved": {o: n for o in ("failed", "escalated") if (n := sum(x.outcome == o for x in seen))},
        "runtime_cpu_ms_per_request": round(1000 * cpu / len(finished), 2),
        "one_core_requests_per_second": round(len(finished) / cpu, 1),
        "loadavg_1m_before": round(load0, 2),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }


# Where Python's CPU goes: each py-spy (--gil) sample goes to the innermost frame of its
# stack that matches one of these (checked in order, per frame from the leaf up).
COMPONENTS = [
    ("SOP retrieval (tokenizer + onnxruntime embedding)", r"runtime/retrieval\.py|onnxruntime|tokenizers"),
    ("guardrail scans", r"runtime/guardrails/|middleware/guardrails\.py|agents/middleware/pii|_redaction"),
    ("SQLite calls (aiosqlite)", r"aiosqlite|sqlite3"),
    ("checkpoint (de)serialization", r"langgraph/checkpoint"),
    ("model client (langchain-openai, openai, httpx)", r"langchain_openai|site-packages/openai/|httpx|httpcore"),
    ("event envelopes + ledger + Kafka produce", r"runtime/events\.py|api/envelopes|runtime/kafka\.py"),
    ("LangGraph / LangChain graph machinery", r"langgraph|langchain_core|site-packages/langchain/"),
    ("pydantic", r"pydantic"),
    ("logging", r"logging/"),
    ("OpenTelemetry", r"opentelemetry"),
    ("Kafka intake", r"runtime/intake\.py|confluent_kafka"),
    ("other runtime code", r"fleetward/runtime/"),
    ("asyncio event loop", r"asyncio/|selectors\.py"),
]


def summarise_profile(path: Path) -> dict[str, float]:
    """Shares (%) of py-spy samples by component (see COMPONENTS)."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        name = next(
            (c for f in reversed(frames) for c, pattern in COMPONENTS if re.search(pattern, f)), "other (stdlib)"
        )
        counts[name] = counts.get(name, 0) + int(n)
    total = sum(counts.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def summarise_cprofile(path: Path, requests: int) -> dict[str, float]:
    """Per-request counts from the runtime's cProfile (start-up included, so slightly high).
    A coroutine is counted by cProfile once per resumption: one that awaits once (these do)
    counts 2 per call, hence the halving."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]

    def calls(file_end: str, name: str) -> int:
        return sum(v[1] for (f, _, n), v in stats.items() if f.endswith(file_end) and n == name)

    return {
        "event_loop_iterations": round(calls("asyncio/base_events.py", "_run_once") / requests, 1),
        "aiosqlite_thread_round_trips": round(calls("aiosqlite/core.py", "_execute") / 2 / requests, 1),
        "sqlite_commits_checkpointer": round(calls("aiosqlite/core.py", "commit") / 2 / requests, 1),
        "sqlite_autocommit_writes_ledger": round(calls("runtime/persistence.py", "execute") / 2 / requests, 1),
        "kafka_acks_awaited": round(calls("runtime/kafka.py", "send") / 2 / requests, 1),
    }


@contextlib.contextmanager
def profiling(py_spy: str | None, agent: LocalAgent, out: Path, gil: bool = False) -> Iterator[None]:
    """py-spy samples the runtime's Python stacks (busy threads only; with `gil`, only the
    thread holding the GIL: Python's own CPU time) while the block runs; `out` gets collapsed
    stacks (one line per stack with its sample count)."""
    if not py_spy:
        yield
        return
    assert agent.proc is not None
    args = [
        py_spy,
        "record",
        "--pid",
        str(agent.proc.pid),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
        "--rate",
        "250",
    ]
    if gil:
        args.append("--gil")
    profiler = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    try:
        yield
    finally:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(60)
        say(f"profile: {out}")


def run_variant(args: argparse.Namespace, cluster: DevCluster, bootstrap: str, dsn: str | None, variant: str) -> dict:
    work = cluster.state / "rtbench" / variant
    work.mkdir(parents=True, exist_ok=True)
    llm_port = free_port()
    scenario = work / "scenario.json"
    scenario.write_text(json.dumps({"rules": SCENARIOS[variant]}))
    llm = Process(
        [FLEETWARD, "llm", "serve", "--port", str(llm_port), "--scenario", str(scenario)], work / "standin.log"
    )
    tools_port = free_port()
    spec = agent_spec(f"http://127.0.0.1:{llm_port}/v1", billing_tools(tools_port), model="bench")
    agent = render_local_agent(
        work,
        bootstrap=bootstrap,
        spec=spec,
        sops={"refunds": REFUND_SOP},
        guardrails={"pii": PII_GUARDRAIL},
        name=f"bench-{variant}-{uuid.uuid4().hex[:6]}",
        dsn=dsn,
        extra_env={"LOG_LEVEL": args.log_level},
        model_prices={"bench": {"inputPerMillionTokens": 0.15, "outputPerMillionTokens": 0.6}},
    )
    if args.cprofile:  # deterministic profile of the event loop thread, written when the runtime stops
        agent.launcher = [sys.executable, "-m", "cProfile", "-o", str(work / "runtime.prof"), FLEETWARD]
    tools = None
    if variant == "tool":
        tools = Process(
            [
                sys.executable,
                "-m",
                "fleetward.toolkit.examples.githouse",
                "--listen",
                f"127.0.0.1:{tools_port}",
                "--trust-bundle-file",
                str(work / "jwks.json"),
                "--log-level",
                "WARNING",
            ],
            work / "tools.log",
        )
        tools.wait_http(f"http://127.0.0.1:{tools_port}/metrics")
    llm.wait_http(f"http://127.0.0.1:{llm_port}/_standin")
    ensure_topics(bootstrap, ["fleetward.events"])
    watcher = EventWatcher(bootstrap, agent.ref)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0})
    rig = Rig(
        bootstrap,
        agent,
        f"http://127.0.0.1:{llm_port}",
        f"http://127.0.0.1:{tools_port}" if tools else None,
        producer,
        watcher,
    )
    agent.start()
    try:
        agent.wait_ready(120)
        say(f"{variant}: runtime ready ({'PostgreSQL' if dsn else 'SQLite'}); latency, {args.requests} requests")
        with profiling(args.profile, agent, work / "profile-latency.txt", args.profile_gil):
            latency = latency_phase(rig, variant, args.requests, args.warmup)
        if args.profile:
            key = "python_cpu_share_pct" if args.profile_gil else "busy_thread_samples_pct"
            latency[key] = summarise_profile(work / "profile-latency.txt")
        say(f"{variant}: latency {latency}")
        say(f"{variant}: throughput, a burst of {args.burst}")
        with profiling(args.profile, agent, work / "profile-throughput.txt", args.profile_gil):
            throughput = throughput_phase(rig, variant, args.burst)
        say(f"{variant}: throughput {throughput}")
        result: dict[str, Any] = {"latency": latency, "throughput": throughput}
    finally:
        agent.stop()
        watcher.close()
        llm.stop()
        if tools:
            tools.stop()
    if args.cprofile:  # written when the runtime stopped
        result["per_request_from_cprofile"] = summarise_cprofile(
            work / "runtime.prof", args.warmup + args.requests + args.burst
        )
        say(f"{variant}: {result['per_request_from_cprofile']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests in the latency phase")
    parser.add_argument("--warmup", type=int, default=20, help="requests before measuring")
    parser.add_argument("--burst", type=int, default=1000, help="requests in the throughput burst")
    parser.add_argument("--variants", default="plain,tool")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL checkpoints instead of SQLite")
    parser.add_argument("--log-level", default="INFO", help="the runtime's LOG_LEVEL (default INFO, as deployed)")
    parser.add_argument(
        "--profile", metavar="PY_SPY", help="py-spy binary: profile the runtime (collapsed stacks next to its log)"
    )
    parser.add_argument("--profile-gil", action="store_true", help="profile only the thread holding the GIL")
    parser.add_argument(
        "--cprofile", action="store_true", help="run the runtime under cProfile (runtime.prof next to its log)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the result only")
    parser.add_argument("--label", help="a note stored with the result (e.g. which code was measured)")
    args = parser.parse_args(argv)

    started = machine()
    cluster = DevCluster.create("rtbench")
    try:
        bootstrap = cluster.kafka("plain").bootstrap
        dsn = cluster.postgres().dsn if args.postgres else None
        probe = kafka_probe(bootstrap)
        say(f"Kafka alone: {probe}")
        variants = {v: run_variant(args, cluster, bootstrap, dsn, v) for v in args.variants.split(",")}
    finally:
        cluster.stop()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "bench/runtime_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": started,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "checkpoints": "postgres" if args.postgres else "sqlite",
        **({"label": args.label} if args.label else {}),
        "kafka_probe": probe,
        "goals": {"overhead_p50_ms": GOAL_P50_MS, "requests_per_second": GOAL_RPS},
        "variants": variants,
    }
    record(result, RESULTS, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
