"""The background loops' gate (operator/fleetward/operator/peering.py): Kopf's peering rule
applied to the peering object's status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fleetward.operator.peering import PeerIdentity, Peering, PeeringObject, decide

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
ME = PeerIdentity("op-a/1234abcd", priority=500)


def entry(priority: int, seen_ago: float = 1.0, lifetime: int = 60) -> dict:
    # the shape Kopf writes: priority, lastseen (ISO 8601), lifetime (seconds)
    return {"priority": priority, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat(), "lifetime": lifetime}


def test_alone_it_acts_once_its_own_keep_alive_is_there():
    assert decide({ME.identity: entry(500)}, ME, NOW)[0] is True
    acts, why = decide({}, ME, NOW)
    assert acts is False and "own keep-alive" in why
    assert decide(None, ME, NOW)[0] is False
    assert decide({ME.identity: entry(500, seen_ago=120)}, ME, NOW)[0] is False  # ours expired


def test_a_live_peer_of_higher_priority_acts_instead():
    acts, why = decide({ME.identity: entry(500), "op-b/ffff0000": entry(900)}, ME, NOW)
    assert acts is False and "op-b/ffff0000" in why and "900" in why


def test_a_dead_peer_of_higher_priority_does_not_count():
    status = {ME.identity: entry(500), "op-b/ffff0000": entry(900, seen_ago=61, lifetime=60)}
    assert decide(status, ME, NOW)[0] is True


def test_equal_priorities_pause_both_as_kopf_does():
    acts, why = decide({ME.identity: entry(500), "op-b/ffff0000": entry(500)}, ME, NOW)
    assert acts is False and "same priority" in why


def test_lower_priorities_and_malformed_entries_do_not_stop_it():
    status = {
        ME.identity: entry(500),
        "op-b/low": entry(10),
        "op-c/garbage": {"priority": "high", "lastseen": NOW.isoformat()},
        "op-d/no-date": {"priority": 900},
        "op-e/not-a-dict": "x",
    }
    assert decide(status, ME, NOW) == (True, "no live replica of a higher priority than 500")


def test_peering_objects_are_kopfs():
    assert PeeringObject("fleetward").path == "/apis/kopf.dev/v1/clusterkopfpeerings/fleetward"
    assert PeeringObject("fleetward", "team-a").path == "/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/fleetward"


def test_the_objects_followed_are_the_ones_kopf_keeps():
    assert [o.path for o in Peering.of(None, ME, "fw", None).objects] == ["/apis/kopf.dev/v1/clusterkopfpeerings/fw"]
    namespaced = Peering.of(None, ME, "fw", ["team-a", "team-*"]).objects  # a pattern is not followed
    assert [o.path for o in namespaced] == ["/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings/fw"]
    assert Peering.of(None, ME, "fw", ["team-*"]).objects == []
