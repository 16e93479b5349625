"""Kopf indexes: the operator's in-memory view of Agents, SOPs and Guardrails by
namespace, so that resolving references and finding "who uses this SOP" reads memory,
not the API server."""

from __future__ import annotations

from typing import Any

import kopf
from fleetward.operator.reconcile import References
from fleetward.operator.settings import OperatorSettings

GROUP, VERSION = "fleetward.dev", "v1alpha1"


def _plain(body: kopf.Body) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "generation", "labels", "deletionTimestamp")},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def register(settings: OperatorSettings) -> None:
    def owned(namespace: str | None, **_: Any) -> bool:
        return settings.owns_namespace(namespace)

    @kopf.index(GROUP, VERSION, "agents", when=owned, id="agents_by_namespace")
    def agents_by_namespace(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Any]:
        return {namespace: _plain(body)}

    @kopf.index(GROUP, VERSION, "sops", when=owned, id="sops_by_namespace")
    def sops_by_namespace(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Any]:
        return {namespace: _plain(body)}

    @kopf.index(GROUP, VERSION, "guardrails", when=owned, id="guardrails_by_namespace")
    def guardrails_by_namespace(body: kopf.Body, namespace: str, **_: Any) -> dict[str, Any]:
        return {namespace: _plain(body)}

    # Kopf fills every index before any handler runs, so an Agent reconciled at start-up
    # already sees the switches that cover it and is never issued credentials by mistake.
    @kopf.index(GROUP, VERSION, "killswitches", id="killswitches")
    def killswitches(body: kopf.Body, **_: Any) -> dict[str, Any]:
        plain = _plain(body)
        plain["metadata"]["annotations"] = dict(body["metadata"].get("annotations") or {})
        return {None: plain}


def _live(index: kopf.Index, namespace: str) -> list[dict[str, Any]]:
    """Index entries that are not being deleted (a deleted SOP must leave its Agents now)."""
    return [o for o in index.get(namespace, []) if not o["metadata"].get("deletionTimestamp")]


def switches(index: kopf.Index) -> list[dict[str, Any]]:
    return list(index.get(None, []))


def references(namespace: str, indexes: dict[str, Any]) -> References:
    """What an Agent in `namespace` may refer to, from the handler's index kwargs."""
    return References(
        sops=_live(indexes["sops_by_namespace"], namespace),
        guardrails={g["metadata"]["name"]: g for g in _live(indexes["guardrails_by_namespace"], namespace)},
        agents={a["metadata"]["name"] for a in _live(indexes["agents_by_namespace"], namespace)},
        switches=switches(indexes["killswitches"]),
    )
