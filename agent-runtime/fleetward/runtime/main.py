"""`fleetward runtime run`: one agent runtime process, driven by its rendered config.

It serves /healthz (alive), /readyz (config, key and Kafka usable) and /metrics on the
pod IP, runs the agent (intake -> graph -> events, control) and stops on SIGTERM within
the pod's grace period: no new work, runs in flight stop at their next step boundary
(checkpointed, their requests left uncommitted), then Kafka and the database are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web
from fleetward.runtime.alerts import AlertPublisher
from fleetward.runtime.arguments import add_arguments  # noqa: F401 - `main.add_arguments` as before
from fleetward.runtime.audit import RuntimeAudit
from fleetward.runtime.budget import DailyBudget, DailyTokenLedger
from fleetward.runtime.config import (
    ConfigError,
    ProcessSettings,
    SigningKey,
    kafka_client_config,
    load_config,
    load_model_api_key,
    load_pii_hash_key,
    load_signing_key,
    model_prices,
    process_settings,
)
from fleetward.runtime.context import Services
from fleetward.runtime.control import Control
from fleetward.runtime.events import EventPublisher
from fleetward.runtime.graphs.router import TopicDirectory, build_router
from fleetward.runtime.graphs.specialist import build_specialist, chat_models
from fleetward.runtime.guardrails.engine import GuardrailEngine
from fleetward.runtime.intake import Intake
from fleetward.runtime.kafka import AsyncProducer
from fleetward.runtime.memory import LongTermMemory, open_memory_store
from fleetward.runtime.persistence import Persistence, open_persistence
from fleetward.runtime.resilience import RetryBudgets
from fleetward.runtime.retrieval import SopRetriever
from fleetward.runtime.review import ReviewTimer
from fleetward.runtime.runs import RunExecutor, RunRegistry
from fleetward.runtime.telemetry import TracedGuardrails, setup_logging, setup_tracing, shutdown_tracing
from fleetward.runtime.tools import ToolHttpClient
from langgraph.store.base import BaseStore
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from fleetward.api.runtimeconfig import RuntimeConfig

log = logging.getLogger("fleetward.runtime")
READY = Gauge("fleetward_runtime_ready", "1 when the runtime is ready to take work.", ["agent"])


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


def check_kafka(client_config: dict[str, str], topic: str, admin: Any = None) -> str | None:
    """None when the broker answers and the agent's request topic exists. `admin`: an
    AdminClient to ask (watch_kafka keeps one: a new client per check costs ~50 ms of
    CPU for its threads and connections, every 10 s)."""
    from confluent_kafka.admin import AdminClient

    try:
        client = admin if admin is not None else AdminClient({**client_config, "socket.timeout.ms": 3000})
        md = client.list_topics(topic=topic, timeout=3)
    except Exception as e:  # KafkaException on timeout or auth failure
        return f"Kafka unreachable: {e}"
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return f"request topic {topic} is not available: {t.error if t else 'missing'}"
    return None


async def serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    key = load_signing_key(config)
    load_pii_hash_key(config)  # a missing key stops the start here, not at the first run
    kafka_config = kafka_client_config(config)
    settings = process_settings(config)
    agent = config.agent.ref
    setup_tracing(settings.instance, agent)
    readiness = Readiness()
    readiness.checks.update({"persistence": "not open yet", "intake": "not started", "control": "not subscribed"})
    log.info("runtime for agent %s starting (config %s, key %s)", agent, config.config_hash, key.key_id)
    runner = await start_server(args, config, readiness)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def watch_kafka() -> None:
        from confluent_kafka.admin import AdminClient

        # One client for every check; it reconnects by itself when the broker comes back.
        try:
            admin: Any = AdminClient({**kafka_config, "socket.timeout.ms": 3000})
        except Exception:  # an unusable config: each check makes its own and reports why
            admin = None
        delay = 1.0
        while not stop.is_set():
            problem = await asyncio.to_thread(check_kafka, kafka_config, config.topics.request, admin)
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
    try:
        async with (
            open_persistence(settings.database_dsn, settings.sqlite_path) as persistence,
            open_memory_store(settings.database_dsn, settings.sqlite_path) as memory_store,
        ):
            readiness.checks["persistence"] = None
            log.info("persistence: %s", persistence.backend)
            await run_agent(config, key, kafka_config, settings, persistence, readiness, stop, memory_store)
    finally:
        started = time.monotonic()
        readiness.stopping = True
        READY.labels(agent).set(0)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await runner.cleanup()
        shutdown_tracing()
        log.info("stopped in %.2f s", time.monotonic() - started)
    return 0


async def start_server(args: argparse.Namespace, config: RuntimeConfig, readiness: Readiness) -> web.AppRunner:
    agent = config.agent.ref

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
    return runner


async def run_agent(
    config: RuntimeConfig,
    key: SigningKey,
    kafka_config: dict[str, str],
    settings: ProcessSettings,
    persistence: Persistence,
    readiness: Readiness,
    stop: asyncio.Event,
    memory_store: BaseStore | None = None,
) -> None:
    """Intake, control and the graph until `stop`; then a bounded, orderly shutdown."""
    agent = config.agent.ref
    producer = AsyncProducer(kafka_config, client_id=f"{config.kafka.consumer_group}.{settings.instance}")
    tool_client = ToolHttpClient()
    audit: RuntimeAudit | None = None
    pii_hash_key = load_pii_hash_key(config)
    try:
        engine = (
            TracedGuardrails(
                GuardrailEngine(
                    [g.spec for g in config.guardrails],
                    names=[g.name for g in config.guardrails],
                    hash_key=pii_hash_key,
                )
            )
            if config.guardrails
            else None
        )
        retriever = SopRetriever(config.sops, config.spec.sop_retrieval.similarity_threshold)
        await asyncio.to_thread(retriever.warm_up)
        prices = model_prices(config)
        unpriced = [m.name for m in [config.spec.model, *(config.spec.model.fallbacks or [])] if m.name not in prices]
        if unpriced:
            log.warning("no price for model(s) %s: their cost is not recorded", ", ".join(sorted(set(unpriced))))
        audit = await RuntimeAudit.open(config, settings, kafka_config, key.key_id, engine)
        token_ledger = await open_token_ledger(config, persistence)
        services = Services(
            config=config,
            events=EventPublisher(
                producer, persistence.ledger, config.topics.events, agent, alerts_topic=config.topics.alerts
            ),
            ledger=persistence.ledger,
            signing_key=key,
            guardrails=engine,
            retriever=retriever,
            prices=prices,
            audit=audit,
            retry_budgets=RetryBudgets(),
            token_ledger=token_ledger,
            alerts=AlertPublisher(producer, config.topics.alerts, agent),
            memory=LongTermMemory(memory_store, agent) if memory_store is not None else None,
            pii_hash_key=pii_hash_key,
        )

        async def send(topic: str, value: str, key: str, headers: dict[str, str] | None = None) -> None:
            await producer.send(topic, value, key=key, headers=headers)

        (primary, _), *fallbacks = chat_models(config, load_model_api_key)
        if config.spec.role == "router":
            graph = build_router(
                services,
                primary,
                persistence.checkpointer,
                fallbacks=[model for model, _ in fallbacks],
                topics=TopicDirectory(kafka_config),
                send=send,
            )
        else:
            graph = build_specialist(
                services, primary, tool_client, persistence.checkpointer, fallbacks=[model for model, _ in fallbacks]
            )
        registry = RunRegistry()
        executor = RunExecutor(services, graph, registry)
        intake = Intake(
            kafka_config,
            topic=config.topics.request,
            group=config.kafka.consumer_group,
            dlq_topic=config.topics.dlq,
            instance=settings.instance,
            executor=executor,
            registry=registry,
            producer=producer,
        )
        intake.shutdown_timeout = settings.shutdown_seconds
        control = Control(
            kafka_config,
            services=services,
            intake=intake,
            registry=registry,
            producer=producer,
            instance=settings.instance,
            group_prefix=config.kafka.consumer_group,
        )
        timer = ReviewTimer(services, send, config.topics.request)
        await control.recover()  # before intake: a runtime restarted under a kill switch stays halted
        tasks = [
            asyncio.create_task(intake.run(), name="intake"),
            asyncio.create_task(control.run(), name="control"),
            asyncio.create_task(timer.run(intake.stopping), name="review-timer"),
        ]
        readiness.checks["intake"] = None

        async def control_ready() -> None:
            await control.ready.wait()
            readiness.checks["control"] = None

        ready_task = asyncio.create_task(control_ready())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                log.error("%s ended: %r", t.get_name(), t.exception())
        log.info(
            "stopping: no new work; runs in flight finish their current step (at most %.0f s)",
            settings.shutdown_seconds,
        )
        readiness.stopping = True
        intake.stopping.set()
        control.stopping.set()
        ready_task.cancel()
        stopper.cancel()
        await asyncio.wait(tasks, timeout=settings.shutdown_seconds + 10)
    finally:
        await tool_client.close()
        if audit is not None:
            await audit.close()
        undelivered = await asyncio.to_thread(producer.close)
        if undelivered:
            log.error("%d Kafka records were not delivered before shutdown", undelivered)


async def open_token_ledger(config: RuntimeConfig, persistence: Persistence) -> DailyTokenLedger | None:
    """The Agent's daily token ledger in the runtime's database (PostgreSQL: one budget for
    every replica; SQLite: this pod's own), set up; None when no `dailyTokenBudget` is set."""
    budget = DailyBudget.from_config(config)
    if budget is None:
        return None
    ledger = DailyTokenLedger.from_persistence(persistence, budget)
    await ledger.setup()
    usage = await ledger.usage(budget.agent)  # also sets fleetward_budget_utilization_ratio
    log.info(
        "daily token budget: %d of %d used today (%s ledger%s)",
        usage.used,
        usage.limit,
        persistence.backend,
        ", shared by every replica" if ledger.shared else ", this pod only",
    )
    return ledger


def run(args: argparse.Namespace) -> int:
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    if args.config is None:
        print("error: no config: pass --config PATH or set FLEETWARD_CONFIG", file=sys.stderr)
        return 2
    try:
        if args.check:
            config = load_config(args.config)
            load_signing_key(config)
            load_pii_hash_key(config)
            for index in range(1 + len(config.spec.model.fallbacks or [])):
                load_model_api_key(config, index)
            kafka_client_config(config)
            process_settings(config)
            print(f"config {args.config} is valid (agent {config.agent.ref}, hash {config.config_hash})")
            return 0
        return asyncio.run(serve(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
