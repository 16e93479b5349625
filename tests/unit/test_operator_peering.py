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


class PeeringKube:
    """The peering object's status as the API server would return it, and status writes."""

    def __init__(self) -> None:
        self.peers: dict = {}
        self.status_writes: list[dict] = []

    async def request(self, method: str, path: str) -> dict:
        now = datetime.now(UTC).isoformat()
        return {"status": {k: {"priority": p, "lastseen": now, "lifetime": 60} for k, p in self.peers.items()}}

    async def patch_status(self, kind: str, namespace: str, name: str, status: dict) -> None:
        self.status_writes.append(status)


def test_after_another_replica_acted_the_next_status_is_written_even_if_unchanged():
    # A failover: this replica wrote a status, stood by while another acted (and may have
    # written something else), then acts again. Its cache of what it wrote is not the live
    # status any more, so an equal status must not be skipped as "already written".
    import asyncio

    from fleetward.operator.context import OperatorContext
    from fleetward.operator.reconcile import AgentRef, AgentState, _write_status

    async def scenario() -> list[int]:
        kube = PeeringKube()
        ctx = OperatorContext(None, kube, None, None, None, None, asyncio.Semaphore(1))
        ctx.peering = Peering(kube, ME, [PeeringObject("fw")])
        ref = AgentRef("team-a", "billing", "uid-1", 3)
        status = {"phase": "Running", "observedGeneration": 3, "conditions": []}
        writes = []

        async def reconcile_writes_status() -> None:
            old = ctx.statuses[("team-a", "billing")].status if ("team-a", "billing") in ctx.statuses else {}
            await _write_status(ctx, ref, dict(status), old)
            ctx.statuses[("team-a", "billing")] = AgentState({}, False, dict(status), 1)
            writes.append(len(kube.status_writes))

        kube.peers = {ME.identity: 500}
        assert await ctx.acting() is True
        await reconcile_writes_status()  # written
        await reconcile_writes_status()  # unchanged: skipped
        ctx.applied[("team-a", "billing")] = ("uid-1", "fingerprint")

        kube.peers = {ME.identity: 500, "op-b/ffff0000": 900}
        assert await ctx.acting() is False  # op-b acts now and may write its own status
        kube.peers = {ME.identity: 500}
        assert await ctx.acting() is True
        assert ctx.applied == {}  # the next apply is made, not skipped as unchanged
        await reconcile_writes_status()  # same status as cached, written all the same
        await reconcile_writes_status()  # now confirmed: skipped again
        return writes

    assert asyncio.run(scenario()) == [1, 1, 2, 2]
