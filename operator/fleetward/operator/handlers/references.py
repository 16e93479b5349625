"""SOP and Guardrail handlers: a change re-reconciles exactly the Agents that use the
object (found through the indexes, not by listing everything), which rolls exactly
their pods (the config hash changes); the object's status lists `usedBy`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from fleetward.operator import conditions as c
from fleetward.operator.conditions import Cond
from fleetward.operator.context import OperatorContext
from fleetward.operator.handlers.indexes import GROUP, VERSION, references
from fleetward.operator.kube import KubeError
from fleetward.operator.metrics import reconcile_measured
from fleetward.operator.reconcile import reconcile_agent
from fleetward.operator.resolve import selector_matches
from fleetward.operator.settings import OperatorSettings

log = logging.getLogger("fleetward.operator.references")


def sop_users(agents: list[dict[str, Any]], sop_name: str, sop_labels: dict[str, str] | None) -> list[dict]:
    """Agents whose selector matches the SOP now, or that resolved it last time (so a
    relabelled or deleted SOP also leaves the Agents that had it)."""
    out = []
    for agent in agents:
        resolved = {s.split("@", 1)[0] for s in (agent.get("status") or {}).get("resolvedSOPs") or []}
        if selector_matches(agent["spec"].get("sopSelector"), sop_labels) or sop_name in resolved:
            out.append(agent)
    return out


def guardrail_users(agents: list[dict[str, Any]], name: str) -> list[dict]:
    return [a for a in agents if any(r.get("name") == name for r in a["spec"].get("guardrailRefs") or [])]


async def _reconcile_users(ctx: OperatorContext, users: list[dict], namespace: str, indexes: dict) -> None:
    refs = references(namespace, indexes)
    results = await asyncio.gather(*(reconcile_agent(ctx, a, refs) for a in users), return_exceptions=True)
    for agent, result in zip(users, results, strict=True):
        if isinstance(result, Exception):  # the Agent's own retries and timer pick it up again
            log.warning("re-reconciling Agent %s/%s failed: %s", namespace, agent["metadata"]["name"], result)


def _used_by_essence(status: dict[str, Any]) -> tuple:
    conds = [(x["type"], x["status"], x["message"]) for x in status.get("conditions") or []]
    return status.get("observedGeneration"), status.get("usedBy"), conds


async def write_used_by(ctx: OperatorContext, kind: str, body: kopf.Body, users: list[str]) -> None:
    gen = body["metadata"].get("generation")
    old = dict(body.get("status") or {})
    n = len(users)
    msg = f"Used by {n} Agent(s): {', '.join(users)}." if users else "No Agent uses it yet."
    ready = Cond(c.READY, True, "Accepted", f"Valid and available to Agents. {msg}")
    status = {"observedGeneration": gen, "usedBy": users, "conditions": c.merge(old.get("conditions"), [ready], gen)}
    if _used_by_essence(status) == _used_by_essence(old):
        return
    try:
        await ctx.kube.patch_status(kind, body["metadata"]["namespace"], body["metadata"]["name"], status)
    except KubeError as e:
        if e.status != 404:
            raise


def register(settings: OperatorSettings) -> None:
    def owned(namespace: str | None, **_: Any) -> bool:
        return settings.owns_namespace(namespace)

    @kopf.on.resume(GROUP, VERSION, "sops", when=owned, backoff=5, id="sop_changed")
    @kopf.on.create(GROUP, VERSION, "sops", when=owned, backoff=5, id="sop_changed")
    @kopf.on.update(GROUP, VERSION, "sops", when=owned, backoff=5, id="sop_changed")
    @kopf.on.delete(GROUP, VERSION, "sops", when=owned, optional=True, id="sop_changed")
    async def sop_changed(
        body: kopf.Body, name: str, namespace: str, labels: kopf.Labels, reason: str, memo: kopf.Memo, **kwargs: Any
    ) -> None:
        with reconcile_measured("SOP"):
            agents = list(kwargs["agents_by_namespace"].get(namespace, []))
            users = sop_users(agents, name, dict(labels))
            if reason != "resume":  # at start every Agent is reconciled anyway
                await _reconcile_users(memo.ctx, users, namespace, kwargs)
            if reason != "delete":
                selected = [
                    a["metadata"]["name"]
                    for a in agents
                    if selector_matches(a["spec"].get("sopSelector"), dict(labels))
                ]
                await write_used_by(memo.ctx, "SOP", body, sorted(selected))

    @kopf.on.resume(GROUP, VERSION, "guardrails", when=owned, backoff=5, id="guardrail_changed")
    @kopf.on.create(GROUP, VERSION, "guardrails", when=owned, backoff=5, id="guardrail_changed")
    @kopf.on.update(GROUP, VERSION, "guardrails", when=owned, backoff=5, id="guardrail_changed")
    @kopf.on.delete(GROUP, VERSION, "guardrails", when=owned, optional=True, id="guardrail_changed")
    async def guardrail_changed(
        body: kopf.Body, name: str, namespace: str, reason: str, memo: kopf.Memo, **kwargs: Any
    ) -> None:
        with reconcile_measured("Guardrail"):
            agents = list(kwargs["agents_by_namespace"].get(namespace, []))
            users = guardrail_users(agents, name)
            if reason != "resume":
                await _reconcile_users(memo.ctx, users, namespace, kwargs)
            if reason != "delete":
                await write_used_by(memo.ctx, "Guardrail", body, sorted(a["metadata"]["name"] for a in users))
