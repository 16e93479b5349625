"""SPEC §7: the drain is over within drainTimeoutSeconds of the engage, never later.

The timeout used to start twice, late: a runtime waited it from when the halt reached it,
the operator from after revoking, publishing and reconciling, so a forced drain reported
drainSeconds of 2.5-3 for a 2 s timeout. The halt now carries the deadline (acceptance +
timeout); runtimes force what is left early enough to ack by then, and the operator waits
until then and no longer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from unittest import mock

import pytest
from fleetward.operator.killswitch import engage as eng
from fleetward.operator.killswitch.control import new_order
from fleetward.operator.killswitch.scope import ENGAGED_AT

from fleetward.api.envelopes import ControlAck, ControlMessage

T0 = 1_800_000_000.0  # the engage's acceptance (epoch seconds)


def halt(timeout: int = 10, deadline: float | None = T0 + 10) -> ControlMessage:
    return ControlMessage.new(
        "halt",
        kill_switch="stop",
        generation=1,
        agents=["shop/billing"],
        drain_timeout_seconds=timeout,
        drain_deadline=datetime.fromtimestamp(deadline, UTC) if deadline is not None else None,
    )


@pytest.mark.parametrize(
    ("timeout", "deadline", "received", "wait"),
    [
        (10, None, T0 + 3, 10.0),  # no deadline (a hand-written halt): the timeout from receipt
        (10, T0 + 10, T0 + 0.2, 8.8),  # 1 s kept to force, record and ack
        (2, T0 + 2, T0 + 0.3, 1.2),  # a short timeout keeps a quarter of it
        (10, T0 + 10, T0 + 9.5, 0.0),  # arrived too late to wait at all: force at once
        (10, T0 + 60, T0, 10.0),  # never longer than the timeout itself
    ],
)
def test_a_runtime_waits_only_as_long_as_lets_its_ack_arrive_by_the_deadline(timeout, deadline, received, wait):
    assert halt(timeout, deadline).drain_wait(received) == pytest.approx(wait)


def test_the_deadline_travels_on_the_wire_and_only_with_a_halt():
    order = ControlMessage.parse(halt().to_json())
    assert order.drain_deadline == datetime.fromtimestamp(T0 + 10, UTC)
    assert '"drainDeadline":"' in halt().to_json()

    switch = {
        "metadata": {"name": "stop", "generation": 2, "annotations": {ENGAGED_AT: "2027-01-15T08:00:00.500000Z"}},
        "spec": {"engaged": True, "reason": "r", "drainTimeoutSeconds": 5},
    }
    deadline = eng.drain_deadline(switch)
    assert deadline == pytest.approx(datetime(2027, 1, 15, 8, 0, 5, 500000, UTC).timestamp())
    assert new_order("halt", switch, ["shop/billing"], drain_deadline=deadline).drain_deadline.timestamp() == deadline
    assert new_order("resume", switch, ["shop/billing"], drain_deadline=deadline).drain_deadline is None


def switch_at(accepted: float, timeout: int) -> dict:
    stamp = datetime.fromtimestamp(accepted, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return {
        "metadata": {"name": "stop", "generation": 1, "annotations": {ENGAGED_AT: stamp}},
        "spec": {"engaged": True, "reason": "r", "drainTimeoutSeconds": timeout},
    }


def ctx_acking(acks: list[ControlAck]) -> SimpleNamespace:
    async def collect_acks(book, *, since, done, timeout):
        collect_acks.timeout = timeout
        for ack in acks:
            book.add(ack)

    return SimpleNamespace(
        control=SimpleNamespace(collect_acks=collect_acks), kube=SimpleNamespace(delete=mock.AsyncMock())
    )


def drained_ack(instance: str, at: float) -> ControlAck:
    return ControlAck.new(
        "drained",
        kill_switch="stop",
        generation=1,
        instance=instance,
        component="runtime",
        agents=["shop/billing"],
        timestamp=datetime.fromtimestamp(at, UTC),
    )


def test_the_operator_waits_until_the_deadline_and_the_drain_ends_at_the_last_ack():
    import time

    accepted = time.time() - 1.0  # engaged a second ago, 10 s timeout: 9 s are left
    ctx = ctx_acking([drained_ack("pod-a", accepted + 1.5), drained_ack("pod-b", accepted + 2.25)])
    instances = {"pod-a": "shop/billing", "pod-b": "shop/billing"}
    _, forced, over = asyncio.run(eng.drain(ctx, switch_at(accepted, 10), [], instances, since=accepted))
    # Until the deadline (9 s from now, not a fresh 10 s) and the grace to read the last acks.
    assert 8.0 + eng.ACK_READ_GRACE_SECONDS < ctx.control.collect_acks.timeout <= 9.0 + eng.ACK_READ_GRACE_SECONDS
    assert forced == set() and over == pytest.approx(accepted + 2.25)
    ctx.kube.delete.assert_not_awaited()


def test_a_silent_runtime_ends_the_drain_at_the_deadline_and_is_deleted():
    import time

    accepted = time.time() - 3.0  # 5 s timeout: on time
    ctx = ctx_acking([drained_ack("pod-a", accepted + 1.0)])
    instances = {"pod-a": "shop/billing", "pod-silent": "shop/billing"}
    _, forced, over = asyncio.run(eng.drain(ctx, switch_at(accepted, 5), [], instances, since=accepted))
    assert forced == {"pod-silent"}
    assert over == pytest.approx(accepted + 5)  # the wait ended by rule at the deadline
    ctx.kube.delete.assert_awaited_once_with("Pod", "shop", "pod-silent", grace_seconds=0)


def test_an_operator_that_gets_there_late_reports_when_it_did():
    import time

    accepted = time.time() - 20.0  # past the 5 s deadline already (a restart mid-drain)
    ctx = ctx_acking([drained_ack("pod-a", accepted + 1.0)])
    instances = {"pod-a": "shop/billing", "pod-silent": "shop/billing"}
    before = time.time()
    _, forced, over = asyncio.run(eng.drain(ctx, switch_at(accepted, 5), [], instances, since=accepted))
    assert ctx.control.collect_acks.timeout == eng.ACK_READ_GRACE_SECONDS  # still reads the acks sent
    assert forced == {"pod-silent"} and over >= before  # measured, not the deadline it missed


def test_without_the_webhooks_stamp_the_drain_is_timed_from_now():
    """A switch engaged with the webhook off has only its creation time, which for a staged
    switch engaged later is long past: no deadline then (runtimes time from receipt)."""
    import time

    staged = {
        "metadata": {"name": "stop", "generation": 2, "creationTimestamp": "2020-01-01T00:00:00Z"},
        "spec": {"engaged": True, "reason": "r", "drainTimeoutSeconds": 7},
    }
    assert eng.drain_deadline(staged) is None
    assert new_order("halt", staged, ["shop/billing"], drain_deadline=eng.drain_deadline(staged)).drain_deadline is None
    ctx = ctx_acking([])
    _, forced, _ = asyncio.run(eng.drain(ctx, staged, [], {"pod-a": "shop/billing"}, since=time.time()))
    timeout = ctx.control.collect_acks.timeout - eng.ACK_READ_GRACE_SECONDS
    assert 6.5 < timeout <= 7.0 and forced == {"pod-a"}
