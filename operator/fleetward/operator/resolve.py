"""Resolving an Agent's references: the SOPs its selector matches, the Guardrails it
names, the specialists its routes name. Pure functions over plain objects, so the
same code serves the reconciler and the "who uses this SOP" lookups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetward.api.agent import AgentSpec
from fleetward.api.runtimeconfig import ResolvedGuardrail, ResolvedSOP
from fleetward.api.scope import selector_matches

__all__ = ["Resolution", "resolve", "selector_matches"]


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
    for agent in dict.fromkeys((spec.routes or {}).values()):  # topics may share a specialist
        if agent not in agents:
            out.missing_route_agents.append(agent)
    if spec.fallback and spec.fallback.agent and spec.fallback.agent not in agents:
        out.missing_route_agents.append(spec.fallback.agent)
    return out
