"""The runtime's audit recorder with a real SQLite audit log and the real guardrail engine:
a tool call is recorded (arguments redacted) before it is sent, and not sent when it
cannot be recorded."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from types import SimpleNamespace

from fleetward.runtime.audit import RuntimeAudit
from fleetward.runtime.guardrails.engine import GuardrailEngine
from fleetward.runtime.review import TIMEOUT_REVIEWER
from fleetward.runtime.tools import CURRENT_INVOCATION, HttpTool, Invocation, ToolHttpClient

from fleetward.api.agent import Tool
from fleetward.api.guardrail import GuardrailSpec
from fleetward.audit import AuditLog

SPEC = Tool.model_validate(
    {
        "name": "issue_refund",
        "description": "Refund.",
        "inputSchema": {"type": "object", "properties": {"transaction_id": {"type": "string"}}},
        "endpoint": "http://127.0.0.1:9/tools/issue_refund",  # nothing listens: a sent call fails to connect
        "mutating": True,
    }
)
PII = GuardrailSpec.model_validate({"pii": {"entities": [{"type": "email", "strategy": "redact"}]}})
EMAIL = "jane.doe@example.com"


def call_tool(audit: RuntimeAudit, arguments: dict) -> str:
    async def run() -> str:
        client = ToolHttpClient()
        invocation = Invocation("issue_refund", "call_1", "run-1", "token", "fw1-key", None, audit)
        reset = CURRENT_INVOCATION.set(invocation)
        try:
            return await HttpTool(SPEC, client).ainvoke(arguments)
        finally:
            CURRENT_INVOCATION.reset(reset)
            await client.close()

    return asyncio.run(run())


def test_a_tool_call_is_recorded_with_redacted_arguments_before_it_is_sent(tmp_path: Path):
    with AuditLog.open(f"sqlite://{tmp_path}/state.db") as log:
        audit = RuntimeAudit(log, "githouse/billing", "kid-1", GuardrailEngine([PII]))
        out = call_tool(audit, {"transaction_id": f"txn_1 for {EMAIL}"})
        assert "could not reach the tool service" in out  # it was sent, after being recorded
        [record] = list(log.records())
        assert (record["action"], record["actor"], record["target"]) == (
            "tool.call",
            "agent:githouse/billing",
            "issue_refund",
        )
        details = record["details"]
        assert EMAIL not in details["arguments"]["transaction_id"]
        assert details["arguments"]["transaction_id"].startswith("txn_1 for ")
        assert details == {
            "runId": "run-1",
            "callId": "call_1",
            "mutating": True,
            "keyId": "kid-1",
            "idempotencyKey": "fw1-key",
            "arguments": details["arguments"],
        }
        assert log.verify().ok


def test_a_tool_call_that_cannot_be_recorded_is_not_sent(tmp_path: Path):
    db = tmp_path / "state.db"
    with AuditLog.open(f"sqlite://{db}") as log:
        conn = sqlite3.connect(db, isolation_level=None)  # break the store: the chain head is gone
        conn.execute("DROP TRIGGER fw_audit_head_no_delete")
        conn.execute("DELETE FROM fw_audit_head")
        conn.close()
        out = call_tool(RuntimeAudit(log, "githouse/billing", "kid-1", None), {"transaction_id": "txn_1"})
        assert "could not be recorded in the audit log" in out and "not sent" in out
        assert "could not reach the tool service" not in out
        assert list(log.records()) == []


def test_a_review_decision_is_recorded_as_the_reviewers_act_and_a_timeout_as_the_timers(tmp_path: Path):
    # SPEC §8 "approvals with reviewer identity": the actor is the reviewer the gateway
    # verified (the resume command's `reviewer`), not the agent that records it.
    run = SimpleNamespace(run_id="run-1", session_id="s-1")  # the two ids the record takes from the run
    review = {"reviewId": "rv-1", "review": "tool", "name": "issue_refund"}
    with AuditLog.open(f"sqlite://{tmp_path}/state.db") as log:
        audit = RuntimeAudit(log, "githouse/billing", "kid-1", None)
        asyncio.run(audit.review_decision(run, review, "approve", "carol", timed_out=False))
        asyncio.run(audit.review_decision(run, review, "reject", TIMEOUT_REVIEWER, timed_out=True))
        decided, timed_out = log.records()
        assert (decided["action"], decided["actor"], decided["target"]) == ("review.decision", "carol", "session:s-1")
        assert decided["details"] == {
            "runId": "run-1",
            "reviewId": "rv-1",
            "review": "tool",
            "decision": "approve",
            "reviewer": "carol",
            "timedOut": False,
            "tool": "issue_refund",
        }
        assert timed_out["actor"] == TIMEOUT_REVIEWER and timed_out["details"]["timedOut"] is True
        assert log.verify().ok
