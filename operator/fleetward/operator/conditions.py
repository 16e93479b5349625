"""Conditions with stable reasons, and the summary (Ready, phase) computed from them.

Reasons are CamelCase constants that tooling may match on; messages are written for
the person reading `kubectl describe`. A condition's lastTransitionTime changes only
when its status does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Condition types of an Agent (SPEC §2).
READY = "Ready"
CONFIG_RESOLVED = "ConfigResolved"
CREDENTIALS_ISSUED = "CredentialsIssued"
AVAILABLE = "Available"
HALTED = "Halted"
AGENT_PARTS = (CONFIG_RESOLVED, CREDENTIALS_ISSUED, AVAILABLE)


class Reason:
    # ConfigResolved
    RESOLVED = "Resolved"
    SOP_SELECTOR_EMPTY = "NoSOPsSelected"
    GUARDRAIL_NOT_FOUND = "GuardrailNotFound"
    ROUTE_AGENT_NOT_FOUND = "RouteAgentNotFound"
    # CredentialsIssued
    ISSUED = "Issued"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
    KAFKA_UNAVAILABLE = "KafkaUnavailable"
    KEY_NOT_PUBLISHED = "KeyNotPublished"
    WITHHELD_BY_KILL_SWITCH = "WithheldByKillSwitch"
    # Available
    DEPLOYMENT_AVAILABLE = "DeploymentAvailable"
    DEPLOYMENT_PROGRESSING = "DeploymentProgressing"
    DEPLOYMENT_NOT_AVAILABLE = "DeploymentNotAvailable"
    PAUSED = "Paused"
    NOT_DEPLOYED = "NotDeployed"
    # Ready
    READY = "Ready"
    NOT_READY = "NotReady"
    APPLY_FAILED = "ApplyFailed"
    HALTED_BY_KILL_SWITCH = "HaltedByKillSwitch"
    # Halted
    KILL_SWITCH_ENGAGED = "KillSwitchEngaged"
    NOT_HALTED = "NotHalted"


@dataclass(frozen=True)
class Cond:
    type: str
    ok: bool | None  # None: Unknown
    reason: str
    message: str

    @property
    def status(self) -> str:
        return "Unknown" if self.ok is None else ("True" if self.ok else "False")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(existing: list[dict[str, Any]] | None, new: list[Cond], generation: int | None) -> list[dict[str, Any]]:
    """The condition list after setting `new`, keeping lastTransitionTime where the status
    did not change and keeping conditions of other types as they are."""
    by_type = {c["type"]: c for c in existing or []}
    for cond in new:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status
        entry = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": now() if changed else old["lastTransitionTime"],
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[cond.type] = entry
    order = {t: i for i, t in enumerate((READY, *AGENT_PARTS, HALTED))}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))


def get(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c["type"] == type_), None)


def summarize_agent(parts: dict[str, Cond], *, paused: bool, halted_by: str | None = None) -> tuple[Cond, str]:
    """Ready and phase from the part conditions.

    phase: Halted (a kill switch covers the agent) > Paused > Ready > Degraded (it was
    configured but something broke) > Pending (still coming up)."""
    if halted_by:
        return Cond(
            READY,
            False,
            Reason.HALTED_BY_KILL_SWITCH,
            f"KillSwitch {halted_by} is engaged and covers this agent; it runs no work and holds no "
            "credentials until the switch is released.",
        ), "Halted"
    if paused:
        return Cond(
            READY,
            False,
            Reason.PAUSED,
            "spec.paused is true: the runtime is scaled to zero; config, credentials and topics are kept.",
        ), "Paused"
    failing = [c for t in AGENT_PARTS if (c := parts.get(t)) is None or c.ok is not True]
    if not failing:
        return Cond(
            READY,
            True,
            Reason.READY,
            "The runtime is deployed with its config and credentials, and its pods are available.",
        ), "Ready"
    first = failing[0]
    blocking = [c for c in failing if c.ok is False and c.type != AVAILABLE]
    phase = "Degraded" if blocking else "Pending"
    detail = first.message if first.message else first.reason
    return Cond(
        READY,
        False,
        first.reason if first.type != AVAILABLE else Reason.NOT_READY,
        f"{first.type} is {first.status}: {detail}",
    ), phase
