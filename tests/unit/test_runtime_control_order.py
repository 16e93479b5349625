"""Which control orders a runtime obeys (agent-runtime/fleetward/runtime/control.py
`Control._applies`): the same rule as the gateway's (gateway-rs control.rs `HaltState::apply`),
so runtimes and gateways agree on whether an agent is halted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from fleetward.runtime.control import Control

from fleetward.api.envelopes import ControlMessage

AGENT = "ns/a"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def control() -> Control:
    # Only the bookkeeping `_applies` reads; no Kafka consumer is needed for it.
    c = Control.__new__(Control)
    c.services = SimpleNamespace(agent=AGENT)
    c.generations, c.sent_at, c.released = {}, {}, {}
    return c


def order(kind: str, generation: int, seconds: int = 0, switch: str = "ks") -> ControlMessage:
    extra = {"mode": "drain", "drain_timeout_seconds": 30} if kind == "halt" else {}
    return ControlMessage.new(
        kind,
        kill_switch=switch,
        generation=generation,
        agents=[AGENT],
        timestamp=T0 + timedelta(seconds=seconds),
        **extra,
    )


def test_newest_generation_counts_and_a_resume_wins_at_equal_generations():
    c = control()
    assert c._applies(order("halt", 1))
    assert c._applies(order("halt", 1)), "a duplicate of the current engage is obeyed (re-acked)"
    assert c._applies(order("resume", 2, 10))
    assert not c._applies(order("halt", 1, 5)), "an older generation sent before the last order"
    assert not c._applies(order("halt", 2, 12)), "a halt at the released generation"
    assert c._applies(order("halt", 3, 13)), "a newer engage"
    assert c._applies(order("resume", 3, 14)), "a release at the engaged generation"


def test_older_generations_are_stale_unless_the_switch_was_created_again():
    c = control()
    assert c._applies(order("halt", 1, 0))
    assert c._applies(order("resume", 4, 10))
    assert not c._applies(order("resume", 0, 5)), "older and sent before the last order"
    assert c._applies(order("halt", 1, 20)), "deleted and created again: generation 1, sent later"
