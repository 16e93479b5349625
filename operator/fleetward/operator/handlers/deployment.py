"""Runtime Deployments: their readiness updates the owning Agent's Available/Ready
without a full reconcile; a deleted one is recreated by reconciling its Agent."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from fleetward.operator.handlers.indexes import references
from fleetward.operator.kube import KubeError
from fleetward.operator.reconcile import reconcile_agent, refresh_availability
from fleetward.operator.settings import OperatorSettings

log = logging.getLogger("fleetward.operator.handlers.deployment")
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
            await _refresh_with_retries(memo.ctx, body)


async def _refresh_with_retries(ctx, body: dict[str, Any]) -> None:
    """Kopf does not retry event handlers, and the next event of a Deployment that has
    settled may never come: an Agent whose status write failed here would stay Pending
    until the drift timer. So a transient failure is retried here, a few times."""
    for attempt in range(5):
        try:
            await refresh_availability(ctx, body)
            return
        except KubeError as e:
            if not e.transient or attempt == 4:
                raise
            log.info("updating the Agent of Deployment %s failed (%s); retrying", body["metadata"]["name"], e)
            await asyncio.sleep(0.5 * 2**attempt)
