"""Periodic housekeeping for the installation, in one background loop rather than
per-object timers (a Kopf timer puts a finalizer on every object it runs for):
- SOP and Guardrail `usedBy`, which changes when Agents change, not only the object;
- trust-bundle keys of Agents that no longer exist (a finalizer removed by force, a
  cleanup that gave up): withdrawn when the Agent was absent in two sweeps in a row, so
  an Agent created between a listing and its first reconcile is never pruned;
- in SCRAM mode, the same for their Kafka principals (SCRAM login and ACLs): a credential
  outliving its Agent is one nobody is watching."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fleetward.operator.context import OperatorContext
from fleetward.operator.desired.agent import kafka_principal
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
    """One round; returns what was absent this time: Agents ("ns/name") with a trust-bundle
    key, and Kafka principals ("kafka:<principal>") in SCRAM mode."""
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
    if ctx.settings.kafka.principals_managed:
        try:
            absent |= await _sweep_principals(ctx, agents, absent_before)
        except Exception as e:  # Kafka trouble must not stop the rest of housekeeping
            log.warning("sweeping Kafka principals failed (next round retries): %s", e)
    return absent


async def _sweep_principals(ctx: OperatorContext, agents: list[dict[str, Any]], absent_before: set[str]) -> set[str]:
    live = {kafka_principal(a["metadata"]["namespace"], a["metadata"]["name"]) for a in agents}
    orphans = {f"kafka:{p}" for p in await ctx.kafka.agent_principals() if p not in live and _served(ctx, p)}
    for key in sorted(orphans & absent_before):
        principal = key.removeprefix("kafka:")
        log.warning("deleting the Kafka login and ACLs of %s: its Agent no longer exists", principal)
        await ctx.kafka.delete_principal(principal)
    return orphans


def _served(ctx: OperatorContext, principal: str) -> bool:
    """Whether the Agent a principal belongs to would be this installation's (a Kafka
    cluster may be shared by several installations, each sweeping its own namespaces)."""
    parts = principal.split(".")  # fleetward.<namespace>.<agent>: neither name has dots
    if len(parts) != 3 or kafka_principal(parts[1], parts[2]) != principal:
        return False
    ns = parts[1]
    watched = not ctx.settings.watch_namespaces or ns in ctx.settings.watch_namespaces
    return watched and ctx.settings.owns_namespace(ns)


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
