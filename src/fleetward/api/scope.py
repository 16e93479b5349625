"""Which agents a KillSwitch covers, and Kubernetes label selectors: pure functions over
plain objects (API dicts), shared by the operator and every verifier built on
`fleetward.toolkit` (the gateway has the same rules in Rust, gateway-rs/src/kill_switches.rs),
so that "is this agent stopped?" has one answer wherever it is asked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes label-selector semantics; an absent selector matches nothing (an Agent
    without sopSelector works under no SOP), an empty one matches everything. An operator
    the API does not define (the CRDs allow only these four) constrains nothing."""
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


def is_engaged(switch: Mapping[str, Any]) -> bool:
    """A switch being deleted still halts until it is released: a delete must never
    bypass the two approvals (its finalizer waits for the release)."""
    return bool((switch.get("spec") or {}).get("engaged"))


def revokes(switch: Mapping[str, Any]) -> bool:
    """Engaged with `actions.revokeCredentials` (the default): its agents' keys are refused."""
    actions = (switch.get("spec") or {}).get("actions") or {}
    return is_engaged(switch) and actions.get("revokeCredentials", True) is not False


def covers(switch: Mapping[str, Any], namespace: str, labels: Mapping[str, str] | None) -> bool:
    """SPEC §2: an empty scope covers every agent; `namespaces` and `agentSelector` both
    narrow it (an Agent must pass both when both are set)."""
    scope = (switch.get("spec") or {}).get("scope") or {}
    namespaces = scope.get("namespaces")
    if namespaces and namespace not in namespaces:
        return False
    selector = scope.get("agentSelector")
    return selector is None or selector_matches(selector, labels)
