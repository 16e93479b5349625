"""The runtime's ledgers on the embedded SQLite database (persistence.py): request dedupe,
runs and the per-session event sequence."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fleetward.runtime.persistence import DONE, RUN_WAITING, RUNNING, open_persistence


def run(coro):
    return asyncio.run(coro)


def test_a_request_is_recorded_once_and_a_redelivery_finds_its_run(tmp_path: Path):
    async def scenario():
        async with open_persistence(None, str(tmp_path / "state.db")) as p:
            first = await p.ledger.begin_request("ns/a", "key-1", "s1", "user_message", "run-1")
            again = await p.ledger.begin_request("ns/a", "key-1", "s1", "user_message", "run-2")
            other_agent = await p.ledger.begin_request("ns/b", "key-1", "s1", "user_message", "run-3")
            await p.ledger.finish_request("ns/a", "key-1")
            done = await p.ledger.begin_request("ns/a", "key-1", "s1", "user_message", "run-4")
            return first, again, other_agent, done

    first, again, other_agent, done = run(scenario())
    assert (first.run_id, first.status, first.new, first.redelivered) == ("run-1", RUNNING, True, False)
    assert (again.run_id, again.status, again.new, again.redelivered) == ("run-1", RUNNING, False, True)
    assert other_agent.run_id == "run-3" and other_agent.new
    assert (done.run_id, done.status) == ("run-1", DONE)


def test_an_answer_delivered_again_is_marked_redelivered(tmp_path: Path):
    # Answers (provide_sop, resume) name the run they answer: `new` cannot tell a redelivery
    # from the first delivery there; `redelivered` can (runs.py relies on it for resume
    # commands and for crash counting).
    async def scenario():
        async with open_persistence(None, str(tmp_path / "state.db")) as p:
            first = await p.ledger.begin_request("ns/a", "answer-1", "s1", "resume:r1", "run-1")
            again = await p.ledger.begin_request("ns/a", "answer-1", "s1", "resume:r2", "run-1")
            return first, again

    first, again = run(scenario())
    assert not first.redelivered
    assert again.redelivered and again.command_type == "resume:r1", "the first delivery's review is kept"


def test_crashes_count_redeliveries_but_not_those_after_a_clean_stop(tmp_path: Path):
    async def scenario():
        db = str(tmp_path / "state.db")
        async with open_persistence(None, db) as p:
            ledger = p.ledger
            counts = [await ledger.count_redelivery("ns/a", "k")]  # the first delivery's process died
            await ledger.record_clean_stop("ns/a", "k")  # the second one stopped on SIGTERM
            counts.append(await ledger.count_redelivery("ns/a", "k"))
            counts.append(await ledger.count_redelivery("ns/a", "k"))  # the third one died
            other = await ledger.count_redelivery("ns/b", "k")
        async with open_persistence(None, db) as p:  # the count survives a restart
            counts.append(await p.ledger.count_redelivery("ns/a", "k"))
            await p.ledger.forget_redeliveries("ns/a", "k")
            counts.append(await p.ledger.count_redelivery("ns/a", "k"))
        return counts, other

    counts, other = run(scenario())
    assert counts == [1, 1, 2, 3, 1]
    assert other == 1


def test_the_ledger_survives_a_reopen(tmp_path: Path):
    async def scenario():
        db = str(tmp_path / "state.db")
        async with open_persistence(None, db) as p:
            await p.ledger.create_run("run-1", "ns/a", "s1", "0" * 32)
            await p.ledger.set_run_status("run-1", RUN_WAITING, "sop")
        async with open_persistence(None, db) as p:
            return await p.ledger.get_run("run-1")

    got = run(scenario())
    assert got is not None and (got.status, got.waiting_for, got.session_id) == (RUN_WAITING, "sop", "s1")


def test_event_sequences_increase_per_session_and_a_replayed_key_keeps_its_number(tmp_path: Path):
    async def scenario():
        async with open_persistence(None, str(tmp_path / "state.db")) as p:
            ledger = p.ledger
            a0 = await ledger.allocate_event("sA", "run-1/start")
            a1 = await ledger.allocate_event("sA", "run-1/tool_call/c1")
            b0 = await ledger.allocate_event("sB", "run-2/start")
            replay = await ledger.allocate_event("sA", "run-1/tool_call/c1")
            await ledger.store_envelope("run-1/start", '{"x": 1}')
            await ledger.store_envelope("run-1/start", '{"x": 2}')  # the first envelope stays
            await ledger.mark_published("run-1/start")
            row = await ledger.event_by_key("run-1/start")
            a2 = await ledger.allocate_event("sA", "run-1/resolved")
            return a0, a1, b0, replay, row, a2

    a0, a1, b0, replay, row, a2 = run(scenario())
    assert (a0, a1, a2) == (0, 1, 2) and b0 == 0 and replay == 1
    assert row["envelope"] == '{"x": 1}' and row["published"] == 1


def test_a_locked_database_is_waited_for_not_an_error(tmp_path):
    """SQLite can refuse a write at once ("database is locked") while another connection
    holds the write lock; the ledger retries instead of failing the command."""
    import asyncio
    import sqlite3
    import threading
    import time

    import aiosqlite
    from fleetward.runtime.persistence import SqliteDatabase

    path = tmp_path / "ledger.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (v INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()

    async def main() -> float:
        conn = await aiosqlite.connect(path, isolation_level=None)
        await conn.execute("PRAGMA busy_timeout=0")  # refuse at once, as the snapshot case does
        try:
            started = time.monotonic()
            await SqliteDatabase(conn).execute("INSERT INTO t VALUES (2)")
            return time.monotonic() - started
        finally:
            await conn.close()

    waited = asyncio.run(main())
    assert waited >= 0.2
    assert [r[0] for r in holder.execute("SELECT v FROM t ORDER BY v")] == [1, 2]
    holder.close()
