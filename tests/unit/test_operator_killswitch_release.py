"""A release whose resume order Kafka refused (killswitch/release.py): the next run of the
handler publishes the order, without recording the release a second time; before, it took
the switch for one released earlier and the halted runs never heard "resume"."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from unittest import mock

import pytest
from fleetward.operator.kafka import KafkaUnavailable
from fleetward.operator.killswitch import release as rel

AGENT = {"metadata": {"namespace": "shop", "name": "billing", "labels": {}}}


def engaged_switch() -> dict:
    return {
        "metadata": {"name": "stop-shop", "generation": 3},
        "spec": {
            "engaged": False,
            "reason": "incident",
            "scope": {"namespaces": ["shop"]},
            "approvals": [{"user": "bob"}, {"user": "carol"}],
        },
        "status": {"phase": "Drained", "engagedBy": "alice", "conditions": []},
    }


def fake_ctx(publish: mock.AsyncMock) -> SimpleNamespace:
    return SimpleNamespace(
        control=SimpleNamespace(publish=publish),
        kube=SimpleNamespace(patch_status=mock.AsyncMock()),
        audit=SimpleNamespace(approvals=mock.AsyncMock(), released=mock.AsyncMock()),
    )


def test_a_resume_kafka_refused_is_published_on_the_next_run_and_the_release_recorded_once():
    publish = mock.AsyncMock(side_effect=[KafkaUnavailable("broker down"), None])
    ctx = fake_ctx(publish)
    switch = engaged_switch()

    with pytest.raises(KafkaUnavailable):
        asyncio.run(rel.release(ctx, switch, [AGENT], [], mock.AsyncMock()))
    assert switch["status"]["phase"] == "Released"
    assert rel.resume_pending(switch)
    ctx.audit.released.assert_awaited_once()

    asyncio.run(rel.retry_resume(ctx, switch, [AGENT], []))
    assert not rel.resume_pending(switch)
    (ready,) = [c for c in switch["status"]["conditions"] if c["type"] == "Ready"]
    assert ready["status"] == "True" and ready["reason"] == "Released" and "bob, carol" in ready["message"]
    assert publish.await_count == 2
    order = publish.await_args.args[0]
    assert (order.type, order.kill_switch, order.agents) == ("resume", "stop-shop", ["shop/billing"])
    ctx.audit.released.assert_awaited_once()  # the release is recorded once


def test_a_retry_that_fails_again_keeps_the_resume_pending():
    ctx = fake_ctx(mock.AsyncMock(side_effect=KafkaUnavailable("still down")))
    switch = engaged_switch()
    switch["status"] = {
        "phase": "Released",
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "KafkaUnavailable",
                "lastTransitionTime": "2026-12-07T10:00:00Z",
            }
        ],
    }
    with pytest.raises(KafkaUnavailable):
        asyncio.run(rel.retry_resume(ctx, switch, [AGENT], []))
    assert rel.resume_pending(switch)


def test_a_switch_released_cleanly_has_no_resume_pending():
    switch = engaged_switch()
    switch["status"] = {"phase": "Released", "conditions": [{"type": "Ready", "status": "True", "reason": "Released"}]}
    assert not rel.resume_pending(switch)
