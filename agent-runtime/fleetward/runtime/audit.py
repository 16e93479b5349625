"""The runtime's audit records (SPEC §8): tool calls with redacted arguments, guardrail
blocks and budget stops, appended to the installation's audit chain (`fleetward.audit`).

The chain lives in the runtime's database: the shared PostgreSQL when the operator passes a
DSN (so every replica of every agent and the operator append to one chain), else the
runtime's SQLite file (the embedded default). Records are mirrored to the audit topic by
the audit library after their commit.

Appends run in a worker thread (the library is synchronous), never on the event loop.
A tool call is recorded before its HTTP request is sent, and is refused when it cannot
be recorded: no call leaves the runtime unaudited. A guardrail block or a budget stop is
recorded after the fact; failing to record it is logged, the block or stop itself stands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetward.api.agent import Tool as ToolSpec
from fleetward.api.runtimeconfig import RuntimeConfig
from fleetward.audit import BUDGET_STOP, GUARDRAIL_BLOCK, REVIEW_DECISION, TOOL_CALL, AuditLog

if TYPE_CHECKING:
    from fleetward.runtime.config import ProcessSettings
    from fleetward.runtime.context import RunContext
    from fleetward.runtime.tools import Invocation

log = logging.getLogger("fleetward.runtime.audit")

WITHHELD = "[withheld by guardrail]"


def audit_dsn(settings: ProcessSettings) -> str:
    """The runtime's own database: PostgreSQL when configured, else its SQLite file."""
    if settings.database_dsn:
        return settings.database_dsn
    return "sqlite://" + str(Path(settings.sqlite_path).resolve())


class RuntimeAudit:
    def __init__(self, audit_log: AuditLog, agent: str, key_id: str, guardrails: Any) -> None:
        self.log = audit_log
        self.agent = agent
        self.actor = f"agent:{agent}"
        """The runtime's identity: the Agent whose key signs its tool tokens (`keyId` in details)."""
        self.key_id = key_id
        self.guardrails = guardrails

    @classmethod
    async def open(
        cls,
        config: RuntimeConfig,
        settings: ProcessSettings,
        kafka_config: Mapping[str, str],
        key_id: str,
        guardrails: Any,
    ) -> RuntimeAudit:
        # A short Kafka wait: at shutdown the last mirror round must fit the grace period;
        # what it cannot send stays in the database for the next mirror (any replica, or the operator).
        audit_log = await asyncio.to_thread(
            AuditLog.open,
            audit_dsn(settings),
            kafka=dict(kafka_config),
            topic=config.topics.audit,
            delivery_timeout=5.0,
        )
        return cls(audit_log, config.agent.ref, key_id, guardrails)

    async def close(self) -> None:
        await asyncio.to_thread(self.log.close)

    async def append(self, action: str, target: str, details: Mapping[str, Any], *, actor: str | None = None) -> None:
        await asyncio.to_thread(self.log.append, action, actor or self.actor, target, details)

    async def tool_call(self, spec: ToolSpec, arguments: dict[str, Any], invocation: Invocation) -> None:
        """Record a tool call about to be sent (raises when it cannot be recorded)."""
        details: dict[str, Any] = {
            "runId": invocation.run_id,
            "callId": invocation.call_id,
            "mutating": spec.mutating,
            "keyId": self.key_id,
            "arguments": self._redact(arguments),
        }
        if spec.mutating:
            details["idempotencyKey"] = invocation.idempotency_key
        await self.append(TOOL_CALL, spec.name, details)

    async def guardrail_block(self, ctx: RunContext, stage: str, verdict: str, findings: str) -> None:
        """Record a block (or escalation) at `stage`; `findings` names kinds and types only."""
        details = {"runId": ctx.run_id, "stage": stage, "verdict": verdict, "findings": findings}
        try:
            await self.append(GUARDRAIL_BLOCK, f"session:{ctx.session_id}", details)
        except Exception as e:  # the block stands either way; say loudly that its record is missing
            log.error("could not record a guardrail %s at %s in the audit log: %s", verdict, stage, e)

    async def budget_stop(self, ctx: RunContext, stop: Mapping[str, Any]) -> None:
        """Record a run stopped at a budget cap (numbers only; the partial result is not kept)."""
        details = {
            "runId": ctx.run_id,
            "budget": stop["budget"],
            "scope": stop.get("scope", "run"),
            "limit": stop["limit"],
            "used": stop["used"],
        }
        try:
            await self.append(BUDGET_STOP, f"session:{ctx.session_id}", details)
        except Exception as e:  # the stop stands either way; say loudly that its record is missing
            log.error("could not record a %s budget stop of run %s in the audit log: %s", stop["budget"], ctx.run_id, e)

    async def review_decision(
        self, ctx: RunContext, review: Mapping[str, Any], decision: str, reviewer: str, *, timed_out: bool
    ) -> None:
        """Record a reviewer's decision (or a review's timeout) before the run goes on with it.
        Raises when it cannot be recorded: the decision is then retried (redelivered), never
        acted on without its record. The actor is the reviewer, as the gateway verified it
        from their token (never from the frame); a timeout's is the review timer."""
        details: dict[str, Any] = {
            "runId": ctx.run_id,
            "reviewId": review.get("reviewId"),
            "review": review.get("review"),
            "decision": decision,
            "reviewer": reviewer,
            "timedOut": timed_out,
        }
        if review.get("name"):
            details["tool"] = review["name"]
        await self.append(REVIEW_DECISION, f"session:{ctx.session_id}", details, actor=reviewer)

    def _redact(self, value: Any) -> Any:
        # The engine directly (not middleware.guardrails.redact_value): the tool_call event
        # already counted these findings in the metrics.
        if self.guardrails is None:
            return value
        if isinstance(value, str):
            result = self.guardrails.scan(value, "output")
            return result.text if result.text is not None else WITHHELD
        if isinstance(value, dict):
            return {k: self._redact(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact(v) for v in value]
        return value


async def record_guardrail_block(ctx: RunContext, stage: str, verdict: str, findings: str) -> None:
    """For the places that block: a no-op when the runtime has no audit log (tests)."""
    audit = ctx.services.audit
    if audit is not None:
        await audit.guardrail_block(ctx, stage, verdict, findings)


async def record_budget_stop(ctx: RunContext, stop: Mapping[str, Any]) -> None:
    """For the respond step: a no-op when the runtime has no audit log (tests)."""
    audit = ctx.services.audit
    if audit is not None:
        await audit.budget_stop(ctx, stop)
