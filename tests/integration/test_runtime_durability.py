"""Durability of the runtime as a local process against the real Kafka and PostgreSQL:
SIGKILL in the middle of a mutating tool call, SIGTERM mid-run, and the kill switch's
halt/resume over the control topic."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import time
import uuid
from pathlib import Path

from fleetward.runtime.runs import CRASH_LIMIT

from fleetward.api.envelopes import ControlMessage, parse_ack
from fleetward.devcluster.process import free_port
from tests.support.runtime import (
    PII_GUARDRAIL,
    REFUND_SOP,
    GitHouseTools,
    HoldingProxy,
    TopicReader,
    agent_spec,
    billing_tools,
    committed_offset,
    control,
    produce,
    render_local_agent,
    user_message,
)

VERIFY = {"name": "verify_transaction", "arguments": {"account": "jdoe", "transaction_id": "txn_1002"}}
REFUND = {"name": "issue_refund", "arguments": {"transaction_id": "txn_1002", "amount_cents": 2100}}


def refund_script(
    *, verify_delay: float = 0, verify_gate: str | None = None, refund_gate: str | None = None
) -> list[dict]:
    """The refund SOP's model turns. A `*_gate` holds that model call until the test opens the
    gate (`llm.open_gate`): for a test that must act while the call is in flight."""

    def held(gate: str | None) -> dict:
        return {"waitForGate": gate} if gate else {}

    return [
        {"name": "reply", "match": {"toolResultFor": "issue_refund"}, "respond": {"content": "Refunded."}},
        {
            "name": "refund",
            "match": {"toolResultFor": "verify_transaction"},
            **held(refund_gate),
            "respond": {"toolCalls": [REFUND]},
        },
        {
            "name": "verify",
            "match": {"lastRole": "user"},
            "delaySeconds": verify_delay,
            **held(verify_gate),
            "respond": {"toolCalls": [VERIFY]},
        },
    ]


def wait_for_log(agent, pattern: str, timeout: float = 60) -> None:
    """Until the runtime's log has a line matching `pattern` (a regular expression)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, agent.log(tail=None)):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{agent.log()}"
        time.sleep(0.05)


def billing_agent(tmp_path: Path, kafka, llm, tools_port: int, **kw):
    """A local billing specialist with the refund SOP, its tools at `tools_port`."""
    return render_local_agent(
        tmp_path,
        bootstrap=kafka.bootstrap,
        spec=agent_spec(llm.url, billing_tools(tools_port)),
        sops={"refunds": REFUND_SOP},
        **kw,
    )


def ask_refund(kafka, agent) -> str:
    """A refund request on a new session, on the agent's request topic; returns the session."""
    session = f"s-{uuid.uuid4().hex[:12]}"
    produce(
        kafka.bootstrap, agent.request_topic, user_message(agent.ref, session, "refund txn_1002").to_json(), session
    )
    return session


def wait_for_verify_call(llm, agent, timeout: float = 60) -> None:
    """Until the run's first model call (rule `verify`) reached the stand-in."""
    deadline = time.monotonic() + timeout
    while not llm.requests(rule="verify") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert llm.requests(rule="verify"), agent.log()


def switch_order(agent, switch: str, type_: str, generation: int, **kw) -> str:
    """A control order of KillSwitch `switch` for this agent, as JSON."""
    return ControlMessage.new(type_, kill_switch=switch, generation=generation, agents=[agent.ref], **kw).to_json()


def assert_clean_stream(events) -> None:
    """Nothing lost or doubled: sequences 0..n-1, unique ids, one event per key."""
    assert [e.sequence for e in events] == list(range(len(events))), [(e.sequence, e.type) for e in events]
    assert len({e.id for e in events}) == len(events)
    calls = [e.data.call_id for e in events if e.type == "tool_call"]
    assert len(calls) == len(set(calls)), calls
    assert sum(e.type == "resolved" for e in events) == 1


