"""Resolving an Agent's references: the SOPs its selector matches, the Guardrails it
names, the specialists its routes name. Pure functions over plain objects, so the
same code serves the reconciler and the "who uses this SOP" lookups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetward.api.agent import AgentSpec
from fleetward.api.runtimeconfig import ResolvedGuardrail, ResolvedSOP


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str] | None) -> bool:
    """Kubernetes label-selector semantics; an absent selector matches nothing (an Agent
    without sopSelector works under no SOP), an empty one matches everything."""
    if selector is None:
        return False
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


@dataclass
class Resolution:
    sops: list[ResolvedSOP] = field(default_factory=list)
    guardrails: list[ResolvedGuardrail] = field(default_factory=list)
    missing_guardrails: list[str] = field(default_factory=list)
    missing_route_agents: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing_guardrails


def resolve(
    spec: AgentSpec, sops: list[dict[str, Any]], guardrails: dict[str, dict[str, Any]], agents: set[str]
) -> Resolution:
    """sops: SOP objects of the Agent's namespace; guardrails: name -> Guardrail object of
    that namespace; agents: names of Agents in that namespace (for routes)."""
    from fleetward.api.guardrail import GuardrailSpec
    from fleetward.api.sop import SOPSpec

    out = Resolution()
    selector = spec.sop_selector.to_wire() if spec.sop_selector is not None else None
    for sop in sorted(sops, key=lambda s: s["metadata"]["name"]):
        if selector_matches(selector, sop["metadata"].get("labels")):
            sop_spec = SOPSpec.model_validate(sop["spec"])
            out.sops.append(ResolvedSOP(name=sop["metadata"]["name"], version=sop_spec.version, spec=sop_spec))
    for ref in spec.guardrail_refs or []:
        found = guardrails.get(ref.name)
        if found is None:
            out.missing_guardrails.append(ref.name)
        else:
            out.guardrails.append(ResolvedGuardrail(name=ref.name, spec=GuardrailSpec.model_validate(found["spec"])))
    for route in spec.routes or []:
        if route.agent not in agents:
            out.missing_route_agents.append(route.agent)
    if spec.fallback and spec.fallback.agent and spec.fallback.agent not in agents:
        out.missing_route_agents.append(spec.fallback.agent)
    return out
