"""`fleetward runtime run`: one agent runtime process, driven by its rendered config.

It serves /healthz (alive), /readyz (config, key and Kafka usable) and /metrics on the
pod IP, and stops on SIGTERM within the pod's grace period. The agent graphs plug in
here (intake, graphs, events, control) as they are built.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web
from fleetward.runtime.config import ConfigError, kafka_client_config, load_config, load_signing_key
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

log = logging.getLogger("fleetward.runtime")
READY = Gauge("fleetward_runtime_ready", "1 when the runtime is ready to take work.", ["agent"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("FLEETWARD_CONFIG"),
        help="rendered runtime config (default: $FLEETWARD_CONFIG)",
    )
    p.add_argument(
        "--listen",
        default=None,
        help="HOST:PORT for /healthz, /readyz, /metrics (default: $POD_IP and the config's server.port)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and credentials, then exit")


class Readiness:
    """What /readyz reports: every check must pass."""

    def __init__(self) -> None:
        self.checks: dict[str, str | None] = {"config": None, "signingKey": None, "kafka": "not checked yet"}
        self.stopping = False

    @property
    def ready(self) -> bool:
        return not self.stopping and all(v is None for v in self.checks.values())

    def problems(self) -> dict[str, str]:
        out = {k: v for k, v in self.checks.items() if v is not None}
        if self.stopping:
            out["shutdown"] = "stopping"
        return out


def check_kafka(client_config: dict[str, str], topic: str) -> str | None:
    """None when the broker answers and the agent's request topic exists."""
    from confluent_kafka.admin import AdminClient

    try:
        md = AdminClient({**client_config, "socket.timeout.ms": 3000}).list_topics(topic=topic, timeout=3)
    except Exception as e:  # KafkaException on timeout or auth failure
        return f"Kafka unreachable: {e}"
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return f"request topic {topic} is not available: {t.error if t else 'missing'}"
    return None


async def serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    key = load_signing_key(config)
    kafka_config = kafka_client_config(config)
    agent = config.agent.ref
    readiness = Readiness()
    log.info("runtime for agent %s starting (config %s, key %s)", agent, config.config_hash, key.key_id)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "agent": agent})

    async def readyz(_: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"ready": True, "agent": agent, "configHash": config.config_hash})
        return web.json_response({"ready": False, "problems": readiness.problems()}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = os.environ.get("POD_IP", "127.0.0.1"), config.server.port
    if args.listen:
        h, _, p = args.listen.rpartition(":")
        host, port = h or host, int(p)
    await web.TCPSite(runner, host, port).start()
    log.info("serving /healthz /readyz /metrics on %s:%d", host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_kafka() -> None:
        delay = 1.0
        while not stop.is_set():
            problem = await asyncio.to_thread(check_kafka, kafka_config, config.topics.request)
            if problem != readiness.checks["kafka"]:
                log.info("kafka check: %s", problem or "ok")
            readiness.checks["kafka"] = problem
            READY.labels(agent).set(1 if readiness.ready else 0)
            delay = 10.0 if problem is None else min(delay * 2, 10.0)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass

    watcher = asyncio.create_task(watch_kafka())
    await stop.wait()
    started = time.monotonic()
    readiness.stopping = True
    READY.labels(agent).set(0)
    log.info("SIGTERM: stopping (no run in flight)")
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    await runner.cleanup()
    log.info("stopped in %.2f s", time.monotonic() - started)
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format='{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","message":"%(message)s"}',
    )
    if args.config is None:
        print("error: no config: pass --config PATH or set FLEETWARD_CONFIG", file=sys.stderr)
        return 2
    try:
        if args.check:
            config = load_config(args.config)
            load_signing_key(config)
            kafka_client_config(config)
            print(f"config {args.config} is valid (agent {config.agent.ref}, hash {config.config_hash})")
            return 0
        return asyncio.run(serve(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