def test_sigkill_during_a_mutating_tool_call_completes_the_run_with_the_effect_applied_once(
    kafka, postgres_dsn, llm, events, tmp_path: Path
):
    tools = GitHouseTools(tmp_path / "jwks.json")
    proxy = HoldingProxy(tools.port, hold_path="/tools/issue_refund")
    llm.set_scenario(refund_script())
    agent = billing_agent(tmp_path, kafka, llm, proxy.port, guardrails={"pii": PII_GUARDRAIL}, dsn=postgres_dsn)
    with tools, proxy.start():
        proxy.hold.set()
        agent.start().wait_ready(90)
        try:
            session = f"s-{uuid.uuid4().hex[:12]}"
            produce(
                kafka.bootstrap,
                agent.request_topic,
                user_message(agent.ref, session, "refund txn_1002").to_json(),
                session,
            )
            # The refund reached the tool service and was applied; its answer is held back.
            assert proxy.held.wait(60), agent.log()
            deadline = time.monotonic() + 10
            while not [e for e in tools.effects() if e["tool"] == "issue_refund"] and time.monotonic() < deadline:
                time.sleep(0.02)
            applied = [e for e in tools.effects() if e["tool"] == "issue_refund"]
            assert len(applied) == 1
            agent.kill()  # SIGKILL: no chance to checkpoint the tool result or commit the request
            proxy.hold.clear()
            proxy.release.set()
            agent.start().wait_ready(90)
            stream = events.wait_for(session, "resolved", 90)
            run_id = stream[0].run_id
            # The effect happened once: the replayed call carried the same Idempotency-Key.
            effects = [e for e in tools.effects() if e["runId"] == run_id]
            assert [e["tool"] for e in effects] == ["issue_refund"]
            assert tools.metric("githouse_tool_calls_total", tool="issue_refund") == 2  # the original and the replay
        finally:
            agent.stop()
    assert {e.run_id for e in stream} == {run_id}
    refund_result = [e.data for e in stream if e.type == "tool_result" and e.data.tool == "issue_refund"]
    assert (
        len(refund_result) == 1
        and refund_result[0].ok
        and refund_result[0].result["refundId"] == applied[0]["result"]["refundId"]
    )
    assert_clean_stream(stream)
    # The model was not asked again for steps that were checkpointed before the kill.
    assert len(llm.requests(rule="verify")) == 1 and len(llm.requests(rule="refund")) == 1
    assert "persistence: postgres" in agent.log()


def test_sigterm_mid_run_finishes_the_step_and_a_restart_completes_the_run(kafka, llm, events, tmp_path: Path):
    tools = GitHouseTools(tmp_path / "jwks.json")
    llm.set_scenario(refund_script(refund_gate="terminating"))
    agent = billing_agent(tmp_path, kafka, llm, tools.port)
    with tools:
        agent.start().wait_ready(90)
        try:
            session = f"s-{uuid.uuid4().hex[:12]}"
            partition, offset = produce(
                kafka.bootstrap,
                agent.request_topic,
                user_message(agent.ref, session, "refund txn_1002").to_json(),
                session,
            )
            group = agent.config.kafka.consumer_group
            deadline = time.monotonic() + 60
            while not llm.requests(rule="refund") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert llm.requests(rule="refund"), agent.log()
            started = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            # The model call answers only once the runtime is stopping: its step must finish.
            wait_for_log(agent, "stopping: no new work")
            llm.open_gate("terminating")
            assert agent.proc.wait(30) == 0
            # It waited for the model step to finish, then stopped before the refund tool.
            assert time.monotonic() - started < 20
            assert llm.requests(rule="refund")[0]["outcome"] == "answered"
            assert not [e for e in tools.effects() if e["tool"] == "issue_refund"]
            assert "stopped at a step boundary" in agent.log()
            # The request was started, not finished: its offset is not committed.
            assert committed_offset(kafka.bootstrap, group, agent.request_topic, partition) <= offset
            agent.start().wait_ready(90)
            stream = events.wait_for(session, "resolved", 90)
            deadline = time.monotonic() + 10
            while committed_offset(kafka.bootstrap, group, agent.request_topic, partition) != offset + 1:
                assert time.monotonic() < deadline, "the finished request's offset was not committed"
                time.sleep(0.1)
            assert len([e for e in tools.effects() if e["runId"] == stream[0].run_id]) == 1
        finally:
            agent.stop()
    assert len(llm.requests(rule="refund")) == 1  # the finished step was checkpointed, not redone
    assert_clean_stream(stream)


