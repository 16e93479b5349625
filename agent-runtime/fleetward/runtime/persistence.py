"""Durable state of a runtime: LangGraph checkpoints plus the runtime's own ledgers, in one
database — PostgreSQL when the operator passes a DSN (FLEETWARD_DATABASE_DSN, shared by
replicas), else SQLite at `persistence.sqlitePath` (the embedded default for one replica).

Ledgers (tables `fw_*`, created at start):
- `fw_requests`: one row per command idempotency key: the run it started or resumed and
  its status. A redelivered command finds its row and is not run twice (SPEC §4).
- `fw_runs`: one row per run (= one LangGraph thread): session, trace id, status.
- `fw_session_events`: every session event by a deterministic key, with the sequence
  number allocated for it and whether it reached Kafka. A step replayed after a crash
  re-emits the same key: it gets the same sequence and envelope, and is not published
  twice once it was (see events.py).
- `fw_reviews`: the human reviews runs wait for (review.py), with their deadlines: the
  review timeout and `fleetward_human_review_queue_depth` read it, so both survive restarts.
- `fw_redeliveries`: commands delivered again while still running, with how many times
  the process serving them died first (runs.py, `CRASH_LIMIT`). Written only on a
  redelivery or a clean stop, never on a command's first delivery.

The SQL is written once with `?` placeholders and common syntax (ON CONFLICT, RETURNING)
that SQLite >= 3.35 and PostgreSQL both understand.

Round trips are kept few (each is a hop to aiosqlite's thread and back, or a PostgreSQL
round trip, on the path of every request): an INSERT returns the row it wrote (RETURNING)
instead of being followed by a SELECT, a query is one hop (`execute_fetchall`, not
execute + fetch + close), and an event's sequence and envelope are written together
(`record_event`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from langgraph.checkpoint.base import BaseCheckpointSaver

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fw_requests (
        agent TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        session_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        command_type TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (agent, idempotency_key))""",
    """CREATE TABLE IF NOT EXISTS fw_runs (
        run_id TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        session_id TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        status TEXT NOT NULL,
        waiting_for TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS fw_session_events (
        session_id TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        event_key TEXT NOT NULL UNIQUE,
        envelope TEXT,
        published INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, sequence))""",
    # Human reviews a run waits for (review.py): one row per open review, deleted when it is
    # answered. A table of its own rather than columns of fw_runs: existing databases get it
    # from CREATE TABLE IF NOT EXISTS, without a migration.
    """CREATE TABLE IF NOT EXISTS fw_reviews (
        run_id TEXT NOT NULL,
        review_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        session_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        deadline TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (run_id, review_id))""",
    # Poison-command detection (runs.py): `crashes` counts deliveries of a command that ended
    # with the serving process gone; `clean` says the last one stopped at a step boundary
    # (SIGTERM, a lost partition), so the next redelivery is not counted as a crash.
    """CREATE TABLE IF NOT EXISTS fw_redeliveries (
        agent TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        crashes INTEGER NOT NULL,
        clean INTEGER NOT NULL,
        PRIMARY KEY (agent, idempotency_key))""",
)

# Request statuses. `running`: accepted, the run has not reached a resting state (a crash
# leaves it so; the redelivered command resumes it). The rest are final for the command.
RUNNING, DONE = "running", "done"
# Run statuses.
RUN_ACTIVE, RUN_WAITING, RUN_COMPLETED, RUN_FAILED = "active", "waiting", "completed", "failed"
RUN_BUDGET_STOPPED = "budget_stopped"
"""Completed with a budget stop: ended at a cap with a partial result (not failed)."""
RUN_HALTED = "halted"
"""Halted by a kill switch; `waiting_for` names the halt (`halt_mark`). Whichever process
continues the run first (this one at `resume`, or a new pod after the release) sends its
`resumed` event, under a key that makes it one event either way."""


def halt_mark(kill_switch: str, generation: int) -> str:
    """What a halted run waits for: the KillSwitch order that halted it."""
    return f"killswitch/{kill_switch}/{generation}"


