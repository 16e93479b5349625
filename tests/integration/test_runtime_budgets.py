"""Budgets in the running specialist runtime (SPEC §4 "Budgets", issue 7 §3): local
`fleetward runtime run` processes against the real Kafka, the real GitHouse tool service,
the real PostgreSQL of the local cluster (for the daily ledger) and the LLM stand-in, which
reports the usage each rule sets.

- each per-run cap (tokens, tool calls, steps) stops a run with a partial result (`message`)
  and `budget_exceeded`; the run is marked `budget_stopped` and audited, never dead-lettered;
- the daily budget refuses the next run once used up, thresholds are alerted on the alerts
  topic once each, and the utilisation gauge shows the shared ledger;
- two replicas on one PostgreSQL racing for the last tokens: exactly one run proceeds.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from fleetward.runtime.budget import DailyBudget, open_daily_token_ledger

from fleetward.llmstandin import StandinServer
from fleetward.toolkit import jwks_document, public_jwk
from fleetward.toolkit.examples.githouse.backend import GitHouseBackend
from tests.support.databases import own_database
from tests.support.runtime import (
    REFUND_SOP,
    EventReader,
    GitHouseTools,
    LocalAgent,
    TopicReader,
    agent_spec,
    billing_tools,
    produce,
    render_local_agent,
    user_message,
)

REFUND_TEXT = "I was charged twice for txn_1002, please refund it"
VERIFY = {"name": "verify_transaction", "arguments": {"account": "jdoe", "transaction_id": "txn_1002"}}
REFUND = {"name": "issue_refund", "arguments": {"transaction_id": "txn_1002", "amount_cents": 2100}}


def refund_rules(model: str, usage: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """verify -> refund -> answer, each answer reporting `usage`."""
    extra = {"usage": usage} if usage else {}
    return [
        {
            "name": f"{model}-answer",
            "match": {"model": model, "toolResultFor": "issue_refund"},
            "respond": {"content": "Refund issued.", **extra},
        },
        {
            "name": f"{model}-refund",
            "match": {"model": model, "toolResultFor": "verify_transaction"},
            "respond": {"content": "Verified; refunding now.", "toolCalls": [REFUND], **extra},
        },
        {
            "name": f"{model}-verify",
            "match": {"model": model, "lastRole": "user"},
            "respond": {"content": "Let me verify txn_1002 first.", "toolCalls": [VERIFY], **extra},
        },
    ]


SCENARIO = [
    *refund_rules("m-tokens", {"promptTokens": 150, "completionTokens": 50}),
    *refund_rules("m-tools"),
    *refund_rules("m-steps"),
    {
        "name": "m-daily-answer",
        "match": {"model": "m-daily"},
        "respond": {"content": "Refund noted.", "usage": {"promptTokens": 4000, "completionTokens": 100}},
    },
    {
        "name": "m-race-answer",
        "match": {"model": "m-race"},
        "delaySeconds": 2,
        "respond": {"content": "Refund noted.", "usage": {"promptTokens": 1500, "completionTokens": 400}},
    },
]


@dataclass
class Rig:
    bootstrap: str
    llm: StandinServer
    tools: GitHouseTools
    events: EventReader
    alerts: TopicReader
    workdir: Path
    keys: list[dict[str, str]]

    def send(self, agent: LocalAgent, text: str = REFUND_TEXT, partition: int | None = None) -> str:
        session = f"s-{uuid.uuid4().hex[:12]}"
        cmd = user_message(agent.ref, session, text)
        if partition is None:
            produce(self.bootstrap, agent.request_topic, cmd.to_json(), session)
        else:
            p = Producer({"bootstrap.servers": self.bootstrap})
            p.produce(agent.request_topic, cmd.to_json(), key=session, partition=partition)
            assert p.flush(15) == 0
        return session

    def agent(
        self, name: str, model: str, budget: dict[str, Any], *, dsn: str | None = None, pod: str = "0"
    ) -> LocalAgent:
        spec = agent_spec(self.llm.url, billing_tools(self.tools.port), model=model, budget=budget)
        agent = render_local_agent(
            self.workdir / f"{name}-{pod}",
            bootstrap=self.bootstrap,
            spec=spec,
            sops={"refunds": REFUND_SOP},
            name=name,
            dsn=dsn,
        )
        # The tool service trusts every agent key of this module (its JWKS file is polled).
        self.keys.append(public_jwk(agent.key.private.public_key(), agent.key.kid, agent.ref))
        (self.workdir / "jwks.json").write_text(jwks_document(self.keys))
        return agent


@pytest.fixture(scope="module")
def rig(kafka, tmp_path_factory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("runtime-budgets")
    (workdir / "jwks.json").write_text(jwks_document([]))
    tools = GitHouseTools(workdir / "jwks.json", backend=GitHouseBackend())
    with StandinServer(SCENARIO) as llm:
        tools.start()
        events = EventReader(kafka.bootstrap)
        alerts = TopicReader(kafka.bootstrap, "fleetward.alerts")
        try:
            yield Rig(kafka.bootstrap, llm, tools, events, alerts, workdir, [])
        finally:
            events.close()
            alerts.close()
            tools.stop()


@pytest.fixture
def dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of its own: the ledger, checkpoints and audit chain hold only this test's rows."""
    with own_database(postgres_dsn, "budgets") as dsn:
        yield dsn