def test_a_command_the_runtime_died_on_three_times_is_dead_lettered_and_the_next_one_is_served(
    kafka, postgres_dsn, llm, events, tmp_path: Path
):
    """A poison command (here: every delivery killed while the model thinks) must not
    crash-loop the runtime and hold its partition for ever (runs.py, CRASH_LIMIT)."""
    tools = GitHouseTools(tmp_path / "jwks.json")
    llm.set_scenario(refund_script(verify_delay=120))
    agent = billing_agent(tmp_path, kafka, llm, tools.port, dsn=postgres_dsn)
    dlq = TopicReader(kafka.bootstrap, "fleetward.dlq")
    session = f"s-{uuid.uuid4().hex[:12]}"
    with tools:
        agent.start().wait_ready(90)
        try:
            poison = user_message(agent.ref, session, "refund txn_1002")
            partition, _ = produce(kafka.bootstrap, agent.request_topic, poison.to_json(), session)
            for crash in range(1, CRASH_LIMIT + 1):
                deadline = time.monotonic() + 60
                while len(llm.requests(rule="verify")) < crash and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert len(llm.requests(rule="verify")) == crash, agent.log()
                agent.kill()
                agent.start().wait_ready(90)
            # The next delivery fails the run instead of running it: the user is told, the
            # command goes to the dead-letter topic, its offset is committed.
            failed = events.wait_for(session, "failed", 90)[-1]
            assert f"{CRASH_LIMIT} times in a row" in failed.data.reason, failed.data.reason

            def poison_letter(records):
                for _, value, headers in records:
                    body = json.loads(value)
                    if (body.get("history") or {}).get("sessionId") == session:
                        return body, headers
                return None

            letter, headers = dlq.wait(poison_letter, 30, "the poison command's dead letter")
            assert headers["fleetward-dlq-kind"] == "run_failed"
            assert json.loads(letter["value"])["idempotencyKey"] == poison.idempotency_key
            assert letter["history"]["error"]["type"] == "RepeatedCrash"
            # The partition moves on: the session's next request (same key, same partition) is served.
            llm.set_scenario(refund_script())
            follow_up = user_message(agent.ref, session, "refund txn_1002, please")
            assert produce(kafka.bootstrap, agent.request_topic, follow_up.to_json(), session)[0] == partition
            stream = events.wait_for(session, "resolved", 90)
            assert "delivered again after the runtime died serving it (1 of 2 allowed)" in agent.log()
        finally:
            agent.stop()
            dlq.close()
    assert len(llm.requests(rule="verify")) == CRASH_LIMIT + 1  # three killed deliveries, then the follow-up
    runs = {e.run_id for e in stream}
    assert len(runs) == 2 and [e.type for e in stream].count("resolved") == 1


