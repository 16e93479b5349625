"""Gateway benchmark (issue 8 §4): the Fleetward gateway against Centrifugo's engine, side by side.

    .venv/bin/python bench/gateway_bench.py [--quick] [--write]

One run starts a Kafka broker (fleetward.devcluster), then, one after the other on that same
Kafka and the same events topic, the Fleetward gateway (gateway-rs, the `make build` binary)
and the anchor: Centrifuge (github.com/centrifugal/centrifuge, the library Centrifugo is built
on) with a franz-go consumer, bench/gateway/centrifuge-anchor. The same load generator
(bench/gateway/loadgen, Go) drives both: it opens the connections, one session each, produces
valid `message` session events with 256 bytes of `data.text` (~556 bytes of JSON in all: a
valid envelope alone is ~300 bytes, so a whole event of 256 bytes cannot exist) to the events
topic (key = session id, round-robin over the sessions) and measures Kafka-produce-to-client latency from the event's
`timestamp`. Everything binds to 127.0.0.1.

Before any target, the broker runs for --kafka-warm-up seconds (45) at the full rate with a
consumer, so that the JVM's compilation of its produce/fetch paths does not land in the first
target's measurements.

Per target (10,000 connections; --quick: 1,000):
  idle     RSS of the server with every connection open and idle, minus its RSS before the
           first connection, divided by the connections (/proc/<pid>/status VmRSS);
  full     events at --rate/s for a warm-up then a measured window: deliveries in the window
           divided by the server's CPU time in the window (utime+stime of /proc/<pid>/stat,
           every thread) = delivered messages per CPU-second, i.e. per core;
  half     the same at half the rate: latency percentiles over every delivery in the window.
Gateway only: 1,000 clients (--quick: 200) receive live events; the gateway gets SIGTERM
(clients see close 1001), a new process starts on the same port, clients reconnect with
`?since=<last position>` (backoff 50 ms doubling to 1 s, full jitter); reported: the time
until all resumed, and missed, duplicated and out-of-order events (per-session sequences).

The machine has 2 vCPUs shared with other work: the load average before and after each
target is recorded with the numbers; Kafka and the load generator run on the same cores.
With --write the run is appended to docs/bench/gateway.json (one JSON object per line) and
the results table in docs/bench/gateway.md is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetward.devcluster.cluster import DevCluster
from fleetward.devcluster.layout import REPO, cache_dir, gateway_binary
from fleetward.devcluster.process import ManagedProcess, die_with_parent, free_port

RESULTS_JSON = REPO / "docs" / "bench" / "gateway.json"
RESULTS_MD = REPO / "docs" / "bench" / "gateway.md"
MD_START, MD_END = "<!-- results:start -->", "<!-- results:end -->"
AUDIENCE = "fleetward-gateway"
ISSUER = "https://idp.fleetward.test"
AGENT = "bench/agent"
TEXT_BYTES = 256  # data.text of each event; the valid envelope around it adds ~300 bytes
PARTITIONS = 3
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOALS = {"deliveries_per_core_ratio": 2.0, "p99_ms_at_half_load": 10.0, "bytes_per_idle_connection": 8 * 1024}


class BenchError(RuntimeError):
    """The benchmark could not run as asked (the message says what and how to fix it)."""


# -- /proc sampling ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu, mem = platform.processor() or "", 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    return {"cpu": cpu, "vcpus": os.cpu_count(), "memory_mib": mem, "platform": platform.platform()}


# -- processes --------------------------------------------------------------------------------


def http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Target:
    """One server under test, started as a real process on a loopback port."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, logs: Path, ws_url: str):
        self.name, self.argv, self.env, self.port, self.logs, self.ws_url = name, argv, env, port, logs, ws_url
        self.proc: ManagedProcess | None = None
        self.starts = 0

    def start(self, timeout: float = 60) -> Target:
        self.starts += 1
        log = self.logs / f"{self.name}-{self.starts}.log"
        self.proc = ManagedProcess(self.name, self.argv, log, env=self.env).start()
        self.proc.wait_ready(lambda: http_ok(self.port, "/readyz"), timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.pid is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)