def started(*agents: LocalAgent) -> list[LocalAgent]:
    try:
        for a in agents:
            a.start()
        for a in agents:
            a.wait_ready(120)
    except BaseException:
        for a in agents:  # a replica that did start must not outlive the failed test
            a.stop()
        raise
    return list(agents)


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def sqlite_rows(agent: LocalAgent, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with sqlite3.connect(agent.dir / "state.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params).fetchall()]


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


def assert_stopped(rig: Rig, agent: LocalAgent, session: str, budget: str, limit: int, used: int) -> Any:
    """The session ends with the partial result and budget_exceeded; the run is marked
    budget_stopped, audited, and not dead-lettered."""
    events = rig.events.wait_for(session, "budget_exceeded", timeout=90)
    assert types(events)[-2:] == ["message", "budget_exceeded"]
    assert not {"failed", "resolved"} & set(types(events))
    data = events[-1].data
    assert (data.budget, data.limit, data.used) == (budget, limit, used)
    assert events[-2].data.text == data.partial and data.partial
    run_id = events[-1].run_id
    wait_for(
        lambda: (
            (agent.dir / "state.db").exists()
            and sqlite_rows(agent, "SELECT status FROM fw_runs WHERE run_id = ?", (run_id,))
            == [{"status": "budget_stopped"}]
        ),
        20,
        "the run marked budget_stopped",
    )
    audit = wait_for(
        lambda: sqlite_rows(agent, "SELECT target, details FROM fw_audit_log WHERE action = 'budget.stop'"),
        20,
        "the budget stop's audit record",
    )
    details = [json.loads(r["details"]) for r in audit]
    assert [(d["runId"], d["budget"], d["limit"], d["used"]) for d in details] == [(run_id, budget, limit, used)]
    assert audit[0]["target"] == f"session:{session}"
    assert agent.metric("fleetward_runtime_requests_total", outcome="budget_stopped") >= 1
    assert agent.metric("fleetward_runtime_requests_total", outcome="dead_lettered") == 0
    return events


# --- per-run caps -----------------------------------------------------------------------------------


def test_each_per_run_cap_stops_a_run_with_a_partial_result_and_budget_exceeded(rig: Rig):
    tokens = rig.agent("b-tokens", "m-tokens", {"maxTokensPerRun": 300})
    tool_calls = rig.agent("b-tools", "m-tools", {"maxToolCallsPerRun": 1})
    steps = rig.agent("b-steps", "m-steps", {"maxStepsPerRun": 2})
    agents = started(tokens, tool_calls, steps)
    try:
        s_tokens, s_tools, s_steps = rig.send(tokens), rig.send(tool_calls), rig.send(steps)

        # Tokens: 200 per call; the 2nd call reaches 400 >= 300 and asks for the refund: not run.
        events = assert_stopped(rig, tokens, s_tokens, "tokens", 300, 400)
        assert [e.data.tool for e in events if e.type == "tool_call"] == ["verify_transaction"]
        partial = events[-1].data.partial
        assert partial.startswith("Verified; refunding now.") and "300 model tokens" in partial
        assert "Completed so far: verify_transaction." in partial
        assert len(rig.llm.requests(model="m-tokens")) == 2

        # Tool calls: one allowed (verify); the refund asked for next is not run.
        events = assert_stopped(rig, tool_calls, s_tools, "toolCalls", 1, 1)
        assert [e.data.tool for e in events if e.type == "tool_call"] == ["verify_transaction"]
        assert "the limit of 1 tool calls" in events[-1].data.partial
        run_id = events[-1].run_id
        assert not [e for e in rig.tools.effects() if e["runId"] == run_id]

        # Steps: two model calls (verify, refund: both tools run); the third is never made.
        events = assert_stopped(rig, steps, s_steps, "steps", 2, 2)
        assert [e.data.tool for e in events if e.type == "tool_call"] == ["verify_transaction", "issue_refund"]
        assert len(rig.llm.requests(model="m-steps")) == 2
        assert [e["tool"] for e in rig.tools.effects() if e["runId"] == events[-1].run_id] == ["issue_refund"]
    finally:
        for a in agents:
            a.stop()


# --- the daily budget on PostgreSQL --------------------------------------------------------------------


def held(agent: LocalAgent) -> set[int]:
    """The request partitions the replica holds now, from its log (assigned/revoked lines)."""
    owned: set[int] = set()
    for line in agent.log().splitlines():
        m = re.search(r"(assigned|revoked) partitions \[([0-9, ]*)\]", line)
        if m:
            parts = {int(p) for p in m.group(2).split(",") if p.strip()}
            owned = owned | parts if m.group(1) == "assigned" else owned - parts
    return owned


def alerts_of(rig: Rig, agent: str) -> list[dict[str, Any]]:
    out = []
    for key, value, _ in rig.alerts.snapshot():
        alert = json.loads(value)
        if key == agent and alert.get("type") == "budget_threshold":
            out.append(alert)
    return out


def test_the_daily_budget_refuses_the_next_run_once_used_up_and_alerts_each_threshold_once(rig: Rig, dsn: str):
    agent = rig.agent("b-daily", "m-daily", {"dailyTokenBudget": 5000}, dsn=dsn)
    started(agent)
    try:
        first = rig.send(agent)
        events = rig.events.wait_for(first, "resolved", timeout=90)
        assert events[-2].data.text == "Refund noted."
        # 4100 of 5000 used (82 %): the gauge shows it, 50 % and 80 % were alerted.
        wait_for(lambda: agent.metric("fleetward_budget_utilization_ratio") == pytest.approx(0.82), 10, "gauge")

        second = rig.send(agent)
        events = rig.events.wait_for(second, "budget_exceeded", timeout=90)
        assert types(events)[-2:] == ["message", "budget_exceeded"] and "failed" not in types(events)
        data = events[-1].data
        assert (data.budget, data.limit, data.used) == ("dailyTokens", 5000, 4100)
        assert "daily allowance of 5000 model tokens" in data.partial
        assert len(rig.llm.requests(model="m-daily")) == 1  # the refused run never reached the model

        with psycopg.connect(dsn) as conn:
            used = conn.execute("SELECT used FROM fleetward_token_ledger WHERE agent = %s", (agent.ref,)).fetchall()
            assert used == [(4100,)]
            # The executor records the outcome once the graph has returned, just after the
            # graph's last event went out: wait for it rather than race it.
            run_id = events[-1].run_id
            wait_for(
                lambda: (
                    conn.execute("SELECT status FROM fw_runs WHERE run_id = %s", (run_id,)).fetchall()
                    == [("budget_stopped",)]
                ),
                10,
                "the run's status budget_stopped",
            )
            audit = conn.execute("SELECT details FROM fw_audit_log WHERE action = 'budget.stop'").fetchall()
            assert [json.loads(d)["budget"] for (d,) in audit] == ["dailyTokens"]

        alerts = wait_for(lambda: len(alerts_of(rig, agent.ref)) >= 2 and alerts_of(rig, agent.ref), 20, "alerts")
        time.sleep(2)  # nothing more comes
        alerts = alerts_of(rig, agent.ref)
        assert sorted(a["data"]["threshold"] for a in alerts) == [0.5, 0.8]
        assert all(a["schema"] == "fleetward.alert.v1" and a["data"]["limit"] == 5000 for a in alerts)
        assert {a["sessionId"] for a in alerts} == {first}
    finally:
        agent.stop()


def test_two_replicas_racing_for_the_last_tokens_let_exactly_one_run_proceed(rig: Rig, dsn: str):
    name = f"b-race-{uuid.uuid4().hex[:6]}"
    budget = {"dailyTokenBudget": 100_000, "alertThresholds": [0.99]}
    replicas = [rig.agent(name, "m-race", budget, dsn=dsn, pod=str(i)) for i in range(2)]
    for i, r in enumerate(replicas):
        r.env["POD_NAME"] = f"{name}-{i}"
    ref = replicas[0].ref

    async def leave(tokens: int) -> None:
        async with open_daily_token_ledger(dsn, None, DailyBudget(ref, 100_000, (0.99,))) as ledger:
            await ledger.charge(ref, 100_000 - tokens)

    # 2000 tokens left: one reservation (prompt estimate + 1024 for the answer) fits, two do not;
    # the winner settles 1900, so nothing is left for a late loser either.
    asyncio.run(leave(2000))
    started(*replicas)
    try:
        wait_for(
            lambda: all(held(r) for r in replicas) and set().union(*(held(r) for r in replicas)) == {0, 1, 2},
            60,
            "both replicas holding partitions",
        )
        sessions = [rig.send(replicas[0], partition=p) for p in range(3)]
        ends = {}
        for s in sessions:
            deadline = time.monotonic() + 90
            while s not in ends:
                assert time.monotonic() < deadline, f"session {s} did not end"
                kinds = types(rig.events.session(s))
                if "resolved" in kinds or "budget_exceeded" in kinds:
                    ends[s] = "resolved" if "resolved" in kinds else "budget_exceeded"
                time.sleep(0.1)
        assert sorted(ends.values()) == ["budget_exceeded", "budget_exceeded", "resolved"]
        assert sum(r.metric("fleetward_runtime_requests_total") for r in replicas) == 3
        assert all(r.metric("fleetward_runtime_requests_total") >= 1 for r in replicas)  # both raced
        with psycopg.connect(dsn) as conn:
            (used,) = conn.execute("SELECT used FROM fleetward_token_ledger WHERE agent = %s", (ref,)).fetchone()
        assert used == 100_000 - 2000 + 1900 <= 100_000
        time.sleep(2)
        assert [a["data"]["threshold"] for a in alerts_of(rig, ref)] == [0.99]  # once, across replicas
    finally:
        for r in replicas:
            r.stop()
