"""Periodic housekeeping for the installation, in one background loop rather than
per-object timers (a Kopf timer puts a finalizer on every object it runs for):
- SOP and Guardrail `usedBy`, which changes when Agents change, not only the object;
- trust-bundle keys of Agents that no longer exist (a finalizer removed by force, a
  cleanup that gave up): withdrawn when the Agent was absent in two sweeps in a row, so
  an Agent created between a listing and its first reconcile is never pruned."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fleetward.operator.context import OperatorContext
from fleetward.operator.handlers.references import guardrail_users, write_used_by
from fleetward.operator.kube import KubeError
from fleetward.operator.resolve import selector_matches

log = logging.getLogger("fleetward.operator.housekeeping")


async def _list(ctx: OperatorContext, kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ns in ctx.settings.watch_namespaces or [None]:
        out += await ctx.kube.list(kind, ns)
    return [o for o in out if ctx.settings.owns_namespace(o["metadata"].get("namespace"))]


async def _agents(ctx: OperatorContext) -> list[dict[str, Any]]:
    """The live Agents, reduced to what housekeeping reads (name, namespace, the spec's
    references), listed page by page: at 1000 Agents the whole list is several MB of
    JSON, and holding it parsed raised the operator's peak memory every round."""
    out: list[dict[str, Any]] = []
    for ns in ctx.settings.watch_namespaces or [None]:
        async for page in ctx.kube.list_pages("Agent", ns):
            for a in page:
                meta, spec = a["metadata"], a.get("spec") or {}
                if meta.get("deletionTimestamp") or not ctx.settings.owns_namespace(meta.get("namespace")):
                    continue
                out.append(
                    {
                        "metadata": {"namespace": meta["namespace"], "name": meta["name"]},
                        "spec": {k: spec[k] for k in ("sopSelector", "guardrailRefs") if k in spec},
                    }
                )
    return out


async def sweep(ctx: OperatorContext, absent_before: set[str]) -> set[str]:
    """One round; returns the Agents missing from the trust bundle's owners this time."""
    agents = await _agents(ctx)
    by_ns: dict[str, list[dict[str, Any]]] = {}
    for a in agents:
        by_ns.setdefault(a["metadata"]["namespace"], []).append(a)
    for sop in await _list(ctx, "SOP"):
        ns, labels = sop["metadata"]["namespace"], sop["metadata"].get("labels")
        users = sorted(
            a["metadata"]["name"] for a in by_ns.get(ns, []) if selector_matches(a["spec"].get("sopSelector"), labels)
        )
        await write_used_by(ctx, "SOP", sop, users)
    for guardrail in await _list(ctx, "Guardrail"):
        ns, name = guardrail["metadata"]["namespace"], guardrail["metadata"]["name"]
        users = sorted(a["metadata"]["name"] for a in guardrail_users(by_ns.get(ns, []), name))
        await write_used_by(ctx, "Guardrail", guardrail, users)

    existing = {f"{a['metadata']['namespace']}/{a['metadata']['name']}" for a in agents}
    bundle = await ctx.bundle.load()
    absent = {agent for agent in bundle if agent not in existing}
    for agent in absent & absent_before:
        log.warning("withdrawing the trust-bundle key of %s: the Agent no longer exists", agent)
        await ctx.bundle.withdraw(agent)
    return absent


async def keep_house(ctx: OperatorContext) -> None:
    interval = max(15.0, min(60.0, ctx.settings.resync_seconds / 4))
    absent: set[str] = set()
    while True:
        await asyncio.sleep(interval)
        try:
            if not await ctx.acting():
                absent = set()  # two sweeps in a row of this replica's own, when it acts again
                continue
            absent = await sweep(ctx, absent)
        except KubeError as e:
            log.warning("housekeeping failed (next round in %.0f s): %s", interval, e)
