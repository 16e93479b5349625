"""The daily token ledger (fleetward.runtime.budget) on the real PostgreSQL of the local
cluster, the variant shared by every replica of an Agent: replicas starting at once create
the table once; charges, reservations, thresholds and the UTC day behave as on SQLite; and
two processes (each with its own connections, like two replicas) racing on one agent's
budget never grant more than the budget, never both win the last tokens, and report each
alert threshold exactly once between them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fleetward.runtime.budget import (
    TABLE,
    BudgetExceeded,
    DailyBudget,
    DailyTokenLedger,
    open_daily_token_ledger,
)
from fleetward.runtime.persistence import open_persistence

from tests.support.databases import own_database


@pytest.fixture
def dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of its own, so the ledger holds exactly what the test wrote."""
    with own_database(postgres_dsn, "budget") as dsn:
        yield dsn


def rows(dsn: str) -> list[dict]:
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(f"SELECT agent, day, used, alert_level FROM {TABLE} ORDER BY agent, day").fetchall()


class Workers:
    """Processes that print one JSON line per step and wait for "go" on stdin where told."""

    def __init__(self, script: str, count: int, env: dict[str, str], log_dir: Path) -> None:
        self.procs = []
        self.logs = []
        for i in range(count):
            err = (log_dir / f"worker-{i}.err").open("w")
            self.logs.append(err)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", script],
                    env={**os.environ, **env},
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            )
        self.log_dir = log_dir

    def read(self, i: int) -> dict:
        p = self.procs[i]
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            p.wait(timeout=30)
            raise AssertionError(
                f"worker {i} exited ({p.returncode}) without output:\n{(self.log_dir / f'worker-{i}.err').read_text()}"
            )
        return json.loads(line)

    def ready_then_go(self, order: list[int] | None = None) -> None:
        """Wait until every worker is ready, then release them all at once."""
        for i in range(len(self.procs)):
            assert self.read(i) == {"ready": True}
        for i in order or range(len(self.procs)):
            stdin = self.procs[i].stdin
            assert stdin is not None
            stdin.write("go\n")
            stdin.flush()

    def finish(self) -> None:
        for i, p in enumerate(self.procs):
            assert p.wait(timeout=60) == 0, (self.log_dir / f"worker-{i}.err").read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


# -- replicas starting at once ------------------------------------------------------------------

STARTER = """
import asyncio, json, os, sys
from fleetward.runtime.budget import DailyBudget, open_daily_token_ledger

async def main():
    print(json.dumps({"ready": True}), flush=True)
    assert sys.stdin.readline().strip() == "go"
    async with open_daily_token_ledger(os.environ["DSN"], None, DailyBudget("ns/start", 1000)) as ledger:
        c = await ledger.charge("ns/start", 3)
        print(json.dumps({"used": c.used, "shared": ledger.shared}), flush=True)

asyncio.run(main())
"""


def test_replicas_starting_at_once_on_a_fresh_database_all_set_up_and_charge(dsn: str, tmp_path: Path):
    workers = Workers(STARTER, 8, {"DSN": dsn}, tmp_path)
    try:
        workers.ready_then_go()
        results = [workers.read(i) for i in range(8)]
        workers.finish()
    finally:
        workers.kill()
    assert all(r["shared"] for r in results)
    assert sorted(r["used"] for r in results) == [3 * k for k in range(1, 9)]
    assert [(r["agent"], r["used"]) for r in rows(dsn)] == [("ns/start", 24)]


# -- the same behaviour as the embedded variant -------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_charges_reservations_thresholds_and_the_day_on_postgres(dsn: str, tmp_path: Path):
    agent = "ns/billing"
    budget = DailyBudget(agent, 1000, (0.5, 0.8, 1.0))
    clock = Clock(datetime(2025, 6, 30, 23, 0, tzinfo=UTC))

    async def scenario():
        # the runtime's way in: its persistence (PostgreSQL when it has a DSN)
        async with open_persistence(dsn, str(tmp_path / "unused.db")) as p:
            ledger = DailyTokenLedger.from_persistence(p, budget, clock=clock)
            await ledger.setup()
            await ledger.setup()  # idempotent, and the second one takes the no-DDL path
            assert ledger.shared
            out = {}
            out["first"] = await ledger.charge(agent, 499)
            out["half"] = await ledger.charge(agent, 1)
            r = await ledger.reserve(agent, 400)  # 900: crosses 0.8
            out["reserved"] = r.charge
            out["refund"] = await ledger.settle(r, 100)  # 600
            with pytest.raises(BudgetExceeded) as refused:
                await ledger.charge(agent, 401)
            out["refused"] = refused.value
            out["again"] = await ledger.charge(agent, 300)  # 900 again: 0.8 not reported twice
            late = await ledger.reserve(agent, 100)  # 1000: crosses 1.0
            out["late"] = late.charge
            clock.now += timedelta(hours=2)  # 2025-07-01 01:00 UTC
            out["new_day"] = await ledger.charge(agent, 800)
            out["overrun"] = await ledger.settle(late, 150)  # booked on 2025-06-30, over its limit
            return out

    out = asyncio.run(scenario())
    assert (out["first"].used, out["first"].crossed) == (499, ())
    assert [x.threshold for x in out["half"].crossed] == [0.5]
    assert (out["reserved"].used, [x.threshold for x in out["reserved"].crossed]) == (900, [0.8])
    assert (out["refund"].tokens, out["refund"].used, out["refund"].crossed) == (-300, 600, ())
    assert str(out["refused"]) == (
        "daily token budget of agent ns/billing for 2025-06-30 (UTC) exceeded: 401 tokens requested, 600 of 1000 used,"
        " 400 left"
    )
    assert (out["again"].used, out["again"].crossed) == (900, ())
    assert (out["late"].used, [x.threshold for x in out["late"].crossed]) == (1000, [1.0])
    assert (out["new_day"].day, out["new_day"].used) == ("2025-07-01", 800)
    assert [x.threshold for x in out["new_day"].crossed] == [0.5, 0.8]
    assert (out["overrun"].day, out["overrun"].used, out["overrun"].crossed) == ("2025-06-30", 1050, ())
    assert [(r["day"], r["used"], r["alert_level"]) for r in rows(dsn)] == [
        ("2025-06-30", 1050, 1.0),
        ("2025-07-01", 800, 0.8),
    ]


