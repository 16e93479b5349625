"""The daily token ledger of an Agent (SPEC §4 "daily tokens per agent", §8): how many model
tokens the Agent has used on the current UTC day, against its `spec.budget.dailyTokenBudget`,
and the `alertThresholds` that usage has crossed.

One row per (agent `namespace/name`, UTC day) in table `fleetward_token_ledger`:

- PostgreSQL (the operator passes a DSN): the table is shared by every replica of the Agent,
  so the budget is one budget however many pods spend it.
- SQLite (no DSN, the embedded default of persistence.py): the same API and the same SQL on
  the runtime's SQLite file. Correct for every connection and process on that file, which
  means within one pod only: replicas with SQLite each have their own file, hence their own
  budget. Only PostgreSQL shares the budget across replicas.

Use:
- `reserve(agent, estimate)` before a model call takes `estimate` tokens from the budget or
  raises `BudgetExceeded`; `settle(reservation, actual)` afterwards books the difference
  (a refund when the call used fewer tokens, an unconditional extra charge when it used
  more: those tokens were spent, the ledger records them and refuses what comes next).
- `charge(agent, tokens)` is a reservation that is final (nothing to settle).

No double spending: every decision is ONE SQL statement (see `_apply`), an
`INSERT ... ON CONFLICT (agent, day) DO UPDATE ... WHERE used + n <= limit RETURNING`.
The database runs it atomically on the row of (agent, day): in PostgreSQL the upsert inserts
the row or locks the existing one, and a concurrent writer waits for that lock and then
evaluates the WHERE against the row as the first one committed it (READ COMMITTED re-check),
so two replicas racing for the last tokens are serialised and the second sees the first's
usage and is refused. In SQLite a statement is its own transaction and writers take the
database's single write lock; a writer whose WAL snapshot is stale fails with "database is
locked" before writing and is retried (persistence._unlocked). No read-then-write in the
application, no window between check and update.

Alerts: the row carries `alert_level`, the highest threshold reported that day. The same
statement raises it to the highest threshold the new usage reaches and keeps the previous
value in `alert_level_before`; the thresholds in (before, level] are the ones this charge
crossed. As the level only moves up, and each statement sees the previous one's level, a
threshold is reported by exactly one charge per day across all replicas, even after a refund
takes usage below it again. The caller publishes them on the alerts topic.

A reservation lives in memory: when a pod dies between `reserve` and `settle`, the estimate
stays charged (the budget errs towards refusing, never towards overspending).
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

from fleetward.runtime.persistence import Database, Persistence, PostgresDatabase, SqliteDatabase, postgres_pool
from prometheus_client import Gauge

from fleetward.api.agent import Budget
from fleetward.api.runtimeconfig import RuntimeConfig

TABLE = "fleetward_token_ledger"

SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    agent TEXT NOT NULL,
    day TEXT NOT NULL,
    used BIGINT NOT NULL,
    token_limit BIGINT NOT NULL,
    alert_level DOUBLE PRECISION NOT NULL DEFAULT 0,
    alert_level_before DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (agent, day))"""

# Any constant: serialises concurrent first-time setups of replicas starting at once
# (CREATE TABLE IF NOT EXISTS can fail with a unique violation in PostgreSQL when two
# sessions create the same table at the same moment).
SETUP_LOCK_KEY = 0x4657544C  # "FWTL"

BUDGET_UTILIZATION = Gauge(
    "fleetward_budget_utilization_ratio",
    "Share of the agent's daily token budget used on the current UTC day (shared ledger; "
    "every replica reports the value it last saw, so aggregate with max by agent).",
    ["agent"],
)


class BudgetError(Exception):
    """The ledger cannot do what was asked; the message names the agent and the numbers."""