def test_a_replica_joining_mid_run_takes_over_at_a_step_boundary_and_every_run_completes_once(
    kafka, postgres_dsn, llm, events, tmp_path: Path
):
    """Scale-up during work: the second replica's arrival moves partitions; the first one
    stops the moved partitions' runs at their next step boundary without committing, the
    second continues them from the shared checkpoints. One session per partition, so
    whichever partitions move, a run in flight moves with them."""
    tools = GitHouseTools(tmp_path / "jwks.json")
    # The runs' first model call is held until the first replica is giving up a partition.
    # Delays guessed wrong both ways: with 8 s the runs finished before a slow start-up of the
    # second replica; with 20 s the call outlasted the revocation's 15 s wait for a step boundary.
    llm.set_scenario(refund_script(verify_gate="rebalanced"))
    first = billing_agent(tmp_path, kafka, llm, tools.port, dsn=postgres_dsn)
    (tmp_path / "second").mkdir()
    second = dataclasses.replace(
        first,
        dir=tmp_path / "second",
        port=free_port(),
        env={**first.env, "POD_NAME": f"{first.name}-1"},
        proc=None,
        starts=0,
    )
    sessions = {p: f"s-{uuid.uuid4().hex[:12]}" for p in range(3)}
    with tools:
        first.start().wait_ready(90)
        try:
            for partition, session in sessions.items():
                command = user_message(first.ref, session, "refund txn_1002").to_json()
                produce(kafka.bootstrap, first.request_topic, command, session, partition=partition)
            deadline = time.monotonic() + 60
            while len(llm.requests(rule="verify")) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(llm.requests(rule="verify")) == 3, first.log()  # every run is in its first model call
            second.start().wait_ready(90)
            wait_for_log(first, r"revoking partitions \[\d")
            llm.open_gate("rebalanced")
            streams = {p: events.wait_for(s, "resolved", 120) for p, s in sessions.items()}
            refund_calls = tools.metric("githouse_tool_calls_total", tool="issue_refund")
        finally:
            second.stop()
            first.stop()
    # Cooperative rebalancing: assignments come in increments (the first may be empty).
    # Searched in the whole logs: the lines asserted on can be older than an assertion message's tail.
    first_log, second_log = first.log(tail=None), second.log(tail=None)
    assigned = re.findall(r"assigned partitions \[([\d, ]*)\]", second_log)
    moved_partitions = {int(p) for found in assigned for p in found.split(",") if p.strip()}
    assert moved_partitions, f"the second replica was given no partition:\n{second.log()}"
    assert "revoked partitions" in first_log
    for partition, stream in streams.items():
        assert_clean_stream(stream)
        (run_id,) = {e.run_id for e in stream}
        refunds = [e.data for e in stream if e.type == "tool_result" and e.data.tool == "issue_refund"]
        assert len(refunds) == 1, (partition, refunds)
        finished_by = second_log if partition in moved_partitions else first_log
        resolved = re.compile(r'"message": "event resolved #\d+".*"runId": "' + run_id)
        assert resolved.search(finished_by), (partition, run_id, moved_partitions)
    # The moved runs stopped after their model step and were not asked again.
    assert "stopped at a step boundary" in first_log, first.log()
    assert len(llm.requests(rule="verify")) == 3 and len(llm.requests(rule="refund")) == 3
    assert refund_calls == 3  # one call per run: nothing was replayed at the tool service


def gated_billing_agent(tmp_path: Path, kafka, llm, gate: str):
    """A billing agent whose first model call the stand-in holds at `gate`, its tool service,
    a reader of the control acks, and `my_acks(records)`: the acks of this agent's instance."""
    tools = GitHouseTools(tmp_path / "jwks.json")
    llm.set_scenario(refund_script(verify_gate=gate))
    agent = billing_agent(tmp_path, kafka, llm, tools.port)
    acks = TopicReader(kafka.bootstrap, "fleetward.control-acks")
    instance = agent.env["POD_NAME"]

    def my_acks(records):
        return [a for a in (parse_ack(v) for _, v, _ in records) if a.instance == instance]

    return tools, agent, acks, my_acks


