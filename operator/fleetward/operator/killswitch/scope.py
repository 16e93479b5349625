"""Which Agents engaged KillSwitches cover. Pure functions over plain objects (the
operator's Kopf indexes), shared by the KillSwitch handler and the Agent reconciler, so
that "is this Agent halted?" has one answer however the operator was woken."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetward.api.scope import covers, is_engaged

if TYPE_CHECKING:
    from fleetward.operator.settings import OperatorSettings

__all__ = [
    "ENGAGED_AT",
    "ENGAGED_BY",
    "Halt",
    "affected",
    "agent_id",
    "answers_for",
    "covers",
    "halt_of",
    "halts_for",
    "involves",
    "is_engaged",
]

ENGAGED_BY = "fleetward.dev/engaged-by"
"""Annotation the admission webhook stamps from the API server's userInfo on engage."""
ENGAGED_AT = "fleetward.dev/engaged-at"
"""Annotation the admission webhook stamps on engage: when the API server accepted it
(RFC 3339 with microseconds; the object's own timestamps have whole seconds only)."""


@dataclass(frozen=True)
class Halt:
    """One engaged KillSwitch as an Agent sees it."""

    switch: str
    engaged_by: str
    reason: str
    revoke_credentials: bool
    scale_to_zero: bool
    drained: bool
    """The switch's drain is over (acked or timed out): pods may now be scaled to zero."""


def halt_of(switch: dict[str, Any]) -> Halt:
    spec, meta = switch.get("spec") or {}, switch["metadata"]
    status = switch.get("status") or {}
    actions = spec.get("actions") or {}
    engaged_by = (meta.get("annotations") or {}).get(ENGAGED_BY) or status.get("engagedBy") or "unknown"
    return Halt(
        switch=meta["name"],
        engaged_by=engaged_by,
        reason=spec.get("reason") or "",
        revoke_credentials=actions.get("revokeCredentials", True),
        scale_to_zero=actions.get("scaleToZero", True),
        drained=status.get("phase") == "Drained" and status.get("observedGeneration") == meta.get("generation"),
    )


def halts_for(switches: list[dict[str, Any]], namespace: str, labels: dict[str, str] | None) -> list[Halt]:
    """The engaged switches that cover an Agent, by name (stable order)."""
    return sorted(
        (halt_of(s) for s in switches if is_engaged(s) and covers(s, namespace, labels)), key=lambda h: h.switch
    )


def affected(switch: dict[str, Any], agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Agents (index entries) a switch covers, sorted by namespace/name."""
    out = [
        a
        for a in agents
        if not a["metadata"].get("deletionTimestamp")
        and covers(switch, a["metadata"]["namespace"], a["metadata"].get("labels"))
    ]
    return sorted(out, key=lambda a: (a["metadata"]["namespace"], a["metadata"]["name"]))


def agent_id(agent: dict[str, Any]) -> str:
    return f"{agent['metadata']['namespace']}/{agent['metadata']['name']}"


def answers_for(settings: OperatorSettings, switch: dict[str, Any]) -> bool:
    """Whether this installation writes the status of a switch that covers none of its
    Agents: a cluster-wide installation does, unless the switch names only namespaces it
    excludes; a namespace-scoped one does only for its own namespaces. Side-by-side
    installations thereby never fight over a switch that only one of them serves."""
    namespaces = ((switch.get("spec") or {}).get("scope") or {}).get("namespaces") or []
    if settings.clusterwide:
        return not namespaces or any(settings.owns_namespace(ns) for ns in namespaces)
    return any(ns in settings.watch_namespaces and settings.owns_namespace(ns) for ns in namespaces)


def involves(settings: OperatorSettings, switch: dict[str, Any], agents: list[dict[str, Any]]) -> bool:
    """Whether this installation handles the switch at all: it covers some of its Agents
    (`agents`: index entries), or this installation reports on it. Others are left alone,
    so that an installation puts no finalizer on switches it has nothing to do with
    (uninstalling it would leave them undeletable), and exports no metric for them."""
    return answers_for(settings, switch) or bool(affected(switch, agents))