# -- two replicas racing ---------------------------------------------------------------------------

RACER = """
import asyncio, json, os, random, sys
from fleetward.runtime.budget import BudgetExceeded, DailyBudget, open_daily_token_ledger

def ready_wait_go():
    print(json.dumps({"ready": True}), flush=True)
    assert sys.stdin.readline().strip() == "go"

async def main():
    rounds = int(os.environ["ROUNDS"])
    budgets = [DailyBudget("race/hammer", int(os.environ["LIMIT"]), (0.5, 0.8, 1.0))]
    budgets += [DailyBudget(f"race/duel-{i}", 100, (0.5, 1.0)) for i in range(rounds)]
    rng = random.Random(os.getpid())
    async with open_daily_token_ledger(os.environ["DSN"], None, budgets) as ledger:
        # Hammer: random charges of 1-9 tokens; after a refusal, 1 token; done when 1 is refused.
        ready_wait_go()
        grants, crossed, refusals, n = [], [], 0, rng.randint(1, 9)
        while True:
            try:
                c = await ledger.charge("race/hammer", n)
            except BudgetExceeded:
                refusals += 1
                if n == 1:
                    break
                n = 1
                continue
            grants.append([c.tokens, c.used])
            crossed += [x.threshold for x in c.crossed]
            n = rng.randint(1, 9)
        print(json.dumps({"grants": grants, "crossed": crossed, "refusals": refusals}), flush=True)
        # Duels: each agent has 10 tokens left; both processes ask for those 10 at once.
        for i in range(rounds):
            ready_wait_go()
            try:
                c = await ledger.charge(f"race/duel-{i}", 10)
                out = {"won": True, "used": c.used, "crossed": [x.threshold for x in c.crossed]}
            except BudgetExceeded as e:
                out = {"won": False, "error": str(e)}
            print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def test_two_replicas_racing_never_double_spend_and_alert_once(dsn: str, tmp_path: Path):
    limit, rounds = 3000, 40

    async def prepare():
        budgets = [DailyBudget(f"race/duel-{i}", 100, (0.5, 1.0)) for i in range(rounds)]
        async with open_daily_token_ledger(dsn, None, budgets) as ledger:
            return [await ledger.charge(f"race/duel-{i}", 90) for i in range(rounds)]

    prepared = asyncio.run(prepare())
    assert all([x.threshold for x in c.crossed] == [0.5] for c in prepared)

    workers = Workers(RACER, 2, {"DSN": dsn, "LIMIT": str(limit), "ROUNDS": str(rounds)}, tmp_path)
    try:
        workers.ready_then_go()
        hammer = [workers.read(i) for i in range(2)]
        duels = []
        for i in range(rounds):
            workers.ready_then_go([0, 1] if i % 2 == 0 else [1, 0])  # alternate who is released first
            duels.append([workers.read(w) for w in range(2)])
        workers.finish()
    finally:
        workers.kill()

    # Hammer: the grants of both processes form one chain 0 -> limit, each step seeing the one before.
    grants = sorted((used, tokens) for h in hammer for tokens, used in h["grants"])
    assert all(h["grants"] for h in hammer), "both processes were granted tokens (they did race)"
    assert sum(tokens for _, tokens in grants) == limit
    previous = 0
    for used, tokens in grants:
        assert used == previous + tokens, f"grant of {tokens} ending at {used} did not follow {previous}"
        previous = used
    assert previous == limit
    assert sum(1 for h in hammer for _, used in h["grants"] if used == limit) == 1  # one winner of the last tokens
    assert sorted(t for h in hammer for t in h["crossed"]) == [0.5, 0.8, 1.0]  # each alert once in total

    # Duels: exactly one winner per agent; the loser is told the budget is used up; 1.0 reported once.
    for i, (a, b) in enumerate(duels):
        assert a["won"] != b["won"], f"round {i}: {a} / {b}"
        winner, loser = (a, b) if a["won"] else (b, a)
        assert (winner["used"], winner["crossed"]) == (100, [1.0])
        assert f"agent race/duel-{i} for" in loser["error"]
        assert "10 tokens requested, 100 of 100 used, 0 left" in loser["error"]
    wins = [sum(1 for d in duels if d[w]["won"]) for w in range(2)]
    print(f"hammer grants per process: {[len(h['grants']) for h in hammer]}; duel wins per process: {wins}")

    stored = {r["agent"]: r["used"] for r in rows(dsn)}
    assert stored["race/hammer"] == limit
    assert all(stored[f"race/duel-{i}"] == 100 for i in range(rounds))
