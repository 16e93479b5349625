"""Operator start-up and shutdown: Kopf settings, the shared context, the shared topics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from fleetward.operator.context import OperatorContext
from fleetward.operator.handlers import indexes
from fleetward.operator.handlers.gateway import keep_gateway
from fleetward.operator.handlers.housekeeping import keep_house
from fleetward.operator.kafka import KafkaUnavailable
from fleetward.operator.metrics import register_agents_by_phase, register_kill_switches_active
from fleetward.operator.peering import Peering
from fleetward.operator.settings import OperatorSettings
from prometheus_client import REGISTRY

log = logging.getLogger("fleetward.operator")


async def ensure_shared_topics(ctx: OperatorContext) -> None:
    """Create the shared topics, retrying with backoff while Kafka is unreachable: the
    operator keeps reconciling meanwhile and reports Kafka trouble on the Agents."""
    delay = 1.0
    while True:
        try:
            await ctx.kafka.ensure_topics(
                ctx.settings.topics.shared(),
                ctx.settings.kafka.shared_topic_partitions,
                {ctx.settings.topics.audit: {"retention.ms": str(ctx.settings.kafka.audit_topic_retention_ms)}},
            )
            ctx.shared_topics_ready.set()
            log.info("shared topics ready: %s", ", ".join(ctx.settings.topics.shared()))
            return
        except KafkaUnavailable as e:
            log.warning("Kafka unavailable, shared topics not created yet (retry in %.0f s): %s", delay, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60)


PEERING_CHECK_SECONDS = 5.0
"""How often every replica re-reads the peering decision, whatever its loops do: a change
(another replica acted meanwhile) makes it distrust the statuses it remembers writing."""


async def follow_peering(ctx: OperatorContext) -> None:
    """Kopf pauses and resumes the handlers on its own; the background loops ask only at
    their next round (housekeeping's is up to a minute). This loop notices a change within
    PEERING_CHECK_SECONDS; a handler resumed inside that window may still skip one write,
    which the next reconcile of that Agent (at the latest the drift timer's) then makes."""
    while True:
        await asyncio.sleep(PEERING_CHECK_SECONDS)
        try:
            await ctx.acting()  # on an API error it logs and keeps its last decision
        except Exception as e:  # the loop must outlive any one failed read
            log.warning("could not check the peering decision: %s", e)


def register(settings: OperatorSettings) -> None:
    indexes.register(settings)

    @kopf.on.startup(id="configure")
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Progress and diff-base in annotations: the CRDs' status schemas have no room for
        # Kopf's own status fields (they would be pruned), and annotations survive restarts.
        # Per installation, so side-by-side installations sharing a KillSwitch each run
        # their own handlers (Kopf ignores other operators' prefixes in its diffs).
        prefix = memo.settings.kopf_prefix
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix)
        settings.persistence.finalizer = memo.settings.finalizer
        # Events for what a person should see (transitions, errors), not every handler run.
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.batching.error_delays = (1, 2, 5, 10, 30, 60)
        # How long Kopf waits for its own annotation patch to come back before it handles
        # an older event of the same object. With 1000 Agents applied at once that patch
        # took longer than the default 5 s, and Kopf ran ~300 creation handlers twice.
        settings.persistence.consistency_timeout = 30.0
        memo.ctx = await OperatorContext.create(memo.settings)
        if memo.get("peer") is not None:
            namespaces = None if memo.settings.clusterwide else memo.settings.watch_namespaces
            memo.ctx.peering = Peering.of(memo.ctx.kube, memo.peer, memo.settings.peering, namespaces)
            memo.peering_task = asyncio.create_task(follow_peering(memo.ctx))
        ctx = memo.ctx
        memo.agents_metric = register_agents_by_phase(
            lambda: [state.status.get("phase") for state in list(ctx.statuses.values())],
            lambda: ctx.peering.acting if ctx.peering is not None else True,
        )
        memo.switches_metric = register_kill_switches_active(ctx.bundle.view.engaged)
        memo.topics_task = asyncio.create_task(ensure_shared_topics(memo.ctx))
        memo.housekeeping_task = asyncio.create_task(keep_house(memo.ctx))
        if memo.settings.gateway.enabled:
            memo.gateway_task = asyncio.create_task(keep_gateway(memo.ctx))

    @kopf.on.cleanup(id="shutdown")
    async def shutdown(memo: kopf.Memo, **_: Any) -> None:
        for name in ("topics_task", "gateway_task", "housekeeping_task", "peering_task"):
            task = memo.get(name)
            if task:
                task.cancel()
        for name in ("agents_metric", "switches_metric"):
            if memo.get(name) is not None:
                REGISTRY.unregister(memo[name])
        ctx = memo.get("ctx")
        if ctx is not None:
            await ctx.close()
