"""Runtime Deployments: their readiness updates the owning Agent's Available/Ready
without a full reconcile; a deleted one is recreated by reconciling its Agent."""

from __future__ import annotations

from typing import Any

import kopf
from fleetward.operator.handlers.indexes import references
from fleetward.operator.reconcile import reconcile_agent, refresh_availability
from fleetward.operator.settings import OperatorSettings

RUNTIME = {"app.kubernetes.io/managed-by": "fleetward", "app.kubernetes.io/component": "runtime"}


def register(settings: OperatorSettings) -> None:
    def owned(namespace: str | None, **_: Any) -> bool:
        return settings.owns_namespace(namespace)

    @kopf.on.event("apps", "v1", "deployments", when=owned, labels=RUNTIME, id="runtime_deployment_event")
    async def runtime_deployment_event(
        event: kopf.RawEvent,
        namespace: str,
        labels: kopf.Labels,
        memo: kopf.Memo,
        **indexes: Any,
    ) -> None:
        body = event["object"]
        if event["type"] == "DELETED":
            name = labels.get("fleetward.dev/agent")
            agents = indexes["agents_by_namespace"].get(namespace, [])
            agent = next((a for a in agents if a["metadata"]["name"] == name), None)
            if agent is not None and not agent["metadata"].get("deletionTimestamp"):  # put it back
                refs = references(namespace, indexes)
                await reconcile_agent(memo.ctx, agent, refs)
            return
        if event["type"] in ("ADDED", "MODIFIED", None):
            await refresh_availability(memo.ctx, body)