class BudgetExceeded(BudgetError):
    """The daily token budget has fewer tokens left than were asked for."""

    def __init__(self, agent: str, day: str, requested: int, used: int, limit: int) -> None:
        self.agent, self.day, self.requested, self.used, self.limit = agent, day, requested, used, limit
        left = max(limit - used, 0)
        super().__init__(
            f"daily token budget of agent {agent} for {day} (UTC) exceeded: {requested} tokens requested, "
            f"{used} of {limit} used, {left} left"
        )


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DailyBudget:
    """One Agent's daily token budget and alert thresholds (fractions in (0, 1], ascending)."""

    agent: str
    limit: int
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if "/" not in self.agent:
            raise BudgetError(f"agent {self.agent!r}: expected namespace/name")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise BudgetError(f"agent {self.agent}: dailyTokenBudget must be a whole number >= 1, got {self.limit!r}")
        bad = [t for t in self.thresholds if not 0.0 < t <= 1.0]
        if bad:
            raise BudgetError(f"agent {self.agent}: alertThresholds must be fractions in (0, 1], got {bad}")
        object.__setattr__(self, "thresholds", tuple(sorted(set(self.thresholds))))

    @classmethod
    def from_spec(cls, agent: str, budget: Budget) -> DailyBudget | None:
        """The Agent's `spec.budget`; None when it sets no `dailyTokenBudget`."""
        if budget.daily_token_budget is None:
            return None
        return cls(agent, budget.daily_token_budget, tuple(budget.alert_thresholds))

    @classmethod
    def from_config(cls, config: RuntimeConfig) -> DailyBudget | None:
        return cls.from_spec(config.agent.ref, config.spec.budget)

    def boundary(self, threshold: float) -> int:
        """The usage (tokens) at which `threshold` is reached: the least `used` with
        used / limit >= threshold, the threshold read as the decimal it was written as."""
        return max(1, math.ceil(Fraction(repr(threshold)) * self.limit))


@dataclass(frozen=True)
class ThresholdCrossing:
    """An alert threshold reached for the first time on `day`; publish it on the alerts topic."""

    agent: str
    day: str
    threshold: float
    used: int
    limit: int


@dataclass(frozen=True)
class Charge:
    """The ledger after one statement: `tokens` booked (negative for a refund), `used` now."""

    agent: str
    day: str
    tokens: int
    used: int
    limit: int
    crossed: tuple[ThresholdCrossing, ...] = ()

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)

    @property
    def utilization(self) -> float:
        return self.used / self.limit


@dataclass
class Reservation:
    """Tokens taken from the budget of `day` before a model call; `settle` books the actual use
    on the same day (a run that crosses midnight pays from the day it reserved on)."""

    agent: str
    day: str
    tokens: int
    charge: Charge
    settled_tokens: int | None = field(default=None)

    @property
    def settled(self) -> bool:
        return self.settled_tokens is not None


@dataclass(frozen=True)
class Usage:
    agent: str
    day: str
    used: int
    limit: int
    alert_level: float

    @property
    def utilization(self) -> float:
        return self.used / self.limit


