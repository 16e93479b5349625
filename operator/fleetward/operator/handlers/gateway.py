"""The installation's gateway: applied at start-up and re-applied every resync (level-based:
a deleted or edited gateway Deployment comes back). It belongs to the installation, not
to any custom resource, so a background task does it rather than a resource handler."""

from __future__ import annotations

import asyncio
import logging

from fleetward.operator.context import OperatorContext
from fleetward.operator.desired.gateway import desired_gateway
from fleetward.operator.kube import KubeError

log = logging.getLogger("fleetward.operator.gateway")

STANDBY_CHECK_SECONDS = 5.0
"""How often a standby replica checks whether it acts now (a takeover applies within that)."""


async def apply_gateway(ctx: OperatorContext) -> None:
    objects, absent = desired_gateway(ctx.settings)
    for obj in objects:
        await ctx.kube.apply(obj)
    for kind, name in absent:
        await ctx.kube.delete(kind, ctx.settings.namespace, name)


async def keep_gateway(ctx: OperatorContext) -> None:
    """Runs until cancelled; retries with backoff while the API server refuses."""
    delay = 1.0
    applied_once = False
    while True:
        try:
            if not await ctx.acting():
                await asyncio.sleep(STANDBY_CHECK_SECONDS)
                continue
            await apply_gateway(ctx)
            if not applied_once:
                log.info("gateway %s/%s applied", ctx.settings.namespace, ctx.settings.gateway.name)
                applied_once = True
            delay = 1.0
            await asyncio.sleep(ctx.settings.resync_seconds)
        except KubeError as e:
            log.warning("applying the gateway failed (retry in %.0f s): %s", delay, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60)
