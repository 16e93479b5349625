"""The daily token ledger (fleetward.runtime.budget) on its embedded SQLite variant: charges
and refusals, reservations settled with the actual use, alert thresholds reported once per
day, the UTC day rollover (injected clock), the utilization gauge, and no double spending
between coroutines on one connection and between two processes on one file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from fleetward.runtime.budget import (
    TABLE,
    BudgetError,
    BudgetExceeded,
    DailyBudget,
    DailyTokenLedger,
    open_daily_token_ledger,
)
from fleetward.runtime.persistence import open_persistence
from prometheus_client import REGISTRY

from fleetward.api.agent import Budget
from fleetward.api.runtimeconfig import RuntimeConfig

AGENT = "ns/billing"


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def run(coro):
    return asyncio.run(coro)


def gauge(agent: str) -> float | None:
    return REGISTRY.get_sample_value("fleetward_budget_utilization_ratio", {"agent": agent})


def ledger_on(tmp_path: Path, *budgets: DailyBudget, clock=None):
    kwargs = {"clock": clock} if clock else {}
    return open_daily_token_ledger(None, str(tmp_path / "state.db"), budgets, **kwargs)


# -- the budget from the Agent's spec ------------------------------------------------------------


def test_the_budget_comes_from_spec_budget_and_none_without_a_daily_budget():
    budget = DailyBudget.from_spec(
        AGENT, Budget.model_validate({"dailyTokenBudget": 1000, "alertThresholds": [1.0, 0.5]})
    )
    assert budget == DailyBudget(AGENT, 1000, (0.5, 1.0))
    assert DailyBudget.from_spec(AGENT, Budget.model_validate({"dailyTokenBudget": 10})).thresholds == (0.5, 0.8, 0.95)
    assert DailyBudget.from_spec(AGENT, Budget()) is None

    config = RuntimeConfig.model_validate(
        {
            "installation": {"namespace": "fleetward-system", "trustBundle": {"namespace": "fleetward-system"}},
            "agent": {"namespace": "ns", "name": "billing"},
            "spec": {
                "role": "specialist",
                "model": {"name": "m", "baseURL": "http://127.0.0.1:1/v1"},
                "budget": {"dailyTokenBudget": 5000, "alertThresholds": [0.8]},
            },
            "topics": {"request": "fleetward.requests.ns.billing"},
            "kafka": {"bootstrapServers": "127.0.0.1:9092", "consumerGroup": "g"},
            "credentials": {"signingKeyFile": "/k", "keyId": "kid"},
        }
    )
    assert DailyBudget.from_config(config) == DailyBudget("ns/billing", 5000, (0.8,))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("billing", 10), "agent 'billing': expected namespace/name"),
        ((AGENT, 0), "agent ns/billing: dailyTokenBudget must be a whole number >= 1, got 0"),
        ((AGENT, 10, (0.5, 1.5)), r"agent ns/billing: alertThresholds must be fractions in \(0, 1\], got \[1.5\]"),
        ((AGENT, 10, (0.0,)), r"alertThresholds must be fractions in \(0, 1\], got \[0.0\]"),
    ],
)
def test_a_bad_budget_is_refused_with_the_agent_and_the_value(args, message):
    with pytest.raises(BudgetError, match=message):
        DailyBudget(*args)


def test_threshold_boundaries_are_exact_decimal_fractions_of_the_limit():
    budget = DailyBudget(AGENT, 1000, (0.5, 0.8, 0.95, 1.0))
    assert [budget.boundary(t) for t in budget.thresholds] == [500, 800, 950, 1000]
    assert DailyBudget(AGENT, 3, (0.5,)).boundary(0.5) == 2  # 1.5 tokens: reached at 2
    assert DailyBudget(AGENT, 10, (0.01,)).boundary(0.01) == 1


# -- charges, refusals, thresholds ---------------------------------------------------------------


def test_charges_are_granted_until_the_budget_is_used_and_a_refusal_names_agent_and_numbers(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 100, (0.5,))) as ledger:
            first = await ledger.charge(AGENT, 60)
            with pytest.raises(BudgetExceeded) as refused:
                await ledger.charge(AGENT, 41)
            after_refusal = await ledger.usage(AGENT)
            last = await ledger.charge(AGENT, 40)
            with pytest.raises(BudgetExceeded) as empty:
                await ledger.charge(AGENT, 1)
            zero = await ledger.charge(AGENT, 0)  # asking for nothing is granted, also when full
            return first, refused.value, after_refusal, last, empty.value, zero, ledger.today()

    first, refused, after_refusal, last, empty, zero, day = run(scenario())
    assert (first.tokens, first.used, first.remaining, first.utilization) == (60, 60, 40, 0.6)
    assert str(refused) == (
        f"daily token budget of agent ns/billing for {day} (UTC) exceeded: 41 tokens requested, 60 of 100 used, 40 left"
    )
    assert (refused.agent, refused.day, refused.requested, refused.used, refused.limit) == (AGENT, day, 41, 60, 100)
    assert after_refusal.used == 60  # a refusal takes nothing
    assert (last.used, last.remaining) == (100, 0)
    assert "1 tokens requested, 100 of 100 used, 0 left" in str(empty)
    assert zero.used == 100 and zero.crossed == ()


def test_a_charge_larger_than_the_whole_budget_is_refused_without_touching_the_ledger(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 100)) as ledger:
            with pytest.raises(BudgetExceeded, match="101 tokens requested, 0 of 100 used, 100 left"):
                await ledger.charge(AGENT, 101)
            rows = await ledger.db.fetchall(f"SELECT * FROM {TABLE}")
            return rows

    assert run(scenario()) == []


def test_bad_arguments_are_errors_that_name_the_agent(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 100)) as ledger:
            with pytest.raises(
                BudgetError, match="no daily token budget configured for agent ns/other \\(configured: ns/billing\\)"
            ):
                await ledger.charge("ns/other", 1)
            with pytest.raises(
                BudgetError, match="charge for agent ns/billing: tokens must be a whole number >= 0, got -5"
            ):
                await ledger.charge(AGENT, -5)
            with pytest.raises(BudgetError, match=r"got 2\.5"):
                await ledger.reserve(AGENT, 2.5)  # type: ignore[arg-type]

    run(scenario())


def test_each_threshold_is_reported_once_by_the_charge_that_crosses_it(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 1000, (0.5, 0.8, 0.95, 1.0))) as ledger:
            out = []
            for n in (499, 1, 1, 350, 100, 49):
                c = await ledger.charge(AGENT, n)
                out.append((c.used, [x.threshold for x in c.crossed]))
            return out, (await ledger.usage(AGENT)).alert_level

    steps, level = run(scenario())
    assert steps == [
        (499, []),
        (500, [0.5]),  # used / limit = 0.5 reaches the threshold
        (501, []),
        (851, [0.8]),
        (951, [0.95]),
        (1000, [1.0]),
    ]
    assert level == 1.0


def test_one_charge_crossing_several_thresholds_reports_them_all_in_order(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 100, (0.8, 0.5, 0.95))) as ledger:
            return await ledger.charge(AGENT, 96)

    c = run(scenario())
    assert [(x.agent, x.threshold, x.used, x.limit) for x in c.crossed] == [
        (AGENT, 0.5, 96, 100),
        (AGENT, 0.8, 96, 100),
        (AGENT, 0.95, 96, 100),
    ]
    assert all(x.day == c.day for x in c.crossed)


# -- reservations ---------------------------------------------------------------------------------


def test_a_reservation_settles_to_the_actual_use_refunding_or_charging_the_difference(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 1000, (0.5, 1.0))) as ledger:
            r1 = await ledger.reserve(AGENT, 600)  # crosses 0.5 when reserved
            s1 = await ledger.settle(r1, 200)  # refund 400: back under 0.5
            r2 = await ledger.reserve(AGENT, 400)  # 600 again: 0.5 is not reported a second time
            s2 = await ledger.settle(r2, 900)  # the call used more than estimated: booked, over the limit
            with pytest.raises(BudgetExceeded, match="1 tokens requested, 1100 of 1000 used, 0 left"):
                await ledger.reserve(AGENT, 1)
            with pytest.raises(BudgetError, match="already settled with 900 tokens"):
                await ledger.settle(r2, 10)
            return r1, s1, r2, s2, await ledger.usage(AGENT)

    r1, s1, r2, s2, usage = run(scenario())
    assert [x.threshold for x in r1.charge.crossed] == [0.5] and r1.settled and r1.settled_tokens == 200
    assert (s1.tokens, s1.used, s1.crossed) == (-400, 200, ())
    assert (r2.charge.used, r2.charge.crossed) == (600, ())
    assert (s2.tokens, s2.used, [x.threshold for x in s2.crossed]) == (500, 1100, [1.0])
    assert s2.remaining == 0 and s2.utilization == 1.1
    assert (usage.used, usage.alert_level) == (1100, 1.0)


def test_a_refund_never_takes_usage_below_zero(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 100)) as ledger:
            r = await ledger.reserve(AGENT, 30)
            await ledger.charge(AGENT, 5)
            await ledger.db.execute(f"UPDATE {TABLE} SET used = 10")  # e.g. an operator corrected the row
            return await ledger.settle(r, 0)

    assert run(scenario()).used == 0


# -- the UTC day ----------------------------------------------------------------------------------


def test_a_new_utc_day_starts_a_fresh_budget_and_fresh_alerts(tmp_path: Path):
    clock = Clock(datetime(2025, 3, 1, 23, 59, 30, tzinfo=UTC))

    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 100, (0.5, 1.0)), clock=clock) as ledger:
            day1 = await ledger.charge(AGENT, 100)
            with pytest.raises(BudgetExceeded, match="for 2025-03-01 \\(UTC\\)"):
                await ledger.charge(AGENT, 1)
            late = await ledger.reserve(AGENT, 0)  # a run reserving just before midnight...
            clock.now += timedelta(seconds=45)
            day2 = await ledger.charge(AGENT, 60)
            settled = await ledger.settle(late, 7)  # ...pays its overrun from the day it reserved on
            # 00:30 in UTC+02:00 is still 2025-03-01 22:30 UTC: the day is the UTC one
            clock.now = datetime(2025, 3, 2, 0, 30, tzinfo=timezone(timedelta(hours=2)))
            still_day1 = ledger.today()
            return day1, day2, settled, still_day1, await ledger.usage(AGENT, "2025-03-01")

    day1, day2, settled, still_day1, usage1 = run(scenario())
    assert (day1.day, day1.used, [x.threshold for x in day1.crossed]) == ("2025-03-01", 100, [0.5, 1.0])
    assert (day2.day, day2.used, [x.threshold for x in day2.crossed]) == ("2025-03-02", 60, [0.5])
    assert (settled.day, settled.used) == ("2025-03-01", 107)
    assert still_day1 == "2025-03-01" and usage1.used == 107


def test_a_naive_clock_is_an_error(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 100), clock=lambda: datetime(2025, 1, 1)) as ledger:
            await ledger.charge(AGENT, 1)

    with pytest.raises(BudgetError, match="naive datetime"):
        run(scenario())


# -- the gauge ---------------------------------------------------------------------------------------


def test_the_utilization_gauge_follows_charges_refusals_and_settlements(tmp_path: Path):
    agent = "ns/gauge"

    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(agent, 200)) as ledger:
            seen = []
            r = await ledger.reserve(agent, 50)
            seen.append(gauge(agent))
            await ledger.settle(r, 20)
            seen.append(gauge(agent))
            await ledger.db.execute(f"UPDATE {TABLE} SET used = 150")  # another pod's charges
            with pytest.raises(BudgetExceeded):
                await ledger.charge(agent, 100)
            seen.append(gauge(agent))  # the refusal shows the usage it read
            return seen

    assert run(scenario()) == [0.25, 0.1, 0.75]


# -- the runtime's own database -----------------------------------------------------------------------


def test_the_ledger_lives_in_the_runtimes_sqlite_file_and_survives_a_reopen(tmp_path: Path):
    budget = DailyBudget(AGENT, 100)
    db = str(tmp_path / "state.db")

    async def scenario():
        async with open_persistence(None, db) as p:
            ledger = DailyTokenLedger.from_persistence(p, budget)
            await ledger.setup()
            await ledger.setup()  # idempotent
            assert not ledger.shared
            await ledger.charge(AGENT, 70)
        async with open_persistence(None, db) as p:
            ledger = DailyTokenLedger.from_persistence(p, [budget])
            await ledger.setup()
            with pytest.raises(BudgetExceeded, match="31 tokens requested, 70 of 100 used, 30 left"):
                await ledger.charge(AGENT, 31)
            return await ledger.charge(AGENT, 30)

    assert run(scenario()).used == 100


def test_without_a_dsn_or_path_the_ledger_says_what_it_needs():
    async def scenario():
        async with open_daily_token_ledger(None, None, DailyBudget(AGENT, 1)):
            pass

    with pytest.raises(BudgetError, match="needs a PostgreSQL DSN or an SQLite path"):
        run(scenario())


# -- concurrency on SQLite ----------------------------------------------------------------------------


def test_concurrent_charges_on_one_connection_never_exceed_the_budget(tmp_path: Path):
    async def scenario():
        async with ledger_on(tmp_path, DailyBudget(AGENT, 500, (0.5, 0.8, 1.0))) as ledger:

            async def one(n: int):
                try:
                    return await ledger.charge(AGENT, n)
                except BudgetExceeded:
                    return None

            results = await asyncio.gather(*(one(1 + i % 7) for i in range(300)))
            return [r for r in results if r is not None], await ledger.usage(AGENT)

    granted, usage = run(scenario())
    assert sum(c.tokens for c in granted) == usage.used <= 500
    assert len({c.used for c in granted}) == len(granted)  # every grant saw the one before it
    assert sorted(x.threshold for c in granted for x in c.crossed) == [0.5, 0.8] + ([1.0] if usage.used == 500 else [])


WORKER = """
import asyncio, json, os, sys
from fleetward.runtime.budget import BudgetExceeded, DailyBudget, open_daily_token_ledger

async def main():
    budget = DailyBudget("ns/race", int(os.environ["LIMIT"]), (0.5, 0.8, 1.0))
    async with open_daily_token_ledger(None, os.environ["DB"], budget) as ledger:
        print("ready", flush=True)
        sys.stdin.readline()
        grants, crossed = [], []
        while True:
            try:
                c = await ledger.charge("ns/race", 1)
            except BudgetExceeded:
                break
            grants.append(c.used)
            crossed += [x.threshold for x in c.crossed]
        print(json.dumps({"grants": grants, "crossed": crossed}), flush=True)

asyncio.run(main())
"""


def test_two_processes_on_one_sqlite_file_cannot_both_win_the_last_tokens(tmp_path: Path):
    limit = 400
    db = str(tmp_path / "state.db")
    env = {**os.environ, "DB": db, "LIMIT": str(limit)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:  # both start at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.readline()))
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    grants = [used for r in results for used in r["grants"]]
    assert sorted(grants) == list(range(1, limit + 1))  # every token granted once, to one process
    assert sum(1 for r in results if limit in r["grants"]) == 1  # one process won the last token
    assert sorted(t for r in results for t in r["crossed"]) == [0.5, 0.8, 1.0]
