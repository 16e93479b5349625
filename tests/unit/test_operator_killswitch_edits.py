"""Edits of an engaged KillSwitch (handlers/killswitch.py, killswitch/engage.py).

An approval or a new reason on a drained switch bumps its generation; that must not engage
it again (a second halt to parked runs, the drain's times and per-agent results
overwritten by an empty drain). A switch released and engaged again is a new engagement:
nothing of the last one's record may stay in its status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from unittest import mock

import pytest
from fleetward.operator.handlers import killswitch as handler
from fleetward.operator.killswitch import engage as eng
from fleetward.operator.killswitch.scope import ENGAGED_AT, ENGAGED_BY

AGENT = {"metadata": {"namespace": "shop", "name": "billing", "labels": {}}}
STAMP = "2026-12-08T09:00:00.123456Z"
DRAINED_STATUS = {
    "phase": "Drained",
    "observedGeneration": 1,
    "engagedBy": "alice",
    "engagedAt": STAMP,
    "credentialsRevokedAt": "2026-12-08T09:00:00.200000Z",
    "revocationSeconds": 0.077,
    "drainedAt": "2026-12-08T09:00:01.500000Z",
    "drainSeconds": 1.377,
    "affectedAgents": 1,
    "agents": [{"namespace": "shop", "name": "billing", "runs": [{"sessionId": "s1", "outcome": "drained"}]}],
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "Engaged", "message": "m", "lastTransitionTime": STAMP},
        {"type": "Drained", "status": "True", "reason": "Drained", "message": "m", "lastTransitionTime": STAMP},
    ],
}


def switch(generation: int, status: dict, stamp: str = STAMP) -> dict:
    return {
        "apiVersion": "fleetward.dev/v1alpha1",
        "kind": "KillSwitch",
        "metadata": {
            "name": "stop-shop",
            "generation": generation,
            "annotations": {ENGAGED_BY: "alice", ENGAGED_AT: stamp},
        },
        "spec": {
            "engaged": True,
            "reason": "incident",
            "scope": {"namespaces": ["shop"]},
            "approvals": [{"user": "bob"}],
        },
        "status": status,
    }


def indexes() -> dict:
    return {"agents_by_namespace": {"shop": [AGENT]}, "killswitches": {}}


def fake_ctx() -> SimpleNamespace:
    settings = SimpleNamespace(clusterwide=True, owns_namespace=lambda ns: True, watch_namespaces=[])
    return SimpleNamespace(
        settings=settings,
        kube=SimpleNamespace(patch_status=mock.AsyncMock()),
        audit=SimpleNamespace(approvals=mock.AsyncMock()),
    )


def test_an_approval_on_a_drained_switch_only_acknowledges_the_generation(monkeypatch):
    engage = mock.AsyncMock()
    monkeypatch.setattr(handler, "engage", engage)
    ctx = fake_ctx()
    edited = switch(2, dict(DRAINED_STATUS))

    asyncio.run(handler.reconcile_switch(ctx, edited, indexes()))

    engage.assert_not_awaited()
    ctx.audit.approvals.assert_awaited_once()  # the approval itself is still recorded
    (call,) = ctx.kube.patch_status.await_args_list
    kind, namespace, name, patch = call.args
    assert (kind, namespace, name) == ("KillSwitch", None, "stop-shop")
    assert patch["observedGeneration"] == 2
    assert [c["observedGeneration"] for c in patch["conditions"]] == [2, 2]
    assert [c["lastTransitionTime"] for c in patch["conditions"]] == [STAMP, STAMP]
    assert [(c["type"], c["reason"]) for c in patch["conditions"]] == [("Ready", "Engaged"), ("Drained", "Drained")]
    assert set(patch) == {"observedGeneration", "conditions"}  # times and results untouched


def test_a_drained_switch_seen_again_at_its_generation_does_nothing(monkeypatch):
    engage = mock.AsyncMock()
    monkeypatch.setattr(handler, "engage", engage)
    ctx = fake_ctx()
    asyncio.run(handler.reconcile_switch(ctx, switch(1, dict(DRAINED_STATUS)), indexes()))
    engage.assert_not_awaited()
    ctx.kube.patch_status.assert_not_awaited()


@pytest.mark.parametrize("phase", ["Engaging", "Engaged"])
def test_an_engagement_not_yet_drained_is_carried_on(monkeypatch, phase):
    engage = mock.AsyncMock()
    monkeypatch.setattr(handler, "engage", engage)
    monkeypatch.setattr(handler.kopf, "event", mock.Mock())
    asyncio.run(handler.reconcile_switch(fake_ctx(), switch(2, {**DRAINED_STATUS, "phase": phase}), indexes()))
    engage.assert_awaited_once()


def test_engaged_again_while_the_status_still_shows_the_last_drain_is_a_new_engagement(monkeypatch):
    # Released and engaged again before this operator saw the release: the webhook stamped
    # a new time, so the Drained status is the last engagement's.
    engage = mock.AsyncMock()
    monkeypatch.setattr(handler, "engage", engage)
    monkeypatch.setattr(handler.kopf, "event", mock.Mock())
    again = switch(4, dict(DRAINED_STATUS), stamp="2026-12-08T10:30:00.000001Z")
    assert not eng.same_engagement(again)
    asyncio.run(handler.reconcile_switch(fake_ctx(), again, indexes()))
    engage.assert_awaited_once()
    assert eng.same_engagement(switch(4, dict(DRAINED_STATUS)))


def test_a_new_engagement_clears_the_last_ones_record(monkeypatch):
    released = {
        **DRAINED_STATUS,
        "phase": "Released",
        "releasedBy": ["bob", "carol"],
        "releasedAt": "2026-12-08T09:10:00Z",
    }
    again = switch(5, released, stamp="2026-12-08T11:00:00.000001Z")
    again["spec"]["actions"] = {"revokeCredentials": False, "drainQueues": False}
    writes: list[dict] = []

    async def patch_status(kind, namespace, name, status):
        writes.append(dict(status))

    ctx = SimpleNamespace(
        settings=SimpleNamespace(kafka=SimpleNamespace(principals_managed=False)),
        kube=SimpleNamespace(patch_status=patch_status),
        control=SimpleNamespace(publish=mock.AsyncMock()),
        audit=SimpleNamespace(engaged=mock.AsyncMock()),
    )
    asyncio.run(eng.engage(ctx, again, [AGENT], mock.AsyncMock()))

    first = writes[0]
    assert first["phase"] == "Engaging"
    drained = next(c for c in first["conditions"] if c["type"] == "Drained")
    assert (drained["status"], drained["reason"]) == ("False", "Draining")  # not the last drain's True
    assert first["engagedAt"] == "2026-12-08T11:00:00.000001Z"
    for stale in ("releasedBy", "releasedAt", "drainedAt", "drainSeconds", "agents", "credentialsRevokedAt"):
        assert first[stale] is None, stale
    final = again["status"]
    assert final["phase"] == "Drained" and final["releasedBy"] is None
    assert final["agents"][0]["runs"] == []  # this engagement's results, not the last one's


def test_without_the_webhooks_stamp_an_edited_switch_is_engaged_again(monkeypatch):
    """webhook.enabled: false: a release and a new engage cannot be told from an edit."""
    unstamped = switch(2, dict(DRAINED_STATUS))
    unstamped["metadata"]["annotations"] = {}
    unstamped["metadata"]["creationTimestamp"] = STAMP
    assert not eng.same_engagement(unstamped)
    unstamped["metadata"]["generation"] = 1  # seen at this generation: the same one
    assert eng.same_engagement(unstamped)
