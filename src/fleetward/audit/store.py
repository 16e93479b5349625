"""Where the chain lives: PostgreSQL (shared by every writer) or SQLite (embedded default).

Tables (created by `setup`, idempotently and safely from many processes at once):
- `fw_audit_log`: one row per record; append-only (triggers reject UPDATE, DELETE and, on
  PostgreSQL, TRUNCATE). `prev_hash` is UNIQUE: no two records can claim one predecessor.
- `fw_audit_head`: one row: the chain id, the last sequence and its hash. Appends lock it
  (`SELECT ... FOR UPDATE` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite), so appends from
  every replica serialise; a trigger only lets it move forward by one. `verify` compares
  it with the records, which catches records deleted from the end.
- `fw_audit_mirror`: per topic, the last sequence known to be in Kafka (`mirrored_up_to`).

The SQL is written once with `?` placeholders (translated for psycopg).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from fleetward.api.envelopes import GENESIS_HASH
from fleetward.audit.verify import Head

TABLES = (
    """CREATE TABLE IF NOT EXISTS fw_audit_log (
        sequence BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        recorded_at TEXT NOT NULL,
        chain TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS fw_audit_log_action ON fw_audit_log (action, sequence)",
    """CREATE TABLE IF NOT EXISTS fw_audit_head (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        chain TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        hash TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS fw_audit_mirror (
        topic TEXT PRIMARY KEY,
        mirrored_up_to BIGINT NOT NULL)""",
)

PG_GUARDS = (
    """CREATE OR REPLACE FUNCTION fw_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'fw_audit_log is append-only: % is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END $$""",
    """CREATE OR REPLACE TRIGGER fw_audit_log_append_only BEFORE UPDATE OR DELETE ON fw_audit_log
        FOR EACH ROW EXECUTE FUNCTION fw_audit_append_only()""",
    """CREATE OR REPLACE TRIGGER fw_audit_log_no_truncate BEFORE TRUNCATE ON fw_audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION fw_audit_append_only()""",
    """CREATE OR REPLACE FUNCTION fw_audit_head_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' OR NEW.sequence <> OLD.sequence + 1 OR NEW.chain <> OLD.chain THEN
            RAISE EXCEPTION 'fw_audit_head only moves forward one record at a time'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END $$""",
    """CREATE OR REPLACE TRIGGER fw_audit_head_forward_only BEFORE UPDATE OR DELETE ON fw_audit_head
        FOR EACH ROW EXECUTE FUNCTION fw_audit_head_forward_only()""",
)

SQLITE_GUARDS = (
    """CREATE TRIGGER IF NOT EXISTS fw_audit_log_no_update BEFORE UPDATE ON fw_audit_log
        BEGIN SELECT RAISE(ABORT, 'fw_audit_log is append-only: UPDATE is not allowed'); END""",
    """CREATE TRIGGER IF NOT EXISTS fw_audit_log_no_delete BEFORE DELETE ON fw_audit_log
        BEGIN SELECT RAISE(ABORT, 'fw_audit_log is append-only: DELETE is not allowed'); END""",
    """CREATE TRIGGER IF NOT EXISTS fw_audit_head_forward_only BEFORE UPDATE ON fw_audit_head
        WHEN NEW.sequence <> OLD.sequence + 1 OR NEW.chain <> OLD.chain
        BEGIN SELECT RAISE(ABORT, 'fw_audit_head only moves forward one record at a time'); END""",
    """CREATE TRIGGER IF NOT EXISTS fw_audit_head_no_delete BEFORE DELETE ON fw_audit_head
        BEGIN SELECT RAISE(ABORT, 'fw_audit_head only moves forward one record at a time'); END""",
)

COLUMNS = "sequence, id, recorded_at, chain, actor, action, target, details, prev_hash, hash"
# Any constant: serialises concurrent first-time setups (CREATE ... IF NOT EXISTS races in PostgreSQL).
SETUP_LOCK_KEY = 0x46574155  # "FWAU"


class AuditError(Exception):
    """The audit store cannot be used as asked; the message says which setting or field."""


class Row(Protocol):
    def __getitem__(self, key: str) -> Any: ...


