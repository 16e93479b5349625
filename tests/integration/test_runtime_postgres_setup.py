"""Runtime replicas starting at once on a fresh PostgreSQL database: every one sets up the
checkpoints, ledgers and memory store without tripping over the others (LangGraph's
migrations insert their version rows without ON CONFLICT; CI once saw the second replica
crash with UniqueViolation on checkpoint_migrations_pkey)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest
from fleetward.runtime.memory import open_memory_store
from fleetward.runtime.persistence import open_persistence

from tests.support.databases import own_database


@pytest.fixture
def dsn(postgres_dsn: str) -> Iterator[str]:
    with own_database(postgres_dsn, "setup") as dsn:
        yield dsn


def test_replicas_set_up_a_fresh_database_at_the_same_time(dsn: str, tmp_path):
    async def replica(i: int) -> str:
        async with open_persistence(dsn, str(tmp_path / f"unused-{i}.db")) as p, open_memory_store(dsn, "") as store:
            assert p.backend == "postgres" and store is not None
            return p.backend

    async def all_at_once() -> list[object]:
        return await asyncio.gather(*(replica(i) for i in range(6)), return_exceptions=True)

    results = asyncio.run(all_at_once())
    assert results == ["postgres"] * 6, results
    with psycopg.connect(dsn) as conn:
        versions = conn.execute("SELECT count(*), count(DISTINCT v) FROM checkpoint_migrations").fetchone()
    assert versions[0] == versions[1] > 0  # each migration recorded once