def test_a_run_still_busy_is_forced_in_time_to_ack_by_the_halts_deadline(kafka, llm, events, tmp_path: Path):
    """SPEC §7: the drain is over within drainTimeoutSeconds of the engage. The halt carries
    that deadline; a run still in its model call is forced early enough for the `drained`
    ack to arrive by then, although the order's own timeout (30 s) is far longer."""
    from datetime import UTC, datetime

    tools, agent, acks, my_acks = gated_billing_agent(tmp_path, kafka, llm, "never-opened")

    def drained(records):
        return [a for a in my_acks(records) if a.type == "drained"]

    with tools:
        agent.start().wait_ready(90)
        try:
            first = ask_refund(kafka, agent)
            wait_for_verify_call(llm, agent)  # held by the stand-in: the step cannot finish
            deadline = time.time() + 4
            order = control(
                "halt",
                [agent.ref],
                1,
                mode="drain",
                drain_timeout_seconds=30,
                drain_deadline=datetime.fromtimestamp(deadline, UTC),
                reason="test",
            )
            produce(kafka.bootstrap, "fleetward.control", order.to_json(), None)
            (ack,) = acks.wait(drained, 30, "the drained ack")
        finally:
            llm.open_gate("never-opened")
            agent.stop()
            acks.close()
    assert [(r.session_id, r.outcome) for r in ack.runs] == [(first, "forced")]
    assert ack.counts["runsForced"] == 1
    assert ack.timestamp.timestamp() <= deadline, (ack.timestamp, deadline)  # not 30 s after receipt
    assert events.wait_for(first, "halted", 10)[-1].data.kill_switch == "test-switch"


def test_halt_drains_at_a_step_boundary_and_resume_continues_the_run_and_the_queue(kafka, llm, events, tmp_path: Path):
    tools, agent, acks, my_acks = gated_billing_agent(tmp_path, kafka, llm, "halted")

    with tools:
        agent.start().wait_ready(90)
        try:
            first = ask_refund(kafka, agent)
            wait_for_verify_call(llm, agent)
            # Halt while the first model call is in flight; it answers once the halt is taken.
            produce(
                kafka.bootstrap,
                "fleetward.control",
                control("halt", [agent.ref], 1, mode="drain", drain_timeout_seconds=20, reason="test").to_json(),
                None,
            )
            wait_for_log(agent, "control: halt from")
            llm.open_gate("halted")
            drained = acks.wait(lambda recs: [a for a in my_acks(recs) if a.type == "drained"], 30, "the drained ack")[
                0
            ]
            assert [a.type for a in my_acks(acks.snapshot())][:1] == ["halted"]
            assert [(r.session_id, r.outcome) for r in drained.runs] == [(first, "drained")]
            assert drained.counts["runsDrained"] == 1 and drained.agents == [agent.ref]
            halted = events.wait_for(first, "halted", 10)[-1]
            assert halted.data.kill_switch == "test-switch"
            # The model step finished; nothing after it started.
            assert llm.requests(rule="verify")[0]["outcome"] == "answered"
            assert not [e for e in events.session(first) if e.type == "tool_call"]
            # New work is not taken while halted.
            second = f"s-{uuid.uuid4().hex[:12]}"
            produce(
                kafka.bootstrap,
                agent.request_topic,
                user_message(agent.ref, second, "refund txn_1002").to_json(),
                second,
            )
            assert agent.metric("fleetward_runtime_halted") == 1
            resume_sent = time.time()
            produce(kafka.bootstrap, "fleetward.control", control("resume", [agent.ref], 1).to_json(), None)
            acks.wait(lambda recs: [a for a in my_acks(recs) if a.type == "resumed"], 30, "the resumed ack")
            stream = events.wait_for(first, "resolved", 60)
            later = events.wait_for(second, "resolved", 60)
        finally:
            agent.stop()
            acks.close()
    types = [e.type for e in stream]
    assert types.index("halted") < types.index("resumed") < types.index("tool_call")
    assert later[0].timestamp.timestamp() >= resume_sent - 0.5
    assert len(llm.requests(rule="verify")) == 2  # one per run: the halted run's call was not redone
    assert_clean_stream(stream)
    assert json.loads(drained.to_json())["component"] == "runtime"