def halt_of(mark: str | None) -> tuple[str, str] | None:
    """(kill switch, generation) of a `halt_mark`, or None for anything else."""
    parts = (mark or "").split("/")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "killswitch" else None


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Database(Protocol):
    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None: ...
    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None: ...
    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...


LOCKED_RETRY_SECONDS = 10.0


async def _unlocked(op: Any) -> Any:
    """Run `op()` again while SQLite answers "database is locked". In WAL mode a write can be
    refused at once, without the busy handler, when another connection (the checkpointer's)
    committed since this one's snapshot; waiting a little and retrying is the remedy."""
    delay, waited = 0.01, 0.0
    while True:
        try:
            return await op()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or waited >= LOCKED_RETRY_SECONDS:
                raise
        await asyncio.sleep(delay)
        waited += delay
        delay = min(delay * 2, 0.25)


class SqliteDatabase:
    """Each call is one hop to the connection's thread: `execute_fetchall` runs the statement,
    reads every row and closes the cursor there (execute + fetchone + close were three). It
    also steps a statement with RETURNING to its end, so its write is complete (committed,
    in autocommit mode) when the call returns."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        await _unlocked(lambda: self.conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = await _unlocked(lambda: self.conn.execute_fetchall(sql, params))
        return dict(rows[0]) if rows else None

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        rows = await _unlocked(lambda: self.conn.execute_fetchall(sql, params))
        return [dict(r) for r in rows]


class PostgresDatabase:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(self._sql(sql), params)

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._sql(sql), params)
            return await cur.fetchone()

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._sql(sql), params)
            return list(await cur.fetchall())


@dataclass(frozen=True)
class RequestRecord:
    run_id: str
    status: str
    command_type: str
    new: bool
    """True when this call recorded the request (first delivery)."""
    redelivered: bool = False
    """The command was recorded by an earlier delivery (this one is a redelivery or an
    in-process retry). Unlike `new`, also right for answers, which name an existing run."""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    agent: str
    session_id: str
    trace_id: str
    status: str
    waiting_for: str | None


@dataclass(frozen=True)
class ReviewRecord:
    run_id: str
    review_id: str
    agent: str
    session_id: str
    kind: str
    deadline: datetime

    @classmethod
    def of(cls, row: dict[str, Any]) -> ReviewRecord:
        deadline = row["deadline"]
        if isinstance(deadline, str):
            deadline = datetime.fromisoformat(deadline)
        return cls(**{**row, "deadline": deadline})


class Ledger:
    """The runtime's bookkeeping tables (see the module docstring)."""

    def __init__(self, db: Database, backend: str) -> None:
        self.db = db
        self.backend = backend

    async def setup(self) -> None:
        for statement in SCHEMA:
            await self.db.execute(statement)

    # -- requests (dedupe) ---------------------------------------------------------------------

    async def begin_request(
        self, agent: str, idempotency_key: str, session_id: str, command_type: str, run_id: str
    ) -> RequestRecord:
        """Record a command, or find it when it was recorded before (a redelivery)."""
        now = _now()
        row = await self.db.fetchone(
            "INSERT INTO fw_requests (agent, idempotency_key, session_id, run_id, command_type, status, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent, idempotency_key) DO NOTHING"
            " RETURNING run_id, status, command_type",
            (agent, idempotency_key, session_id, run_id, command_type, RUNNING, now, now),
        )
        if row is not None:  # recorded now: the first delivery (one round trip)
            return RequestRecord(row["run_id"], row["status"], row["command_type"], new=True)
        row = await self.db.fetchone(
            "SELECT run_id, status, command_type, created_at FROM fw_requests WHERE agent = ? AND idempotency_key = ?",
            (agent, idempotency_key),
        )
        assert row is not None
        return RequestRecord(
            row["run_id"], row["status"], row["command_type"], new=row["run_id"] == run_id, redelivered=True
        )

    async def finish_request(self, agent: str, idempotency_key: str, status: str = DONE) -> None:
        await self.db.execute(
            "UPDATE fw_requests SET status = ?, updated_at = ? WHERE agent = ? AND idempotency_key = ?",
            (status, _now(), agent, idempotency_key),
        )

    async def count_redelivery(self, agent: str, idempotency_key: str) -> int:
        """A command still running was delivered again by another process: the one before
        died serving it, unless it recorded a clean stop. Returns the crashes so far."""
        row = await self.db.fetchone(
            "INSERT INTO fw_redeliveries (agent, idempotency_key, crashes, clean) VALUES (?, ?, 1, 0)"
            " ON CONFLICT (agent, idempotency_key) DO UPDATE"
            " SET crashes = fw_redeliveries.crashes + 1 - fw_redeliveries.clean, clean = 0 RETURNING crashes",
            (agent, idempotency_key),
        )
        assert row is not None
        return int(row["crashes"])

    async def record_clean_stop(self, agent: str, idempotency_key: str) -> None:
        """The command's run stopped at a step boundary: its next delivery is not a crash."""
        await self.db.execute(
            "INSERT INTO fw_redeliveries (agent, idempotency_key, crashes, clean) VALUES (?, ?, 0, 1)"
            " ON CONFLICT (agent, idempotency_key) DO UPDATE SET clean = 1",
            (agent, idempotency_key),
        )

    async def forget_redeliveries(self, agent: str, idempotency_key: str) -> None:
        await self.db.execute(
            "DELETE FROM fw_redeliveries WHERE agent = ? AND idempotency_key = ?", (agent, idempotency_key)
        )

    # -- runs --------------------------------------------------------------------------------------

    async def create_run(self, run_id: str, agent: str, session_id: str, trace_id: str) -> RunRecord:
        now = _now()
        row = await self.db.fetchone(
            "INSERT INTO fw_runs (run_id, agent, session_id, trace_id, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO NOTHING"
            " RETURNING run_id, agent, session_id, trace_id, status, waiting_for",
            (run_id, agent, session_id, trace_id, RUN_ACTIVE, now, now),
        )
        if row is not None:
            return RunRecord(**row)
        run = await self.get_run(run_id)
        assert run is not None
        return run

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self.db.fetchone(
            "SELECT run_id, agent, session_id, trace_id, status, waiting_for FROM fw_runs WHERE run_id = ?", (run_id,)
        )
        return RunRecord(**row) if row else None

    async def set_run_status(self, run_id: str, status: str, waiting_for: str | None = None) -> None:
        await self.db.execute(
            "UPDATE fw_runs SET status = ?, waiting_for = ?, updated_at = ? WHERE run_id = ?",
            (status, waiting_for, _now(), run_id),
        )

    # -- human reviews (review.py) ----------------------------------------------------------------

    async def open_review(
        self, run_id: str, review_id: str, agent: str, session_id: str, kind: str, deadline: datetime
    ) -> ReviewRecord:
        """Record that the run waits for review `review_id`, due at `deadline`; a replay of the
        step that asked keeps the first deadline. Returns the review as recorded."""
        await self.db.execute(
            "INSERT INTO fw_reviews (run_id, review_id, agent, session_id, kind, deadline, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, review_id) DO NOTHING",
            (run_id, review_id, agent, session_id, kind, deadline.astimezone(UTC).isoformat(), _now()),
        )
        review = await self.review(run_id, review_id)
        assert review is not None
        return review

    async def review(self, run_id: str, review_id: str) -> ReviewRecord | None:
        row = await self.db.fetchone(
            "SELECT run_id, review_id, agent, session_id, kind, deadline FROM fw_reviews"
            " WHERE run_id = ? AND review_id = ?",
            (run_id, review_id),
        )
        return ReviewRecord.of(row) if row else None

    async def reviews_of_run(self, run_id: str) -> list[ReviewRecord]:
        rows = await self.db.fetchall(
            "SELECT run_id, review_id, agent, session_id, kind, deadline FROM fw_reviews"
            " WHERE run_id = ? ORDER BY created_at, review_id",
            (run_id,),
        )
        return [ReviewRecord.of(r) for r in rows]

    async def close_review(self, run_id: str, review_id: str) -> None:
        await self.db.execute("DELETE FROM fw_reviews WHERE run_id = ? AND review_id = ?", (run_id, review_id))

    async def close_reviews_of_run(self, run_id: str) -> None:
        await self.db.execute("DELETE FROM fw_reviews WHERE run_id = ?", (run_id,))

    async def expired_reviews(self, agent: str, now: datetime, limit: int = 100) -> list[ReviewRecord]:
        """Open reviews of `agent` whose deadline has passed, oldest deadline first.
        (ISO-8601 UTC strings of one format compare in time order.)"""
        rows = await self.db.fetchall(
            "SELECT run_id, review_id, agent, session_id, kind, deadline FROM fw_reviews"
            " WHERE agent = ? AND deadline <= ? ORDER BY deadline LIMIT ?",
            (agent, now.astimezone(UTC).isoformat(), limit),
        )
        return [ReviewRecord.of(r) for r in rows]

    async def count_reviews(self, agent: str) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) AS n FROM fw_reviews WHERE agent = ?", (agent,))
        return int(row["n"]) if row else 0

    # -- session events (outbox) ---------------------------------------------------------------

    async def event_by_key(self, event_key: str) -> dict[str, Any] | None:
        return await self.db.fetchone(
            "SELECT session_id, sequence, envelope, published FROM fw_session_events WHERE event_key = ?", (event_key,)
        )

    async def allocate_event(self, session_id: str, event_key: str) -> int:
        """The sequence for `event_key`: the one it already has, else the session's next."""
        for _ in range(5):
            existing = await self.event_by_key(event_key)
            if existing is not None:
                return int(existing["sequence"])
            try:
                await self.db.execute(
                    "INSERT INTO fw_session_events (session_id, sequence, event_key, published)"
                    " SELECT CAST(? AS TEXT), COALESCE(MAX(sequence) + 1, 0), CAST(? AS TEXT), 0 FROM fw_session_events"
                    " WHERE session_id = ?"
                    " ON CONFLICT (event_key) DO NOTHING",
                    (session_id, event_key, session_id),
                )
            except Exception as e:  # two writers took the same next sequence: take the one after
                if not _is_unique_violation(e):
                    raise
        existing = await self.event_by_key(event_key)
        if existing is None:
            raise RuntimeError(f"could not allocate a sequence for event {event_key} in session {session_id}")
        return int(existing["sequence"])

    async def record_event(self, session_id: str, event_key: str, envelope: str, marker: str) -> dict[str, Any] | None:
        """Allocate the session's next sequence for `event_key` and store its envelope, in one
        statement (one round trip, one transaction, instead of allocate_event + store_envelope
        and the reads around them): `marker`, which occurs once in `envelope`, is replaced by
        `"sequence":<the sequence>`. Returns the row ({sequence, envelope}) as written, or None
        when the key was recorded before (a replayed step: see event_by_key)."""
        for _ in range(5):
            try:
                return await self.db.fetchone(
                    "INSERT INTO fw_session_events (session_id, sequence, event_key, envelope, published)"
                    " SELECT CAST(? AS TEXT), nxt.n, CAST(? AS TEXT),"
                    " REPLACE(CAST(? AS TEXT), CAST(? AS TEXT), '\"sequence\":' || CAST(nxt.n AS TEXT)), 0"
                    " FROM (SELECT COALESCE(MAX(sequence) + 1, 0) AS n FROM fw_session_events WHERE session_id = ?)"
                    " AS nxt WHERE true"  # WHERE: SQLite would read ON CONFLICT as a join constraint without it
                    " ON CONFLICT (event_key) DO NOTHING RETURNING sequence, envelope",
                    (session_id, event_key, envelope, marker, session_id),
                )
            except Exception as e:  # two writers took the same next sequence: take the one after
                if not _is_unique_violation(e):
                    raise
        raise RuntimeError(f"could not allocate a sequence for event {event_key} in session {session_id}")

    async def store_envelope(self, event_key: str, envelope: str) -> None:
        await self.db.execute(
            "UPDATE fw_session_events SET envelope = ? WHERE event_key = ? AND envelope IS NULL", (envelope, event_key)
        )

    async def mark_published(self, event_key: str) -> None:
        await self.db.execute("UPDATE fw_session_events SET published = 1 WHERE event_key = ?", (event_key,))


