"""A runtime Deployment's events (handlers/deployment.py): readiness updates the Agent from
the cache; when the cache cannot be built on (another replica acted since), the Agent is
reconciled at once, not left Pending until the drift timer."""

from __future__ import annotations

import asyncio
from unittest import mock

from fleetward.operator.handlers import deployment

AGENT = {"metadata": {"namespace": "githouse", "name": "billing", "uid": "uid-billing"}, "spec": {}}
INDEXES = {"agents_by_namespace": {"githouse": [AGENT]}}
LABELS = {"fleetward.dev/agent": "billing"}


def event(type_: str) -> dict:
    return {"type": type_, "object": {"metadata": {"namespace": "githouse", "name": "fw-billing"}}}


def run(type_: str, refreshed: bool) -> tuple[mock.AsyncMock, mock.AsyncMock]:
    ctx = object()
    with (
        mock.patch.object(deployment, "refresh_availability", mock.AsyncMock(return_value=refreshed)) as refresh,
        mock.patch.object(deployment, "reconcile_agent", mock.AsyncMock()) as reconcile,
        mock.patch.object(deployment, "references", lambda ns, idx: "refs"),
    ):
        asyncio.run(deployment.deployment_changed(ctx, event(type_), "githouse", LABELS, INDEXES))
    return refresh, reconcile


def test_a_readiness_change_is_taken_from_the_cache_without_a_reconcile():
    refresh, reconcile = run("MODIFIED", refreshed=True)
    refresh.assert_awaited_once()
    reconcile.assert_not_awaited()


def test_an_agent_whose_cache_is_not_trusted_is_reconciled_at_once():
    refresh, reconcile = run("MODIFIED", refreshed=False)
    refresh.assert_awaited_once()
    reconcile.assert_awaited_once()
    assert reconcile.await_args.args[1] is AGENT and reconcile.await_args.args[2] == "refs"


def test_a_deleted_deployment_is_put_back_by_reconciling_its_agent():
    refresh, reconcile = run("DELETED", refreshed=True)
    refresh.assert_not_awaited()
    reconcile.assert_awaited_once()