def test_a_run_halted_in_a_pod_that_is_scaled_away_resumes_in_the_next_one(kafka, llm, events, tmp_path: Path):
    """The default kill switch (scaleToZero): the runtime that halted the run is stopped
    while halted, so the release's resume order reaches no runtime that knows the run. The
    next pod continues it from its checkpoint, and the session hears `resumed` (once) before
    the run's next events, as it does when the halted pod itself resumes."""
    tools = GitHouseTools(tmp_path / "jwks.json")
    llm.set_scenario(refund_script(verify_gate="halted"))
    agent = billing_agent(tmp_path, kafka, llm, tools.port)
    switch = f"scaled-{uuid.uuid4().hex[:6]}"

    with tools:
        agent.start().wait_ready(90)
        try:
            session = ask_refund(kafka, agent)
            wait_for_verify_call(llm, agent)
            halt = switch_order(agent, switch, "halt", 1, mode="drain", drain_timeout_seconds=20, reason="test")
            produce(kafka.bootstrap, "fleetward.control", halt, switch)
            wait_for_log(agent, "control: halt from")
            llm.open_gate("halted")
            events.wait_for(session, "halted", 30)
            agent.stop()  # scaled to zero while halted
            resume = switch_order(agent, switch, "resume", 2)
            produce(kafka.bootstrap, "fleetward.control", resume, switch)  # reaches no runtime
            agent.env["POD_NAME"] = f"{agent.env['POD_NAME']}-next"  # a new pod, not a restarted container
            agent.start().wait_ready(90)
            stream = events.wait_for(session, "resolved", 60)
            log = agent.log()
        finally:
            agent.stop()
    types = [e.type for e in stream]
    assert types.count("halted") == 1 and types.count("resumed") == 1, types
    assert types.index("halted") < types.index("resumed") < types.index("tool_call"), types
    resumed = stream[types.index("resumed")]
    assert resumed.data.kill_switch == switch and resumed.run_id == stream[0].run_id
    assert "starting halted" not in log
    assert len(llm.requests(rule="verify")) == 1  # the step finished before the halt is not redone
    assert_clean_stream(stream)


def test_a_runtime_restarted_under_a_halt_stays_halted_until_the_resume(kafka, llm, events, tmp_path: Path):
    """A crashed container of a halted agent (pods kept: scaleToZero false) comes back with
    the halt behind its committed control offset: it must not take work again. And a switch
    created again under the same name (generations restart at 1) is obeyed."""
    tools = GitHouseTools(tmp_path / "jwks.json")
    llm.set_scenario(refund_script())
    agent = billing_agent(tmp_path, kafka, llm, tools.port)
    switch = f"again-{uuid.uuid4().hex[:6]}"

    def order(type_: str, generation: int, **kw) -> str:
        return switch_order(agent, switch, type_, generation, **kw)

    halt = {"mode": "drain", "drain_timeout_seconds": 5, "reason": "test"}
    with tools:
        agent.start().wait_ready(90)
        try:
            # An earlier incarnation of the switch: engaged and released at generation 4.
            produce(kafka.bootstrap, "fleetward.control", order("halt", 1, **halt), switch)
            produce(kafka.bootstrap, "fleetward.control", order("resume", 4), switch)
            # The switch deleted and created again: generation 1 again, and it is obeyed.
            produce(kafka.bootstrap, "fleetward.control", order("halt", 1, **halt), switch)
            deadline = time.monotonic() + 30
            while agent.metric("fleetward_runtime_halted") != 1:
                assert time.monotonic() < deadline, "the re-created switch's halt was ignored"
                time.sleep(0.1)

            agent.kill()  # the container crashes; the halt is behind its committed offset now
            agent.start().wait_ready(90)
            assert agent.metric("fleetward_runtime_halted") == 1, agent.log()
            assert "starting halted" in agent.log()
            session = ask_refund(kafka, agent)
            # A negative check needs a window: a runtime that took the work calls the model
            # within a fraction of a second (the other tests here), so 3 s is ample.
            time.sleep(3)
            assert not llm.requests(rule="verify"), "a halted runtime took work after its restart"

            produce(kafka.bootstrap, "fleetward.control", order("resume", 2), switch)
            events.wait_for(session, "resolved", 60)
        finally:
            agent.stop()