class DailyTokenLedger:
    """The daily token budgets of one or more Agents over one database (see the module docstring).

    `db` is a persistence.Database (`persistence.ledger.db` of the runtime, or the one
    `open_daily_token_ledger` opens); `clock` returns an aware datetime and decides the UTC day."""

    def __init__(
        self,
        db: Database,
        budgets: DailyBudget | Iterable[DailyBudget],
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.db = db
        items = [budgets] if isinstance(budgets, DailyBudget) else list(budgets)
        self.budgets = {b.agent: b for b in items}
        self.clock = clock

    @classmethod
    def from_persistence(
        cls, persistence: Persistence, budgets: DailyBudget | Iterable[DailyBudget], **kwargs: Any
    ) -> DailyTokenLedger:
        """A ledger in the runtime's own database (PostgreSQL shared by replicas, else SQLite)."""
        return cls(persistence.ledger.db, budgets, **kwargs)

    @property
    def shared(self) -> bool:
        """True when the budget is shared across replicas (PostgreSQL)."""
        return isinstance(self.db, PostgresDatabase)

    async def setup(self) -> None:
        """Create the table if missing; safe when many replicas start at once."""
        if isinstance(self.db, PostgresDatabase):
            async with self.db.pool.connection() as conn:
                cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (TABLE,))
                row = await cur.fetchone()
                if row is not None and _first(row):
                    return  # the usual start: no DDL and no lock
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK_KEY,))
                    await conn.execute(SCHEMA)
            return
        await self.db.execute(SCHEMA)  # SQLite serialises DDL under its write lock

    def budget(self, agent: str) -> DailyBudget:
        try:
            return self.budgets[agent]
        except KeyError:
            known = ", ".join(sorted(self.budgets)) or "none"
            raise BudgetError(f"no daily token budget configured for agent {agent} (configured: {known})") from None

    def today(self) -> str:
        now = self.clock()
        if now.tzinfo is None:
            raise BudgetError(f"the ledger clock returned a naive datetime ({now.isoformat()}); it must be aware")
        return now.astimezone(UTC).date().isoformat()

    # -- operations ------------------------------------------------------------------------------

    async def charge(self, agent: str, tokens: int) -> Charge:
        """Take `tokens` from today's budget of `agent`, or raise BudgetExceeded (nothing taken)."""
        budget = self.budget(agent)
        _check_tokens(agent, tokens, "charge")
        day = self.today()
        if tokens > budget.limit:  # can never fit: refuse without a write
            usage = await self.usage(agent, day)
            raise BudgetExceeded(agent, day, tokens, usage.used, budget.limit)
        result = await self._apply(budget, day, tokens, conditional=True)
        if result is None:
            usage = await self.usage(agent, day)  # for the message; the refusal was decided atomically
            raise BudgetExceeded(agent, day, tokens, usage.used, budget.limit)
        return result

    async def reserve(self, agent: str, tokens_estimate: int) -> Reservation:
        """Take `tokens_estimate` from today's budget before a model call (BudgetExceeded if it
        does not fit); `settle` it with the actual use afterwards."""
        charge = await self.charge(agent, tokens_estimate)
        return Reservation(agent, charge.day, tokens_estimate, charge)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> Charge:
        """Book `actual_tokens` instead of the reservation's estimate, on the reservation's day.
        Never refused: the tokens were spent. Settling twice is an error."""
        budget = self.budget(reservation.agent)
        _check_tokens(reservation.agent, actual_tokens, "settle")
        if reservation.settled:
            raise BudgetError(
                f"reservation of {reservation.tokens} tokens of agent {reservation.agent} on {reservation.day} "
                f"was already settled with {reservation.settled_tokens} tokens"
            )
        reservation.settled_tokens = actual_tokens  # before the await: a concurrent settle sees it
        try:
            result = await self._apply(budget, reservation.day, actual_tokens - reservation.tokens, conditional=False)
        except BaseException:
            reservation.settled_tokens = None  # not booked (the statement failed): may be settled again
            raise
        assert result is not None  # an unconditional upsert always returns its row
        return result

    async def usage(self, agent: str, day: str | None = None) -> Usage:
        """The ledger row of `agent` on `day` (default today); zero when nothing was charged."""
        budget = self.budget(agent)
        day = day or self.today()
        row = await self.db.fetchone(f"SELECT used, alert_level FROM {TABLE} WHERE agent = ? AND day = ?", (agent, day))
        if row is None:
            usage = Usage(agent, day, 0, budget.limit, 0.0)
        else:
            usage = Usage(agent, day, int(row["used"]), budget.limit, float(row["alert_level"]))
        if day == self.today():
            BUDGET_UTILIZATION.labels(agent=agent).set(usage.utilization)
        return usage

    # -- the statement -----------------------------------------------------------------------------

    async def _apply(self, budget: DailyBudget, day: str, delta: int, *, conditional: bool) -> Charge | None:
        """Add `delta` tokens to (agent, day) in one atomic statement; None when `conditional`
        and the result would exceed the limit (then nothing changed). See the module docstring
        for why this cannot double-spend and why each threshold is reported once."""
        marks = [(budget.boundary(t), t) for t in reversed(budget.thresholds)]  # highest first
        params: list[Any] = [budget.agent, day, max(delta, 0), budget.limit]
        insert_level = _level_sql("CAST(? AS BIGINT)", [max(delta, 0)], marks, params)
        params.append(self.clock().isoformat())
        new_used = "(l.used + CAST(? AS BIGINT))"
        params += [delta, delta]
        level_a = _level_sql(new_used, [delta], marks, params)
        level_b = _level_sql(new_used, [delta], marks, params)
        where = ""
        if conditional:
            where = f" WHERE {new_used} <= excluded.token_limit"
            params.append(delta)
        sql = (
            f"INSERT INTO {TABLE} AS l (agent, day, used, token_limit, alert_level, alert_level_before, updated_at)"
            f" VALUES (?, ?, CAST(? AS BIGINT), CAST(? AS BIGINT), {insert_level}, CAST(0 AS DOUBLE PRECISION), ?)"
            " ON CONFLICT (agent, day) DO UPDATE SET"
            f" used = CASE WHEN {new_used} < 0 THEN 0 ELSE {new_used} END,"
            " token_limit = excluded.token_limit,"
            " alert_level_before = l.alert_level,"
            f" alert_level = CASE WHEN l.alert_level >= {level_a} THEN l.alert_level ELSE {level_b} END,"
            " updated_at = excluded.updated_at"
            f"{where}"
            " RETURNING used, alert_level, alert_level_before"
        )
        row = await self.db.fetchone(sql, tuple(params))
        if row is None:
            return None
        used, level, before = int(row["used"]), float(row["alert_level"]), float(row["alert_level_before"])
        crossed = tuple(
            ThresholdCrossing(budget.agent, day, t, used, budget.limit)
            for t in budget.thresholds
            if before < t <= level
        )
        result = Charge(budget.agent, day, delta, used, budget.limit, crossed)
        if day == self.today():
            BUDGET_UTILIZATION.labels(agent=budget.agent).set(result.utilization)
        return result


