"""Human review as durable interrupts (SPEC §4; issue "Agent runtime II" §2), with a local
`fleetward runtime run` against the real Kafka and PostgreSQL, the GitHouse tool service and
the LLM stand-in: draft approval (approve, edit, reject), a tool with `requiresApproval`, an
SOP step with `approval: human`, the interrupt surviving SIGKILL, review timeouts (reject and
escalate, enforced across a restart), and `fleetward_human_review_queue_depth`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetward.api.envelopes import AgentCommand, SessionEvent, parse_event
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
    running,
    user_message,
)

VERIFY = {"name": "verify_transaction", "arguments": {"account": "jdoe", "transaction_id": "txn_1002"}}
REFUND = {"name": "issue_refund", "arguments": {"transaction_id": "txn_1002", "amount_cents": 2100}}
DRAFT = "Your refund of $21.00 for txn_1002 is on its way."


def refund_script() -> list[dict[str, Any]]:
    return [
        {"name": "reply", "match": {"toolResultFor": "issue_refund"}, "respond": {"content": DRAFT}},
        {"name": "refund", "match": {"toolResultFor": "verify_transaction"}, "respond": {"toolCalls": [REFUND]}},
        {"name": "verify", "match": {"lastRole": "user"}, "respond": {"toolCalls": [VERIFY]}},
    ]


def resume(agent: LocalAgent, session: str, run_id: str, decision: str, edit: str | None = None, reviewer="rita"):
    data: dict[str, Any] = {"runId": run_id, "decision": decision, "reviewer": reviewer}
    if edit is not None:
        data["edit"] = edit
    return AgentCommand.new(
        "resume",
        session_id=session,
        agent=agent.ref,
        idempotency_key=f"resume-{uuid.uuid4().hex}",
        user={"sub": reviewer, "role": "reviewer"},
        data=data,
    )


def send(kafka, agent: LocalAgent, command: AgentCommand) -> None:
    produce(kafka.bootstrap, agent.request_topic, command.to_json(), command.session_id)


def ask(kafka, agent: LocalAgent, text: str = "refund txn_1002") -> str:
    session = f"s-{uuid.uuid4().hex[:12]}"
    send(kafka, agent, user_message(agent.ref, session, text))
    return session


def types(events: list[SessionEvent]) -> list[str]:
    return [e.type for e in events]


@pytest.fixture
def tools(tmp_path: Path) -> Iterator[GitHouseTools]:
    with GitHouseTools(tmp_path / "jwks.json") as service:
        yield service


def reviewer_agent(tmp_path, kafka, llm, tools, *, human_review, dsn=None, tool_approval=False, sop=REFUND_SOP):
    specs = billing_tools(tools.port)
    if tool_approval:
        for t in specs:
            if t["name"] == "issue_refund":
                t["requiresApproval"] = True
    return render_local_agent(
        tmp_path,
        bootstrap=kafka.bootstrap,
        spec=agent_spec(llm.url, specs, humanReview=human_review),
        sops={"refunds": sop},
        dsn=dsn,
    )


def refunds_of(tools: GitHouseTools, run_id: str) -> list[dict[str, Any]]:
    return [e for e in tools.effects() if e["tool"] == "issue_refund" and e["runId"] == run_id]


def test_draft_approval_approve_edit_and_reject(kafka, postgres_dsn, llm, events, tools, tmp_path: Path):
    llm.set_scenario(refund_script())
    agent = reviewer_agent(tmp_path, kafka, llm, tools, human_review={"draftApproval": "always"}, dsn=postgres_dsn)
    with running(agent):
        approve_s, edit_s, reject_s = ask(kafka, agent), ask(kafka, agent), ask(kafka, agent)
        waiting = {s: events.wait_for(s, "approval_required", 90) for s in (approve_s, edit_s, reject_s)}
        for stream in waiting.values():
            required = stream[-1].data
            assert required.kind == "draft" and required.draft == DRAFT, required
            assert "always" in required.reason and required.timeout_seconds >= 3000
            assert "message" not in types(stream), "nothing is sent before the review"
        for s in waiting:
            assert _wait_state(events, s, "WaitingForHuman", 10).data.step == "review"
        assert agent.metric("fleetward_human_review_queue_depth", agent=agent.ref) == 3 or _eventually(
            lambda: agent.metric("fleetward_human_review_queue_depth", agent=agent.ref) == 3
        )
        run = {s: waiting[s][-1].run_id for s in waiting}
        send(kafka, agent, resume(agent, approve_s, run[approve_s], "approve"))
        send(kafka, agent, resume(agent, edit_s, run[edit_s], "edit", edit="Refund issued: $21.00 (txn_1002)."))
        send(kafka, agent, resume(agent, reject_s, run[reject_s], "reject", reviewer="rob"))

        approved = events.wait_for(approve_s, "resolved", 60)
        decision = [e for e in approved if e.type == "approval_decision"]
        assert [(d.data.decision, d.data.reviewer) for d in decision] == [("approve", "rita")]
        assert [e.data.text for e in approved if e.type == "message"] == [DRAFT]
        assert "approved by rita" in approved[-1].data.summary

        edited = events.wait_for(edit_s, "resolved", 60)
        assert [e.data.text for e in edited if e.type == "message"] == ["Refund issued: $21.00 (txn_1002)."]
        assert [e.data.edit for e in edited if e.type == "approval_decision"] == ["Refund issued: $21.00 (txn_1002)."]

        rejected = events.wait_for(reject_s, "failed", 60)
        assert "message" not in types(rejected) and "resolved" not in types(rejected)
        assert "rejected by rob" in rejected[-1].data.reason
        assert _eventually(lambda: agent.metric("fleetward_human_review_queue_depth", agent=agent.ref) == 0)
    # txn_1002 can be refunded once: one run did, and the review repeated no step of any run.
    assert sum(len(refunds_of(tools, run[s])) for s in run) == 1
    assert len(llm.requests(rule="reply")) == 3


def test_a_reviewer_identity_in_a_user_command_is_refused_and_the_run_keeps_waiting(
    kafka, llm, events, tools, tmp_path: Path
):
    """A `resume` must come from a reviewer or operator (the command's verified user): a user
    cannot approve their own draft; the command is dead-lettered, the run still waits."""
    llm.set_scenario(refund_script())
    agent = reviewer_agent(tmp_path, kafka, llm, tools, human_review={"draftApproval": "always"})
    dlq = TopicReader(kafka.bootstrap, "fleetward.dlq")
    with running(agent):
        session = ask(kafka, agent)
        run_id = events.wait_for(session, "approval_required", 90)[-1].run_id
        forged = resume(agent, session, run_id, "approve").to_wire()
        forged["user"] = {"sub": "jdoe@example.test", "role": "user"}
        produce(kafka.bootstrap, agent.request_topic, json.dumps(forged), session)
        dlq.wait(lambda rs: any(session.encode() in v for _, v, _ in rs), 60, "the forged resume dead-lettered")
        # A reviewer's command naming someone else as the reviewer: dead-lettered too.
        other = resume(agent, session, run_id, "approve").to_wire()
        other["data"]["reviewer"] = "mallory@example.test"
        produce(kafka.bootstrap, agent.request_topic, json.dumps(other), session)
        dlq.wait(
            lambda rs: any(b"mallory@example.test" in v for _, v, _ in rs), 60, "the misnamed resume dead-lettered"
        )
        time.sleep(1)
        assert "approval_decision" not in types(events.session(session))
        # A reviewer's decision still works afterwards.
        send(kafka, agent, resume(agent, session, run_id, "approve"))
        events.wait_for(session, "resolved", 60)
    dlq.close()


def test_tool_with_requires_approval_waits_for_the_reviewer(kafka, llm, events, tools, tmp_path: Path):
    llm.set_scenario(
        [
            {"name": "after-reject", "match": {"lastTool": "rejected"}, "respond": {"content": "I could not refund."}},
            *refund_script(),
        ]
    )
    agent = reviewer_agent(tmp_path, kafka, llm, tools, human_review={"draftApproval": "never"}, tool_approval=True)
    with running(agent):
        rejected_s, edited_s = ask(kafka, agent), ask(kafka, agent)
        run = {}
        for s in (rejected_s, edited_s):
            required = events.wait_for(s, "approval_required", 90)[-1]
            assert required.data.kind == "tool" and required.data.tool == "issue_refund"
            assert required.data.arguments == REFUND["arguments"]
            assert "requiresApproval" in required.data.reason
            run[s] = required.run_id
        assert not [e for e in tools.effects() if e["tool"] == "issue_refund"], "nothing executed before approval"
        send(kafka, agent, resume(agent, rejected_s, run[rejected_s], "reject"))
        rejected = events.wait_for(rejected_s, "resolved", 60)
        edit = json.dumps({"transaction_id": "txn_1002", "amount_cents": 1000})
        send(kafka, agent, resume(agent, edited_s, run[edited_s], "edit", edit=edit))
        events.wait_for(edited_s, "resolved", 60)
        # An edit that is not a JSON object of arguments is refused; the review stays open.
        third = ask(kafka, agent)
        third_run = events.wait_for(third, "approval_required", 90)[-1].run_id
        send(kafka, agent, resume(agent, third, third_run, "edit", edit="refund it all"))
        assert _eventually(lambda: "dead-lettered (fields: data.edit)" in agent.log(), 30)
        assert "approval_decision" not in types(events.session(third))
    assert refunds_of(tools, run[rejected_s]) == []
    assert [e.data.text for e in rejected if e.type == "message"] == ["I could not refund."]
    result = [e.data for e in rejected if e.type == "tool_result" and e.data.tool == "issue_refund"]
    assert len(result) == 1 and not result[0].ok and "rejected by rita" in result[0].error
    assert [e["arguments"]["amount_cents"] for e in refunds_of(tools, run[edited_s])] == [1000]


def test_sop_step_with_human_approval_is_reviewed_as_a_step(kafka, llm, events, tools, tmp_path: Path):
    sop = json.loads(json.dumps(REFUND_SOP))
    sop["steps"][1]["approval"] = "human"
    llm.set_scenario(refund_script())
    agent = reviewer_agent(tmp_path, kafka, llm, tools, human_review={"draftApproval": "never"}, sop=sop)
    with running(agent):
        session = ask(kafka, agent)
        required = events.wait_for(session, "approval_required", 90)[-1]
        assert (required.data.kind, required.data.step, required.data.tool) == ("step", "issue-refund", "issue_refund")
        assert "issue-refund" in required.data.reason
        send(kafka, agent, resume(agent, session, required.run_id, "approve"))
        events.wait_for(session, "resolved", 60)
    assert len(refunds_of(tools, required.run_id)) == 1


def test_the_interrupt_survives_sigkill_and_the_edited_draft_is_sent(
    kafka, postgres_dsn, llm, events, tools, tmp_path: Path
):
    llm.set_scenario(refund_script())
    agent = reviewer_agent(tmp_path, kafka, llm, tools, human_review={"draftApproval": "always"}, dsn=postgres_dsn)
    agent.start().wait_ready(90)
    try:
        session = ask(kafka, agent)
        run_id = events.wait_for(session, "approval_required", 90)[-1].run_id
        agent.kill()  # nothing in the process holds the run
        agent.start().wait_ready(90)
        send(kafka, agent, resume(agent, session, run_id, "edit", edit="Done: refund of $21.00 sent."))
        stream = events.wait_for(session, "resolved", 60)
    finally:
        agent.stop()
    assert [e.data.text for e in stream if e.type == "message"] == ["Done: refund of $21.00 sent."]
    assert {e.run_id for e in stream} == {run_id}
    assert len(llm.requests(rule="reply")) == 1, "the draft came from the checkpoint, not a new model call"
    assert len(refunds_of(tools, run_id)) == 1


@pytest.mark.parametrize("on_timeout", ["escalate", "reject"])
def test_review_timeout_is_enforced_across_a_restart(kafka, llm, events, tools, tmp_path: Path, on_timeout: str):
    llm.set_scenario(refund_script())
    agent = reviewer_agent(
        tmp_path,
        kafka,
        llm,
        tools,
        human_review={"draftApproval": "always", "reviewTimeoutSeconds": 4, "onTimeout": on_timeout},
    )
    alerts = TopicReader(kafka.bootstrap, "fleetward.alerts")
    agent.start().wait_ready(90)
    try:
        session = ask(kafka, agent)
        required = events.wait_for(session, "approval_required", 90)[-1]
        assert required.data.timeout_seconds <= 4
        agent.kill()  # down over the deadline: the next process enforces it
        time.sleep(5)
        agent.start().wait_ready(90)
        timed_out = _wait_state(events, session, "TimedOut", 60)
        # A reviewer's decision after the timeout changes nothing.
        send(kafka, agent, resume(agent, session, required.run_id, "approve"))
        time.sleep(2)
        stream = events.session(session)
    finally:
        agent.stop()
        alerts.close()
    assert timed_out.data.state == "TimedOut" and on_timeout in timed_out.data.detail
    assert "message" not in types(stream) and "resolved" not in types(stream), types(stream)
    assert "approval_decision" not in types(stream)
    if on_timeout == "escalate":
        escalated = [e for e in stream if e.type == "escalated"]
        assert len(escalated) == 1 and "No reviewer decided" in escalated[0].data.reason
        copies = [parse_event(v) for _, v, h in alerts.snapshot() if h.get("fleetward-alert-type") == "escalated"]
        assert [c.id for c in copies if c.session_id == session] == [escalated[0].id]
    else:
        assert "escalated" not in types(stream)


def test_an_early_timeout_command_is_refused(kafka, llm, events, tools, tmp_path: Path):
    """The timeout identity is honoured only after the deadline: someone producing it early
    (or a replica with a fast clock) cannot reject a review that is still open."""
    from fleetward.runtime.review import TIMEOUT_REVIEWER

    llm.set_scenario(refund_script())
    agent = reviewer_agent(tmp_path, kafka, llm, tools, human_review={"draftApproval": "always"})
    with running(agent):
        session = ask(kafka, agent)
        run_id = events.wait_for(session, "approval_required", 90)[-1].run_id
        early = resume(agent, session, run_id, "reject", reviewer=TIMEOUT_REVIEWER).to_wire()
        early["user"] = {"sub": TIMEOUT_REVIEWER, "role": "operator"}
        produce(kafka.bootstrap, agent.request_topic, json.dumps(early), session)
        time.sleep(3)
        assert not [e for e in events.session(session) if e.type == "status" and e.data.state == "TimedOut"]
        assert "dead-lettered (fields: data.reviewer)" in agent.log()
        send(kafka, agent, resume(agent, session, run_id, "approve"))
        events.wait_for(session, "resolved", 60)


# --- helpers -----------------------------------------------------------------------------------


def _eventually(check, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def _wait_state(events: EventReader, session: str, state: str, timeout: float) -> SessionEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events.session(session):
            if e.type == "status" and e.data.state == state:
                return e
        time.sleep(0.1)
    raise AssertionError(f"no status {state} in session {session}: {types(events.session(session))}")
