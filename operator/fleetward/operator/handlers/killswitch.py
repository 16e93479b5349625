"""KillSwitch handlers (cluster-scoped): engage and release are level-based, like every
reconcile here: whatever woke the handler (create, update, operator start), the switch's
spec and status say what is left to do. Deleting an engaged switch waits for a release
(the admission webhook refuses the delete; this finalizer is the backstop), so a delete
can never bypass the two-person rule."""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import replace
from typing import Any

import kopf
from fleetward.operator.context import OperatorContext
from fleetward.operator.handlers.indexes import GROUP, VERSION, references, switches
from fleetward.operator.killswitch import scope
from fleetward.operator.killswitch.engage import acknowledge_edit, engage, same_engagement
from fleetward.operator.killswitch.release import release, resume_pending, retry_resume
from fleetward.operator.killswitch.scope import affected, agent_id, halts_for, is_engaged
from fleetward.operator.metrics import reconcile_measured
from fleetward.operator.reconcile import reconcile_agent
from fleetward.operator.settings import OperatorSettings

log = logging.getLogger("fleetward.operator.killswitch")


def _all_agents(indexes: dict[str, Any]) -> list[dict[str, Any]]:
    index = indexes["agents_by_namespace"]
    return [a for ns in list(index) for a in index.get(ns, [])]


def _plain(body: kopf.Body) -> dict[str, Any]:
    return copy.deepcopy({k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")})


async def reconcile_switch(ctx: OperatorContext, switch: dict[str, Any], indexes: dict[str, Any]) -> None:
    meta, status = switch["metadata"], switch.get("status") or {}
    name, gen = meta["name"], int(meta.get("generation") or 1)
    agents = _all_agents(indexes)
    covered = affected(switch, agents)
    others = [s for s in switches(indexes["killswitches"]) if s["metadata"]["name"] != name]

    async def reconcile_agents(current: dict[str, Any]) -> None:
        """Reconcile the covered Agents against the switch as it is now (the index may not
        have seen our last status write yet)."""
        world = [*others, current]
        results = await asyncio.gather(
            *(
                reconcile_agent(ctx, a, replace(references(a["metadata"]["namespace"], indexes), switches=world))
                for a in covered
            ),
            return_exceptions=True,
        )
        failed = [
            f"{agent_id(a)}: {r if isinstance(r, Exception) else r.problem}"
            for a, r in zip(covered, results, strict=True)
            if isinstance(r, Exception) or r.retry_after is not None
        ]
        if failed:
            raise kopf.TemporaryError(f"{len(failed)} agent(s) not settled yet: {'; '.join(failed[:5])}", delay=2)

    if not covered and not scope.answers_for(ctx.settings, switch):
        return  # another installation's switch: we obey it (Agent reconciles read it) but do not report
    if is_engaged(switch):
        await ctx.audit.approvals(switch)
        if status.get("phase") == "Drained" and same_engagement(switch):
            # Engaged and drained: an edit now (an approval, a new reason) must not engage
            # again, which would overwrite the drain's record and halt parked runs twice.
            if status.get("observedGeneration") != gen:
                await acknowledge_edit(ctx, switch)
            return
        await engage(ctx, switch, covered, reconcile_agents)
        kopf.event(
            switch,
            type="Warning",
            reason="Engaged",
            message=f"Engaged by {switch['status'].get('engagedBy')}: {len(covered)} agent(s) halted, "
            f"credentials revoked in {switch['status'].get('revocationSeconds')} s, "
            f"drained in {switch['status'].get('drainSeconds')} s.",
        )
    elif status.get("phase") in ("Engaging", "Engaged", "Drained"):
        still = [a for a in covered if halts_for(others, a["metadata"]["namespace"], a["metadata"].get("labels"))]
        freed = [a for a in covered if a not in still]
        await release(ctx, switch, freed, still, reconcile_agents)
        kopf.event(switch, type="Normal", reason="Released", message=switch["status"]["conditions"][0]["message"])
    elif status.get("phase") == "Released" and resume_pending(switch):
        still = [a for a in covered if halts_for(others, a["metadata"]["namespace"], a["metadata"].get("labels"))]
        await retry_resume(ctx, switch, [a for a in covered if a not in still], still)
    elif status.get("phase") == "Released":
        # Released before (a second release, or an edit of a released switch): nothing to undo.
        if status.get("observedGeneration") != gen:
            await ctx.kube.patch_status("KillSwitch", None, name, {"observedGeneration": gen})
    elif status.get("observedGeneration") != gen:
        await ctx.kube.patch_status(
            "KillSwitch",
            None,
            name,
            {
                "observedGeneration": gen,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Disengaged",
                        "message": "Staged and not engaged; set spec.engaged: true (with a reason) to stop "
                        "the agents it covers.",
                        "lastTransitionTime": meta.get("creationTimestamp"),
                        "observedGeneration": gen,
                    }
                ],
            },
        )


def involves(settings: OperatorSettings, switch: dict[str, Any], indexes: dict[str, Any]) -> bool:
    """scope.involves over the handler's index kwargs."""
    return scope.involves(settings, switch, _all_agents(indexes))


def register(settings: OperatorSettings) -> None:
    def mine(body: kopf.Body, **kwargs: Any) -> bool:
        return involves(settings, _plain(body), kwargs)  # kwargs hold the indexes

    @kopf.on.resume(GROUP, VERSION, "killswitches", backoff=2, id="killswitch_changed", when=mine)
    @kopf.on.create(GROUP, VERSION, "killswitches", backoff=2, id="killswitch_changed", when=mine)
    @kopf.on.update(GROUP, VERSION, "killswitches", backoff=2, id="killswitch_changed", when=mine)
    async def killswitch_changed(body: kopf.Body, memo: kopf.Memo, **indexes: Any) -> None:
        with reconcile_measured("KillSwitch"):
            await reconcile_switch(memo.ctx, _plain(body), indexes)

    @kopf.on.delete(GROUP, VERSION, "killswitches", backoff=10, id="killswitch_deleted", when=mine)
    async def killswitch_deleted(body: kopf.Body, name: str, memo: kopf.Memo, **indexes: Any) -> None:
        switch = _plain(body)
        if is_engaged(switch):
            raise kopf.TemporaryError(
                f"KillSwitch {name} is engaged: it is deleted once released (spec.engaged: false with two approvals)",
                delay=10,
            )
        # Released and deleted while the engage was still running (Kopf then skips the
        # update): carry out the release now, or the agents and gateways stay halted.
        if (switch.get("status") or {}).get("phase") in ("Engaging", "Engaged", "Drained"):
            await reconcile_switch(memo.ctx, switch, indexes)