def _level_sql(used_sql: str, used_params: list[Any], marks: list[tuple[int, float]], params: list[Any]) -> str:
    """SQL for the highest threshold that usage `used_sql` reaches (0 for none); appends its
    parameters to `params`. `marks` are (boundary tokens, threshold), highest first."""
    if not marks:
        return "CAST(0 AS DOUBLE PRECISION)"
    cases = []
    for boundary, threshold in marks:
        cases.append(f"WHEN {used_sql} >= CAST(? AS BIGINT) THEN CAST(? AS DOUBLE PRECISION)")
        params += [*used_params, boundary, threshold]
    return f"(CASE {' '.join(cases)} ELSE CAST(0 AS DOUBLE PRECISION) END)"


def _check_tokens(agent: str, tokens: int, what: str) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise BudgetError(f"{what} for agent {agent}: tokens must be a whole number >= 0, got {tokens!r}")


def _first(row: Any) -> Any:
    return row["present"] if isinstance(row, dict) else row[0]


@contextlib.asynccontextmanager
async def open_daily_token_ledger(
    dsn: str | None,
    sqlite_path: str | None,
    budgets: DailyBudget | Iterable[DailyBudget],
    *,
    clock: Callable[[], datetime] = utc_now,
) -> AsyncIterator[DailyTokenLedger]:
    """A ledger on a connection of its own, set up: PostgreSQL when `dsn` is given (shared by
    replicas), else the SQLite file `sqlite_path` (one pod). The runtime, which has its
    persistence open already, uses `DailyTokenLedger.from_persistence` instead."""
    if dsn:
        async with postgres_pool(dsn, max_size=4) as pool:
            ledger = DailyTokenLedger(PostgresDatabase(pool), budgets, clock=clock)
            await ledger.setup()
            yield ledger
        return

    if not sqlite_path:
        raise BudgetError("the daily token ledger needs a PostgreSQL DSN or an SQLite path; neither was given")
    import aiosqlite

    Path(sqlite_path).parent.mkdir(parents=True, exist_ok=True)
    conn = await aiosqlite.connect(sqlite_path, isolation_level=None)
    try:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA busy_timeout=10000")
        await conn.execute("PRAGMA synchronous=FULL")
        conn.row_factory = sqlite3.Row
        ledger = DailyTokenLedger(SqliteDatabase(conn), budgets, clock=clock)
        await ledger.setup()
        yield ledger
    finally:
        await conn.close()