class MetricsSampler(threading.Thread):
    """Samples the gateway's own counters (/metrics) every second into a JSON-lines file next to
    the logs: consumed vs delivered vs Kafka lag shows where a backlog builds up."""

    KEEP = (
        "fleetward_gateway_events_consumed_total",
        "fleetward_gateway_deliveries_total",
        "fleetward_gateway_kafka_lag",
        "fleetward_gateway_connections ",
        "fleetward_gateway_delivery_latency_seconds_sum",
        "fleetward_gateway_delivery_latency_seconds_count",
    )

    def __init__(self, port: int, pid: int, out: Path):
        super().__init__(daemon=True)
        self.port, self.pid, self.out, self.done = port, pid, out, threading.Event()

    def run(self) -> None:
        with self.out.open("a") as f:
            while not self.done.wait(1.0):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                        text = r.read().decode()
                    sample: dict[str, Any] = {"t": round(time.time(), 3), "cpu_s": cpu_seconds(self.pid)}
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith(self.KEEP):
                        name, value = line.rsplit(" ", 1)
                        sample[name] = float(value)
                f.write(json.dumps(sample) + "\n")
                f.flush()


class LoadGen:
    """The Go load generator: JSON commands on stdin, JSON results on stdout. A reader thread
    samples the CPU time of the watched processes the moment a window opens or closes."""

    def __init__(self, binary: Path, target: Target, args: list[str], env: dict[str, str], log: Path, watch: dict):
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(binary), f"--url={target.ws_url}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            preexec_fn=die_with_parent,
        )
        self.watch = watch  # name -> pid, sampled on window_start / window_end
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            msg = json.loads(raw)
            if msg.get("event") in ("window_start", "window_end"):
                msg["cpu"] = {name: cpu_seconds(pid) for name, pid in self.watch.items()}
                msg["monotonic"] = time.monotonic()
            self.lines.put(msg)
        self.lines.put(None)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"loadgen: no {event!r} within {timeout:.0f} s (log: {self.log.name})")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise BenchError(f"loadgen exited with {self.proc.wait()} before {event!r} (log: {self.log.name})")
            if msg.get("event") == "error":
                raise BenchError(f"loadgen: {msg['error']}")
            if msg.get("event") == event:
                return msg

    def quit(self) -> None:
        try:
            self.send(cmd="quit")
            self.expect("bye", 30)
        except (BenchError, BrokenPipeError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


# -- scenarios --------------------------------------------------------------------------------


def measured_load(lg: LoadGen, rate: float, warmup: float, window: float, server: str) -> dict[str, Any]:
    """One load window: the load generator's numbers plus CPU time of each watched process."""
    lg.send(cmd="load", rate=rate, warmup=warmup, duration=window)
    start = lg.expect("window_start", warmup + 60)
    end = lg.expect("window_end", window + 60)
    result = lg.expect("load_result", 120)
    wall = end["monotonic"] - start["monotonic"]
    cpu = {name: round(end["cpu"][name] - start["cpu"][name], 3) for name in start["cpu"]}
    delivered = result["delivered_in_window"]
    server_cpu = cpu[server]
    result.pop("event")
    return {
        **result,
        "cpu_seconds": cpu,
        "server_cores_used": round(server_cpu / wall, 3) if wall > 0 else None,
        "deliveries_per_cpu_second": round(delivered / server_cpu, 1) if server_cpu > 0 else None,
        "p50_ms": result["latency_us"]["p50"] / 1000,
        "p99_ms": result["latency_us"]["p99"] / 1000,
    }


def run_target(target: Target, bins: Path, kafka_pid: int, args: argparse.Namespace, common: list[str], env) -> dict:
    out: dict[str, Any] = {"load_average_before": load_average()}
    target.start()
    lg = None
    sampler = None
    if target.name == "fleetward":
        sampler = MetricsSampler(target.port, target.pid, args.logs / "fleetward-metrics.jsonl")
        sampler.start()
    try:
        time.sleep(2)  # let the process settle (consumer assigned, allocator warm)
        base = rss_bytes(target.pid)
        lg = LoadGen(
            bins / "loadgen",
            target,
            [f"--target={target.name}", f"--conns={args.conns}", f"--session-prefix=s{uuid.uuid4().hex[:6]}", *common],
            env,
            args.logs / f"loadgen-{target.name}.log",
            {target.name: target.pid, "kafka": kafka_pid},
        )
        lg.watch["loadgen"] = lg.proc.pid
        connected = lg.expect("connected", 300)
        connected.pop("event")
        args.event_bytes = connected["event_bytes"]
        out["connect"] = connected
        if connected["ok"] != args.conns:
            raise BenchError(f"{target.name}: only {connected['ok']} of {args.conns} connections opened: {connected}")
        time.sleep(args.settle)
        idle = rss_bytes(target.pid)
        out["idle"] = {
            "connections": connected["ok"],
            "rss_baseline_bytes": base,
            "rss_idle_bytes": idle,
            "bytes_per_connection": round((idle - base) / connected["ok"]),
        }
        print(
            f"  {target.name}: {connected['ok']} connections in {connected['seconds']:.1f} s; "
            f"{out['idle']['bytes_per_connection']} B per idle connection",
            flush=True,
        )
        out["full"] = measured_load(lg, args.rate, args.warmup, args.window, target.name)
        out["full"]["rss_bytes_after"] = rss_bytes(target.pid)
        print(
            f"  {target.name} full ({args.rate:.0f}/s): {out['full']['delivered_per_second']:.0f} delivered/s, "
            f"{out['full']['deliveries_per_cpu_second']} per CPU-second",
            flush=True,
        )
        out["half"] = measured_load(lg, args.rate / 2, args.warmup, args.window, target.name)
        print(
            f"  {target.name} half ({args.rate / 2:.0f}/s): p50 {out['half']['p50_ms']:.2f} ms, "
            f"p99 {out['half']['p99_ms']:.2f} ms",
            flush=True,
        )
    finally:
        if sampler is not None:
            sampler.done.set()
        if lg is not None:
            lg.quit()
        target.stop()
    out["load_average_after"] = load_average()
    return out


def run_resume(target: Target, bins: Path, args: argparse.Namespace, common: list[str], env) -> dict[str, Any]:
    """1,000 clients, a gateway restart, resume with ?since=: time and missed/duplicated events."""
    out: dict[str, Any] = {"load_average_before": load_average(), "clients": args.resume_clients}
    target.start()
    lg = LoadGen(
        bins / "loadgen",
        target,
        [
            "--target=fleetward",
            f"--conns={args.resume_clients}",
            f"--session-prefix=r{uuid.uuid4().hex[:6]}",
            "--reconnect",
            *common,
        ],
        env,
        args.logs / "loadgen-resume.log",
        {},
    )
    try:
        connected = lg.expect("connected", 120)
        if connected["ok"] != args.resume_clients:
            raise BenchError(f"resume: only {connected['ok']} of {args.resume_clients} connections opened")
        lg.send(cmd="produce", rate=args.resume_rate)
        lg.expect("producing", 10)
        lg.send(cmd="wait_positions", timeout=60)
        positions = lg.expect("positions", 90)
        if positions["have"] != positions["of"]:
            raise BenchError(f"resume: only {positions['have']} of {positions['of']} clients got an event")
        time.sleep(2)
        t_term = time.time_ns()
        target.stop(timeout=60)  # SIGTERM: every client gets 1001
        t_exit = time.time_ns()
        target.start()
        t_ready = time.time_ns()
        lg.send(cmd="wait_resumed", timeout=120)
        resumed = lg.expect("resumed", 150)
        time.sleep(3)  # live events after the seam
        lg.send(cmd="stop_produce")
        lg.expect("stopped", 30)
        lg.send(cmd="verify", timeout=60)
        verify = lg.expect("verify", 90)
        # How the new process served the resumes (from its history or read back from Kafka).
        outcomes = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{target.port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("fleetward_gateway_resumes_total{"):
                    outcomes[line.split('outcome="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        resumed.pop("event")
        verify.pop("event")
        last = resumed["last_resume_ns"]
        out.update(
            {
                "produce_rate": args.resume_rate,
                "old_process_exit_s": round((t_exit - t_term) / 1e9, 3),
                "new_process_ready_s": round((t_ready - t_term) / 1e9, 3),
                "all_resumed_after_sigterm_s": round((last - t_term) / 1e9, 3) if last else None,
                "all_resumed_after_ready_s": round((last - t_ready) / 1e9, 3) if last else None,
                "all_caught_up_after_sigterm_s": (
                    round((resumed["caught_up_ns"] - t_term) / 1e9, 3) if resumed["caught_up_ns"] else None
                ),
                "resumed": resumed,
                "verify": verify,
                "resume_outcomes": outcomes,
            }
        )
    finally:
        lg.quit()
        target.stop()
    out["load_average_after"] = load_average()
    return out


# -- report -----------------------------------------------------------------------------------


def summary(run: dict[str, Any]) -> dict[str, Any]:
    fw, cf = run["targets"].get("fleetward"), run["targets"].get("centrifuge")
    s: dict[str, Any] = {}
    if fw and cf:
        s["deliveries_per_core_ratio"] = round(
            fw["full"]["deliveries_per_cpu_second"] / cf["full"]["deliveries_per_cpu_second"], 2
        )
    if fw:
        s["goal_deliveries_per_core_2x_met"] = s.get("deliveries_per_core_ratio", 0) >= 2.0 if cf else None
        s["goal_p99_under_10ms_met"] = fw["half"]["p99_ms"] < GOALS["p99_ms_at_half_load"]
        s["goal_under_8kb_per_idle_connection_met"] = (
            fw["idle"]["bytes_per_connection"] < GOALS["bytes_per_idle_connection"]
        )
    if run.get("resume"):
        v = run["resume"]["verify"]
        s["resume_lossless"] = v["missed"] == 0 and v["duplicates"] == 0 and v["out_of_order"] == 0
    return s


def markdown(run: dict[str, Any]) -> str:
    fw, cf = run["targets"].get("fleetward", {}), run["targets"].get("centrifuge", {})

    def cell(t: dict, *path: str, fmt: str = "{}") -> str:
        v: Any = t
        for p in path:
            if not isinstance(v, dict) or p not in v:
                return "-"
            v = v[p]
        return fmt.format(v) if v is not None else "-"

    st = run["settings"]
    lines = [
        f"Run of {run['date'][:16].replace('T', ' ')} UTC ({run['mode']}), machine: {run['machine']['cpu']}, "
        f"{run['machine']['vcpus']} vCPUs, {run['machine']['memory_mib'] // 1024} GiB, shared with other work.",
        f"Command: `{run['command']}`",
        "",
        f"{st['connections']:,} connections (one session each), events with {st['text_bytes']} bytes of text "
        f"({'-'.join(str(b) for b in st['event_bytes'] or [])} bytes of JSON in all), "
        f"full load {st['rate_full']:,.0f} events/s, half load {st['rate_half']:,.0f} events/s, "
        f"{st['warmup_s']:.0f} s warm-up + {st['window_s']:.0f} s measured window each.",
        *(
            [f"**Experiment, not the `make build` gateway as is**: {st['gateway_binary']} {st['gateway_extra_flags']}."]
            if st.get("gateway_extra_flags") or not st.get("gateway_is_make_build", True)
            else []
        ),
        *([f"**Experiment, anchor flags**: {st['anchor_extra_flags']}."] if st.get("anchor_extra_flags") else []),
        "",
        "| measure | Fleetward gateway | Centrifuge anchor | goal |",
        "|---|---|---|---|",
        f"| delivered messages per CPU-second (server process, full load) | "
        f"{cell(fw, 'full', 'deliveries_per_cpu_second', fmt='{:,.0f}')} | "
        f"{cell(cf, 'full', 'deliveries_per_cpu_second', fmt='{:,.0f}')} | ≥ 2x the anchor |",
        f"| ratio gateway / anchor | **{run['summary'].get('deliveries_per_core_ratio', '-')}** | | ≥ 2 |",
        f"| delivered per second, full load (server cores used) | "
        f"{cell(fw, 'full', 'delivered_per_second', fmt='{:,.0f}')} ({cell(fw, 'full', 'server_cores_used')}) | "
        f"{cell(cf, 'full', 'delivered_per_second', fmt='{:,.0f}')} ({cell(cf, 'full', 'server_cores_used')}) | |",
        f"| p50 / p99 latency at half load, ms | {cell(fw, 'half', 'p50_ms', fmt='{:.2f}')} / "
        f"{cell(fw, 'half', 'p99_ms', fmt='{:.2f}')} | {cell(cf, 'half', 'p50_ms', fmt='{:.2f}')} / "
        f"{cell(cf, 'half', 'p99_ms', fmt='{:.2f}')} | p99 < 10 ms |",
        f"| p99 latency at full load, ms | {cell(fw, 'full', 'p99_ms', fmt='{:.2f}')} | "
        f"{cell(cf, 'full', 'p99_ms', fmt='{:.2f}')} | |",
        f"| RSS per idle connection | {cell(fw, 'idle', 'bytes_per_connection', fmt='{:,} B')} | "
        f"{cell(cf, 'idle', 'bytes_per_connection', fmt='{:,} B')} | < 8 KB |",
        f"| Kafka broker CPU-seconds in the full-load window | {cell(fw, 'full', 'cpu_seconds', 'kafka')} | "
        f"{cell(cf, 'full', 'cpu_seconds', 'kafka')} | |",
        f"| load average before → after | {cell(fw, 'load_average_before')} → {cell(fw, 'load_average_after')} | "
        f"{cell(cf, 'load_average_before')} → {cell(cf, 'load_average_after')} | |",
    ]
    if run.get("resume"):
        r = run["resume"]
        v = r["verify"]
        lines += [
            "",
            f"Resume (gateway only): {r['clients']:,} clients, {r['produce_rate']:,.0f} events/s during the restart. "
            f"SIGTERM → old process gone {r['old_process_exit_s']} s → new process ready "
            f"{r['new_process_ready_s']} s → **all {r['resumed']['resumed']:,} resumed "
            f"{r['all_resumed_after_sigterm_s']} s** after SIGTERM ({r['all_resumed_after_ready_s']} s after "
            f"the new process was ready), every client holding every event produced until then "
            f"{r['all_caught_up_after_sigterm_s']} s after SIGTERM; close codes seen "
            f"{r['resumed']['close_codes']}; resumes served "
            f"{r.get('resume_outcomes', {})}; "
            f"events acked {v['acked']:,}, received {v['received_distinct']:,}, **missed {v['missed']}, "
            f"duplicated {v['duplicates']}, out of order {v['out_of_order']}**. Load average "
            f"{r['load_average_before']} → {r['load_average_after']}.",
        ]
    return "\n".join(lines)


def write_results(run: dict[str, Any]) -> None:
    with RESULTS_JSON.open("a") as f:
        f.write(json.dumps(run) + "\n")
    table = markdown(run)
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else f"# Gateway benchmark\n\n{MD_START}\n{MD_END}\n"
    if MD_START not in text or MD_END not in text:
        raise BenchError(f"{RESULTS_MD} lacks the {MD_START} / {MD_END} markers the table goes between")
    head, rest = text.split(MD_START, 1)
    tail = rest.split(MD_END, 1)[1]
    RESULTS_MD.write_text(f"{head}{MD_START}\n{table}\n{MD_END}{tail}")


# -- main -------------------------------------------------------------------------------------


def warm_up_kafka(kafka: Any, topic: str, rate: float, seconds: float) -> dict[str, Any]:
    """Run the broker at the benchmark's load before any target is measured: events produced
    at `rate` while a consumer reads them with librdkafka's default low-latency fetches. The
    JVM compiles its produce and fetch paths while they run; without this the first target
    measured pays for that compilation in broker CPU competing for the same cores."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    start, cpu0 = time.monotonic(), cpu_seconds(kafka.proc.pid)
    stop = threading.Event()

    def produce() -> None:
        producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 0})
        value, sent, begin = b"x" * (TEXT_BYTES + 300), 0, time.monotonic()
        while not stop.is_set() and time.monotonic() - begin < seconds:
            due = int((time.monotonic() - begin) * rate)
            while sent < due:
                try:
                    producer.produce(topic, key=f"warm-{sent % 1000}".encode(), value=value)
                    sent += 1
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0.005)
        producer.flush(30)

    writer = threading.Thread(target=produce, daemon=True)
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"warm-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    read = 0
    writer.start()
    try:
        while writer.is_alive() and time.monotonic() - start < seconds + 30:
            read += len(consumer.consume(1000, timeout=0.1))
    finally:
        stop.set()
        writer.join(30)
        consumer.close()
    cpu = cpu_seconds(kafka.proc.pid) - cpu0
    return {"messages_read": read, "seconds": round(time.monotonic() - start, 1), "kafka_cpu_s": round(cpu, 2)}


def build_bench_binaries() -> Path:
    proc = subprocess.run([str(REPO / "bench" / "gateway" / "build.sh")], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise BenchError("bench/gateway/build.sh failed (its output is above)")
    return Path(proc.stdout.strip().splitlines()[-1])


def raise_fd_limit(need: int) -> None:
    """Children (servers, load generator) inherit the limit: 10,000 sockets each, plus files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(f"open-file limit: hard limit {hard} < {need} needed for --conns; raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,000 connections, short windows (development)")
    p.add_argument("--conns", type=int, help="connections per target (default 10000; --quick 1000)")
    p.add_argument("--rate", type=float, help="full-load events/s (default 10000; --quick 2000); half load is half")
    p.add_argument("--warmup", type=float, help="seconds of load before each window (default 5; --quick 3)")
    p.add_argument("--window", type=float, help="measured seconds per load (default 20; --quick 8)")
    p.add_argument(
        "--kafka-warm-up", type=float, default=45, help="seconds of broker load before any target (default 45)"
    )
    p.add_argument("--settle", type=float, default=3, help="seconds idle before the RSS sample (default 3)")
    p.add_argument("--resume-clients", type=int, help="clients in the restart scenario (default 1000; --quick 200)")
    p.add_argument("--resume-rate", type=float, help="events/s during the restart (default 1000; --quick 200)")
    p.add_argument("--targets", default="fleetward,centrifuge", help="comma list (default: both)")
    p.add_argument("--no-resume", action="store_true", help="skip the gateway restart scenario")
    p.add_argument("--resume-only", action="store_true", help="run only the gateway restart scenario")
    p.add_argument(
        "--gateway-binary",
        type=Path,
        help="another fleetward-gateway build to measure (experiments; default: the `make build` binary)",
    )
    p.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra gateway flag, e.g. --gateway-arg=--resume-concurrency=32 (experiments; repeatable)",
    )
    p.add_argument(
        "--anchor-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra anchor flag, e.g. --anchor-arg=--history-size=256 (experiments; repeatable)",
    )
    p.add_argument("--write", action="store_true", help="append to docs/bench/gateway.json, update gateway.md")
    args = p.parse_args(argv)
    quick = args.quick
    args.conns = args.conns or (1000 if quick else 10_000)
    args.rate = args.rate or (2000.0 if quick else 10_000.0)
    args.warmup = args.warmup or (3.0 if quick else 5.0)
    args.window = args.window or (8.0 if quick else 20.0)
    args.resume_clients = args.resume_clients or (200 if quick else 1000)
    args.resume_rate = args.resume_rate or (200.0 if quick else 1000.0)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in ("fleetward", "centrifuge"):
            p.error(f"--targets: {t!r} is not fleetward or centrifuge")
    if not 1 <= args.conns <= 15_000:
        p.error(f"--conns={args.conns}: must be between 1 and 15000")
    if not 1 <= args.resume_clients <= 5_000:
        p.error(f"--resume-clients={args.resume_clients}: must be between 1 and 5000")
    if not 0 < args.rate <= 200_000:
        p.error(f"--rate={args.rate}: must be in (0, 200000]")
    command = shlex.join([".venv/bin/python", "bench/gateway_bench.py", *(argv if argv is not None else sys.argv[1:])])

    raise_fd_limit(args.conns + 2048)
    gw_bin = args.gateway_binary or gateway_binary()
    if ("fleetward" in targets or args.resume_only) and not os.access(gw_bin, os.X_OK):
        raise BenchError(f"the gateway binary {gw_bin} is not built; run `hack/build-gateway.sh` (or `make build`)")
    bins = build_bench_binaries()
    run: dict[str, Any] = {
        "benchmark": "gateway vs centrifuge anchor (issue 8 §4)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "command": command,
        "machine": machine(),
        "load_average_at_start": load_average(),
        "settings": {
            "connections": args.conns,
            "text_bytes": TEXT_BYTES,
            "event_size_is": "data.text of TEXT_BYTES; the whole event (Kafka record value) is in event_bytes",
            "event_bytes": None,  # filled from the load generator (sizes at sequence 0 and 100)
            "rate_full": args.rate,
            "rate_half": args.rate / 2,
            "warmup_s": args.warmup,
            "window_s": args.window,
            "partitions": PARTITIONS,
            "sessions_per_connection": 1,
            "gateway_binary": str(gw_bin),
            "gateway_is_make_build": gw_bin == gateway_binary(),
            "gateway_extra_flags": args.gateway_arg,
            "anchor_extra_flags": args.anchor_arg,
            "anchor": "centrifuge v0.40.1, memory broker, no history, franz-go v1.22.3 consumer (bench/gateway/go.mod)",
        },
        "targets": {},
    }
    args.logs = cache_dir() / "logs" / f"gwbench-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    args.logs.mkdir(parents=True, exist_ok=True)
    print(f"gateway benchmark ({run['mode']}): logs in {args.logs}", flush=True)

    cluster = DevCluster.create("gwbench")
    try:
        kafka = cluster.kafka("plain")
        kafka_pid = kafka.proc.pid if kafka.proc else None
        assert kafka_pid is not None
        prefix = f"gwbench-{uuid.uuid4().hex[:8]}"
        topics = {k: f"{prefix}.{k}" for k in ("events", "control", "control-acks", "alerts", "warm-up")}
        kafka.create_topics(*topics.values(), partitions=PARTITIONS)
        run["kafka_warm_up"] = warm_up_kafka(kafka, topics["warm-up"], args.rate, args.kafka_warm_up)
        print(f"kafka warm-up: {run['kafka_warm_up']}", flush=True)
        secret = secrets.token_urlsafe(48)
        env = {**os.environ, "LOADGEN_JWT_SECRET": secret}
        common = [
            f"--kafka-bootstrap={kafka.bootstrap}",
            f"--events-topic={topics['events']}",
            f"--text-bytes={TEXT_BYTES}",
            f"--agent={AGENT}",
            f"--jwt-audience={AUDIENCE}",
            f"--jwt-issuer={ISSUER}",
        ]

        def fleetward_target() -> Target:
            port = free_port()
            argv = [
                str(gw_bin),
                f"--listen=127.0.0.1:{port}",
                f"--kafka-bootstrap={kafka.bootstrap}",
                f"--events-topic={topics['events']}",
                f"--control-topic={topics['control']}",
                f"--control-acks-topic={topics['control-acks']}",
                f"--alerts-topic={topics['alerts']}",
                f"--requests-topic-prefix={prefix}.requests",
                f"--jwt-audience={AUDIENCE}",
                f"--jwt-issuer={ISSUER}",
                "--instance-id=gwbench",
                f"--verify-group-id={prefix}-verify",
                f"--max-connections={args.conns + 100}",
                *args.gateway_arg,
            ]
            gw_env = {**os.environ, "FLEETWARD_GATEWAY_JWT_HS256_SECRET": secret}
            return Target("fleetward", argv, gw_env, port, args.logs, f"ws://127.0.0.1:{port}")

        def centrifuge_target() -> Target:
            port = free_port()
            argv = [
                str(bins / "centrifuge-anchor"),
                f"--listen=127.0.0.1:{port}",
                f"--kafka-bootstrap={kafka.bootstrap}",
                f"--events-topic={topics['events']}",
                f"--jwt-audience={AUDIENCE}",
                f"--jwt-issuer={ISSUER}",
                *args.anchor_arg,
            ]
            cf_env = {**os.environ, "ANCHOR_JWT_HS256_SECRET": secret}
            return Target("centrifuge", argv, cf_env, port, args.logs, f"ws://127.0.0.1:{port}/connection/websocket")

        factories = {"fleetward": fleetward_target, "centrifuge": centrifuge_target}
        for name in [] if args.resume_only else targets:
            print(f"{name}: {args.conns} connections ...", flush=True)
            run["targets"][name] = run_target(factories[name](), bins, kafka_pid, args, common, env)
        if ("fleetward" in targets or args.resume_only) and not args.no_resume:
            print(f"resume: {args.resume_clients} clients, gateway restart ...", flush=True)
            run["resume"] = run_resume(fleetward_target(), bins, args, common, env)
            r = run["resume"]
            print(
                f"  all resumed {r['all_resumed_after_sigterm_s']} s after SIGTERM; missed "
                f"{r['verify']['missed']}, duplicated {r['verify']['duplicates']}",
                flush=True,
            )
    finally:
        cluster.stop()
    run["settings"]["event_bytes"] = getattr(args, "event_bytes", None)
    run["load_average_at_end"] = load_average()
    run["summary"] = summary(run)
    (args.logs / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(markdown(run))
    if args.write:
        write_results(run)
        print(f"wrote {RESULTS_JSON.relative_to(REPO)} and {RESULTS_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop Kafka, servers
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