def _is_unique_violation(error: Exception) -> bool:
    if isinstance(error, sqlite3.IntegrityError):
        return True
    return getattr(error, "sqlstate", None) == "23505"


@dataclass
class Persistence:
    checkpointer: BaseCheckpointSaver
    ledger: Ledger
    backend: str
    """"postgres" or "sqlite"."""


@contextlib.asynccontextmanager
async def postgres_pool(dsn: str, *, max_size: int) -> AsyncIterator[Any]:
    """An open psycopg pool in the runtime's settings (autocommit, dict rows, no server-side
    prepared statements: a pooler in between must not see them), closed at the end. Used by
    the checkpointer and ledgers, the daily token ledger and the memory store."""
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    await pool.open(wait=True, timeout=30)
    try:
        yield pool
    finally:
        await pool.close()


SETUP_LOCK_SECONDS = 120.0
CHECKPOINT_SETUP_LOCK = 0x46574350  # "FWCP"
"""The advisory lock key that serialises the checkpointer's and ledgers' set-up."""


@contextlib.asynccontextmanager
async def setup_lock(pool: Any, key: int, what: str) -> AsyncIterator[None]:
    """One replica at a time runs a schema set-up: replicas starting side by side on a fresh
    database would otherwise fail on the migration version rows LangGraph's saver and store
    insert without ON CONFLICT (seen: UniqueViolation on checkpoint_migrations_pkey, the
    second replica crashing). A session advisory lock, taken by polling
    `pg_try_advisory_lock`: a replica blocked in `pg_advisory_lock` would be a transaction
    the holder's `CREATE INDEX CONCURRENTLY` waits for, while it waits for the lock (a
    deadlock PostgreSQL does not detect)."""
    async with pool.connection() as conn:
        deadline = asyncio.get_running_loop().time() + SETUP_LOCK_SECONDS
        while True:
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (key,))).fetchone()
            if row["locked"]:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"another replica held the set-up lock of {what} for {SETUP_LOCK_SECONDS} s")
            await asyncio.sleep(0.2)
        try:
            yield
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