# `build(chain, sequence, prev_hash)` -> the row to insert, as a column mapping.
RowBuilder = Callable[[str, int, str], Mapping[str, Any]]


def parse_dsn(dsn: str) -> tuple[str, str]:
    """("postgres", dsn) for postgresql://... or postgres://..., ("sqlite", path) for
    sqlite:///absolute/path or sqlite:relative/path."""
    if dsn.startswith(("postgresql://", "postgres://")):
        return "postgres", dsn
    if dsn.startswith("sqlite://"):
        path = dsn.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise AuditError(f"DSN {dsn!r}: expected sqlite:///ABSOLUTE/PATH (three slashes) or sqlite:RELATIVE/PATH")
        return "sqlite", "/" + path.lstrip("/")  # sqlite:////abs/path (SQLAlchemy's form) too
    if dsn.startswith("sqlite:") and len(dsn) > len("sqlite:"):
        return "sqlite", dsn.removeprefix("sqlite:")
    shown = re.sub(r"//[^/@]*@", "//***@", dsn)  # never echo a password
    raise AuditError(
        f"DSN {shown!r}: unsupported; expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH"
    )


class Store(Protocol):
    kind: str

    def setup(self) -> None: ...
    def exists(self) -> bool: ...
    def append(self, build: RowBuilder) -> Mapping[str, Any]: ...
    def snapshot(self) -> contextlib.AbstractContextManager[tuple[Head | None, Iterator[Row]]]: ...
    def rows(self, after: int, limit: int, action: str | None = None) -> list[Row]: ...
    def mirror_batch(self, topic: str, limit: int, publish: Callable[[list[Row]], int]) -> int: ...
    def mirrored_up_to(self, topic: str) -> int: ...
    def close(self) -> None: ...


def open_store(dsn: str, *, read_only: bool = False) -> Store:
    kind, where = parse_dsn(dsn)
    if kind == "postgres":
        return PostgresStore(where)
    return SqliteStore(where, read_only=read_only)


def _insert_sql() -> str:
    return f"INSERT INTO fw_audit_log ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _values(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c.strip()] for c in COLUMNS.split(","))


# --- PostgreSQL ------------------------------------------------------------------------------


