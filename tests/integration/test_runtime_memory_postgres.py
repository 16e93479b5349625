"""Long-term memory (fleetward.runtime.memory) on the real PostgreSQL of the local cluster,
the store every replica of an Agent shares: replicas starting at once set the store up once
between them, each sees what the other wrote, a run id is one item whoever writes it, the
pruning holds across replicas, users stay apart and their ids are not in the database in
clear. And the same on the embedded SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import psycopg
import pytest
from fleetward.runtime.memory import LongTermMemory, open_memory_store

from tests.support.databases import own_database

AGENT = "ns/billing"
ALICE, BOB = "user:alice@corp.example", "bob.smith"


@pytest.fixture
def dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of its own, so the store holds exactly what the test wrote."""
    with own_database(postgres_dsn, "memory") as dsn:
        yield dsn


def outcome(run: str, at: str, agent: str = AGENT) -> dict:
    return {
        "v": 1,
        "runId": run,
        "sessionId": "s-1",
        "agent": agent,
        "at": at,
        "outcome": "resolved",
        "sop": "invoices@1.0.0",
        "request": f"request of {run}",
        "reply": f"reply of {run}",
        "tools": ["lookup"],
    }


async def two_replicas(dsn: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        # Two replicas start at once on a fresh database: the store's migrations run once.
        stores = await asyncio.gather(
            stack.enter_async_context(open_memory_store(dsn, "/unused.db")),
            stack.enter_async_context(open_memory_store(dsn, "/unused.db")),
        )
        one = LongTermMemory(stores[0], AGENT, keep=3)
        two = LongTermMemory(stores[1], AGENT, keep=3)

        assert await one.remember(ALICE, "run-1", outcome("run-1", "2026-12-06T08:01:00+00:00"))
        assert [m["runId"] for m in await two.recall(ALICE)] == ["run-1"]
        # The same run finished again on the other replica (a redelivery): still one item.
        assert await two.remember(ALICE, "run-1", outcome("run-1", "2026-12-06T08:09:00+00:00"))
        assert await one.recall(ALICE) == [outcome("run-1", "2026-12-06T08:01:00+00:00")]

        # Writes from both replicas, pruned to the newest three between them.
        for n, replica in ((2, two), (3, one), (4, two), (5, one)):
            assert await replica.remember(ALICE, f"run-{n}", outcome(f"run-{n}", f"2026-12-06T08:0{n}:00+00:00"))
        assert [m["runId"] for m in await one.recall(ALICE)] == ["run-5", "run-4", "run-3"]
        assert [m["runId"] for m in await two.recall(ALICE)] == ["run-5", "run-4", "run-3"]

        # Users stay apart; another Agent of the namespace shares, another namespace does not.
        assert await one.recall(BOB) == []
        assert await two.remember(BOB, "run-b", outcome("run-b", "2026-12-06T09:00:00+00:00"))
        assert [m["runId"] for m in await one.recall(BOB)] == ["run-b"]
        assert [m["runId"] for m in await LongTermMemory(stores[0], "ns/security").recall(ALICE)] == [
            "run-5",
            "run-4",
            "run-3",
        ]
        assert await LongTermMemory(stores[0], "other/billing").recall(ALICE) == []
        # LIKE metacharacters and dots in a user id change nothing (the label is a hash).
        assert await one.recall("user:alice@corp.%") == []
        assert await one.recall("_") == []


def test_two_replicas_on_postgresql_share_a_users_memory(dsn: str):
    asyncio.run(two_replicas(dsn))
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT prefix, key FROM store ORDER BY prefix, key").fetchall()
    assert len(rows) == 4  # alice's newest three, bob's one
    prefixes = {p for p, _ in rows}
    assert len(prefixes) == 2 and all(p.startswith("fleetward.memory.ns.u-") for p in prefixes)
    assert not [p for p in prefixes if "alice" in p or "bob" in p]


def test_the_sqlite_store_keeps_a_users_memory_across_restarts(tmp_path):
    path = str(tmp_path / "state.db")

    async def body() -> None:
        async with open_memory_store(None, path) as store:
            memory = LongTermMemory(store, AGENT, keep=2)
            for n in (1, 2, 3):
                assert await memory.remember(ALICE, f"run-{n}", outcome(f"run-{n}", f"2026-12-06T08:0{n}:00+00:00"))
            assert await memory.remember(ALICE, "run-3", outcome("run-3", "2026-12-06T08:09:00+00:00"))
            assert await memory.remember(BOB, "run-b", outcome("run-b", "2026-12-06T09:00:00+00:00"))
        async with open_memory_store(None, path) as store:  # the pod restarted
            memory = LongTermMemory(store, AGENT, keep=2)
            assert await memory.recall(ALICE) == [
                outcome("run-3", "2026-12-06T08:03:00+00:00"),
                outcome("run-2", "2026-12-06T08:02:00+00:00"),
            ]
            assert [m["runId"] for m in await memory.recall(BOB)] == ["run-b"]

    asyncio.run(body())
    assert (tmp_path / "state.memory.db").exists()