@contextlib.asynccontextmanager
async def open_persistence(dsn: str | None, sqlite_path: str) -> AsyncIterator[Persistence]:
    """The checkpointer and ledger, set up; PostgreSQL when `dsn` is given, else SQLite."""
    if dsn:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        async with postgres_pool(dsn, max_size=8) as pool:
            saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
            ledger = Ledger(PostgresDatabase(pool), "postgres")
            async with setup_lock(pool, CHECKPOINT_SETUP_LOCK, "the checkpoints and ledgers"):
                await saver.setup()
                await ledger.setup()
            yield Persistence(saver, ledger, "postgres")
        return

    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    Path(sqlite_path).parent.mkdir(parents=True, exist_ok=True)
    # Two connections (checkpoints, ledgers) on one WAL database: each commits on its own.
    saver_conn = await aiosqlite.connect(sqlite_path)
    ledger_conn = await aiosqlite.connect(sqlite_path, isolation_level=None)
    try:
        for conn in (saver_conn, ledger_conn):
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA busy_timeout=10000")
            await conn.execute("PRAGMA synchronous=FULL")
        ledger_conn.row_factory = sqlite3.Row
        saver = AsyncSqliteSaver(saver_conn)
        await saver.setup()
        ledger = Ledger(SqliteDatabase(ledger_conn), "sqlite")
        await ledger.setup()
        yield Persistence(saver, ledger, "sqlite")
    finally:
        await ledger_conn.close()
        await saver_conn.close()
