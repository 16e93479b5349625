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
        await deployment_changed(memo.ctx, event, namespace, labels, indexes)


async def deployment_changed(
    ctx, event: kopf.RawEvent, namespace: str, labels: kopf.Labels, indexes: dict[str, Any]
) -> None:
    if event["type"] == "DELETED":
        await _reconcile_owner(ctx, namespace, labels, indexes)  # puts it back
        return
    if event["type"] not in ("ADDED", "MODIFIED", None):
        return
    if not await _refresh_with_retries(ctx, event["object"]):  # this replica's cache cannot be built on
        await _reconcile_owner(ctx, namespace, labels, indexes)


async def _reconcile_owner(ctx, namespace: str, labels: kopf.Labels, indexes: dict[str, Any]) -> None:
    name = labels.get("fleetward.dev/agent")
    agents = indexes["agents_by_namespace"].get(namespace, [])
    agent = next((a for a in agents if a["metadata"]["name"] == name), None)
    if agent is not None and not agent["metadata"].get("deletionTimestamp"):
        await reconcile_agent(ctx, agent, references(namespace, indexes))


async def _refresh_with_retries(ctx, body: dict[str, Any]) -> bool:
    """Kopf does not retry event handlers, and the next event of a Deployment that has
    settled may never come: an Agent whose status write failed here would stay Pending
    until the drift timer. So a transient failure is retried here, a few times."""
    for attempt in range(5):
        try:
            return await refresh_availability(ctx, body)
        except KubeError as e:
            if not e.transient or attempt == 4:
                raise
            log.info("updating the Agent of Deployment %s failed (%s); retrying", body["metadata"]["name"], e)
            await asyncio.sleep(0.5 * 2**attempt)
