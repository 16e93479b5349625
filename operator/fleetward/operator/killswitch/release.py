"""Releasing a KillSwitch (SPEC §7): the admission webhook has already checked the two
approvals. Agents no other engaged switch covers are reconciled normally again, which
issues fresh credentials (a new key id: revoked ids never come back), restores their
Kafka user and ACLs and scales them back; then `resume` tells runtimes and gateways."""

from __future__ import annotations

import logging
import time
from typing import Any

from fleetward.operator import conditions as c
from fleetward.operator.conditions import Cond
from fleetward.operator.context import OperatorContext
from fleetward.operator.kafka import KafkaUnavailable
from fleetward.operator.killswitch.control import new_order, order_agents
from fleetward.operator.killswitch.engage import rfc3339, write_status
from fleetward.operator.killswitch.scope import agent_id

log = logging.getLogger("fleetward.operator.killswitch")


RESUME_PENDING = "KafkaUnavailable"
"""Ready reason of a release whose resume order Kafka has not taken yet."""


def resume_pending(switch: dict[str, Any]) -> bool:
    """A released switch whose resume order still has to be published."""
    ready = c.get((switch.get("status") or {}).get("conditions"), c.READY)
    return bool(ready) and ready.get("status") == "False" and ready.get("reason") == RESUME_PENDING


async def _publish_resume(ctx: OperatorContext, switch: dict[str, Any], ids: list[str], still_halted: bool) -> str:
    """Tell runtimes and gateways; returns what went wrong ("" when published)."""
    try:
        # Agents another switch still covers must not hear "resume" (an empty list means all).
        targets = (ids or None) if still_halted else order_agents(switch, ids)
        if targets is not None:
            await ctx.control.publish(new_order("resume", switch, targets))
    except KafkaUnavailable as e:
        return f"The resume order could not be published ({e}); retrying."
    return ""


def _released_condition(switch: dict[str, Any], ids: list[str], still_halted: int, problem: str) -> Cond:
    if problem:
        return Cond(c.READY, False, RESUME_PENDING, problem)
    approvers = sorted({a.get("user") for a in (switch.get("spec") or {}).get("approvals") or [] if a.get("user")})
    msg = (
        f"Released with the approvals of {', '.join(approvers) or 'nobody'}: {len(ids)} agent(s) get fresh credentials."
    )
    if still_halted:
        msg += f" {still_halted} agent(s) stay halted by another engaged KillSwitch."
    return Cond(c.READY, True, "Released", msg)


async def release(
    ctx: OperatorContext,
    switch: dict[str, Any],
    freed: list[dict[str, Any]],
    still_halted: list[dict[str, Any]],
    reconcile_agents,
) -> None:
    meta, spec = switch["metadata"], switch.get("spec") or {}
    name, gen = meta["name"], int(meta.get("generation") or 1)
    approvers = sorted({a.get("user") for a in spec.get("approvals") or [] if a.get("user")})
    ids = [agent_id(a) for a in freed]
    await reconcile_agents(switch)
    problem = await _publish_resume(ctx, switch, ids, bool(still_halted))
    status = {
        "phase": "Released",
        "observedGeneration": gen,
        "releasedBy": approvers,
        "releasedAt": rfc3339(time.time()),
        "conditions": c.merge(
            (switch.get("status") or {}).get("conditions"),
            [_released_condition(switch, ids, len(still_halted), problem)],
            gen,
        ),
    }
    await ctx.audit.approvals(switch)
    await write_status(ctx, switch, status)
    await ctx.audit.released(switch, approvers, ids)
    if problem:
        raise KafkaUnavailable(problem)
    log.info("kill switch %s released by %s: %d agent(s) resumed", name, ", ".join(approvers), len(ids))


async def retry_resume(
    ctx: OperatorContext, switch: dict[str, Any], freed: list[dict[str, Any]], still_halted: list[dict[str, Any]]
) -> None:
    """A release whose resume order Kafka refused: the release itself is done and recorded
    (fresh credentials, status Released, audit); only the order is published again. Without
    this, the next run of the handler saw phase Released, took it for a second release and
    never sent the order: halted runs waited for a resume that never came."""
    name, gen = switch["metadata"]["name"], int(switch["metadata"].get("generation") or 1)
    ids = [agent_id(a) for a in freed]
    problem = await _publish_resume(ctx, switch, ids, bool(still_halted))
    condition = _released_condition(switch, ids, len(still_halted), problem)
    conditions = c.merge((switch.get("status") or {}).get("conditions"), [condition], gen)
    await write_status(ctx, switch, {"observedGeneration": gen, "conditions": conditions})
    if problem:
        raise KafkaUnavailable(problem)
    log.info("kill switch %s: the resume order for %d agent(s) is published", name, len(ids))