class PostgresStore:
    """One connection for appends and one for mirroring (so a Kafka wait never holds the
    append connection); each is used under a lock, so an instance is thread-safe."""

    kind = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conns: dict[str, Any] = {}
        self._locks = {"append": threading.Lock(), "mirror": threading.Lock()}

    def _conn(self, name: str) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        conn = self._conns.get(name)
        if conn is None or conn.closed or conn.broken:
            try:
                conn = psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row, connect_timeout=10)
            except psycopg.OperationalError as e:
                raise AuditError(f"cannot connect to the audit database: {str(e).strip()}") from None
            self._conns[name] = conn
        return conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def setup(self) -> None:
        with self._locks["append"]:
            conn = self._conn("append")
            if self._ready(conn):  # the usual start: no DDL, which would briefly lock out appends
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK_KEY,))
                for statement in (*TABLES, *PG_GUARDS):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO fw_audit_head (singleton, chain, sequence, hash) VALUES (1, %s, 0, %s)"
                    " ON CONFLICT (singleton) DO NOTHING",
                    (str(uuid.uuid4()), GENESIS_HASH),
                )

    @staticmethod
    def _ready(conn: Any) -> bool:
        """Tables, head row and enabled guard triggers all in place."""
        missing = conn.execute(
            "SELECT to_regclass('fw_audit_head') IS NULL OR to_regclass('fw_audit_mirror') IS NULL AS m"
        ).fetchone()["m"]
        if missing:
            return False
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgenabled <> 'D'"
            " AND tgrelid IN (to_regclass('fw_audit_log'), to_regclass('fw_audit_head')) AND tgname IN"
            " ('fw_audit_log_append_only', 'fw_audit_log_no_truncate', 'fw_audit_head_forward_only')) AS guards,"
            " EXISTS (SELECT 1 FROM fw_audit_head) AS head"
        ).fetchone()
        return row["guards"] == 3 and row["head"]

    def exists(self) -> bool:
        with self._locks["append"]:
            row = self._conn("append").execute("SELECT to_regclass('fw_audit_log') AS t").fetchone()
            return row["t"] is not None

    def append(self, build: RowBuilder) -> Mapping[str, Any]:
        with self._locks["append"]:
            conn = self._conn("append")
            with conn.transaction():
                head = conn.execute(
                    "SELECT chain, sequence, hash FROM fw_audit_head WHERE singleton = 1 FOR UPDATE"
                ).fetchone()
                if head is None:
                    raise AuditError("the audit chain head is missing (fw_audit_head has no row)")
                row = build(head["chain"], int(head["sequence"]) + 1, head["hash"])
                conn.execute(self._sql(_insert_sql()), _values(row))
                conn.execute(
                    "UPDATE fw_audit_head SET sequence = %s, hash = %s WHERE singleton = 1",
                    (row["sequence"], row["hash"]),
                )
            return row

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[tuple[Head | None, Iterator[Row]]]:
        # One REPEATABLE READ transaction: the head and the rows are seen as of one instant,
        # while writers go on appending.
        with self._locks["append"]:
            conn = self._conn("append")
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                h = conn.execute("SELECT chain, sequence, hash FROM fw_audit_head WHERE singleton = 1").fetchone()
                head = Head(h["chain"], int(h["sequence"]), h["hash"]) if h else None
                with conn.cursor(name="fw_audit_verify") as cur:  # server-side: streams any size
                    cur.execute(f"SELECT {COLUMNS} FROM fw_audit_log ORDER BY sequence")
                    yield head, iter(cur)

    def rows(self, after: int, limit: int, action: str | None = None) -> list[Row]:
        where, params = "sequence > %s", [after]
        if action:
            where += " AND action = %s"
            params.append(action)
        with self._locks["append"]:
            return (
                self._conn("append")
                .execute(
                    f"SELECT {COLUMNS} FROM fw_audit_log WHERE {where} ORDER BY sequence LIMIT %s", (*params, limit)
                )
                .fetchall()
            )

    def mirror_batch(self, topic: str, limit: int, publish: Callable[[list[Row]], int]) -> int:
        with self._locks["mirror"]:
            conn = self._conn("mirror")
            conn.execute(
                "INSERT INTO fw_audit_mirror (topic, mirrored_up_to) VALUES (%s, 0) ON CONFLICT (topic) DO NOTHING",
                (topic,),
            )
            with conn.transaction():
                # The cursor row is held while publishing: one mirror at a time across every
                # process, so the topic receives the records in order. Others skip, not wait.
                cursor = conn.execute(
                    "SELECT mirrored_up_to FROM fw_audit_mirror WHERE topic = %s FOR UPDATE SKIP LOCKED", (topic,)
                ).fetchone()
                if cursor is None:
                    return 0
                rows = conn.execute(
                    f"SELECT {COLUMNS} FROM fw_audit_log WHERE sequence > %s ORDER BY sequence LIMIT %s",
                    (cursor["mirrored_up_to"], limit),
                ).fetchall()
                if not rows:
                    return 0
                delivered = publish(rows)
                if delivered:
                    conn.execute(
                        "UPDATE fw_audit_mirror SET mirrored_up_to = %s WHERE topic = %s",
                        (rows[delivered - 1]["sequence"], topic),
                    )
                return delivered

    def mirrored_up_to(self, topic: str) -> int:
        with self._locks["mirror"]:
            row = (
                self._conn("mirror")
                .execute("SELECT mirrored_up_to FROM fw_audit_mirror WHERE topic = %s", (topic,))
                .fetchone()
            )
            return int(row["mirrored_up_to"]) if row else 0

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


# --- SQLite ----------------------------------------------------------------------------------


def _open_wal(path: str, *, within: float = 30.0) -> sqlite3.Connection:
    """A writable connection in WAL mode. Switching a database to WAL needs an exclusive
    lock, and SQLite answers "database is locked" at once, without its busy handler, when
    another connection opens the same new file at that moment (seen with six writers
    starting together); so the switch is retried for a while before the error stands."""
    deadline = time.monotonic() + within
    while True:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=within)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            return db
        except sqlite3.OperationalError as e:
            db.close()
            transient = "locked" in str(e) or "busy" in str(e)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class SqliteStore:
    """The embedded default (one replica). WAL mode, like the runtime's own state database,
    which it may share. Appends take the database write lock (`BEGIN IMMEDIATE`)."""

    kind = "sqlite"

    def __init__(self, path: str, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._lock = threading.RLock()
        self._mirror_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                if self.read_only:
                    if not Path(self.path).is_file():
                        raise AuditError(f"no audit database at {self.path} (the file does not exist)")
                    uri = Path(self.path).resolve().as_uri() + "?mode=ro"
                    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                else:
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                    db = _open_wal(self.path)
                db.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as e:
                raise AuditError(f"cannot open the audit database {self.path}: {e}") from None
            db.row_factory = sqlite3.Row
            self._db = db
        return self._db

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            db.execute(f"BEGIN {mode}")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def setup(self) -> None:
        with self._transaction() as db:
            for statement in (*TABLES, *SQLITE_GUARDS):
                db.execute(statement)
            db.execute(
                "INSERT INTO fw_audit_head (singleton, chain, sequence, hash) VALUES (1, ?, 0, ?)"
                " ON CONFLICT (singleton) DO NOTHING",
                (str(uuid.uuid4()), GENESIS_HASH),
            )

    def exists(self) -> bool:
        with self._lock:
            row = self._conn().execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fw_audit_log'")
            return row.fetchone() is not None

    def append(self, build: RowBuilder) -> Mapping[str, Any]:
        with self._transaction() as db:
            head = db.execute("SELECT chain, sequence, hash FROM fw_audit_head WHERE singleton = 1").fetchone()
            if head is None:
                raise AuditError("the audit chain head is missing (fw_audit_head has no row)")
            row = build(head["chain"], int(head["sequence"]) + 1, head["hash"])
            db.execute(_insert_sql(), _values(row))
            db.execute(
                "UPDATE fw_audit_head SET sequence = ?, hash = ? WHERE singleton = 1", (row["sequence"], row["hash"])
            )
            return row

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[tuple[Head | None, Iterator[Row]]]:
        with self._transaction("DEFERRED") as db:  # a WAL read transaction sees one snapshot
            h = db.execute("SELECT chain, sequence, hash FROM fw_audit_head WHERE singleton = 1").fetchone()
            head = Head(h["chain"], int(h["sequence"]), h["hash"]) if h else None
            yield head, iter(db.execute(f"SELECT {COLUMNS} FROM fw_audit_log ORDER BY sequence"))

    def rows(self, after: int, limit: int, action: str | None = None) -> list[Row]:
        where, params = "sequence > ?", [after]
        if action:
            where += " AND action = ?"
            params.append(action)
        with self._lock:
            return (
                self._conn()
                .execute(
                    f"SELECT {COLUMNS} FROM fw_audit_log WHERE {where} ORDER BY sequence LIMIT ?", (*params, limit)
                )
                .fetchall()
            )

    def mirror_batch(self, topic: str, limit: int, publish: Callable[[list[Row]], int]) -> int:
        # One mirror per process (the lock); the cursor moves by compare-and-set, so a second
        # process on the same file can at worst publish a record twice, never lose one.
        with self._mirror_lock:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO fw_audit_mirror (topic, mirrored_up_to) VALUES (?, 0) ON CONFLICT (topic) DO NOTHING",
                    (topic,),
                )
            with self._lock:
                start = int(
                    self._conn()
                    .execute("SELECT mirrored_up_to FROM fw_audit_mirror WHERE topic = ?", (topic,))
                    .fetchone()[0]
                )
            rows = self.rows(start, limit)
            if not rows:
                return 0
            delivered = publish(rows)  # not under the database lock: appends go on meanwhile
            if delivered:
                with self._transaction() as db:
                    db.execute(
                        "UPDATE fw_audit_mirror SET mirrored_up_to = ? WHERE topic = ? AND mirrored_up_to = ?",
                        (rows[delivered - 1]["sequence"], topic, start),
                    )
            return delivered

    def mirrored_up_to(self, topic: str) -> int:
        with self._lock:
            row = self._conn().execute("SELECT mirrored_up_to FROM fw_audit_mirror WHERE topic = ?", (topic,))
            found = row.fetchone()
            return int(found[0]) if found else 0

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
