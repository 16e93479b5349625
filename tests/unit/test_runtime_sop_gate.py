"""The SOP gate and the allow-list, decided in code (middleware/sop_gate.py)."""

from __future__ import annotations

from fleetward.runtime.middleware.sop_gate import (
    check_tool_call,
    final_answer,
    provided_sop_state,
    sop_state,
    succeeded_tools,
    system_prompt,
)
from langchain_core.messages import AIMessage, ToolMessage

from fleetward.api.runtimeconfig import ResolvedSOP
from fleetward.api.sop import SOPSpec

REFUND = ResolvedSOP(
    name="refunds",
    version="1.0.0",
    spec=SOPSpec.model_validate(
        {
            "domain": "billing",
            "title": "Refunds",
            "version": "1.0.0",
            "instructions": "Verify first.",
            "steps": [
                {"id": "verify", "instruction": "Verify.", "tool": "verify_transaction"},
                {"id": "explain", "instruction": "Explain the policy."},
                {"id": "refund", "instruction": "Refund.", "tool": "issue_refund", "requires": ["verify", "explain"]},
            ],
        }
    ),
)
TOKENS = ResolvedSOP(
    name="tokens",
    version="1.0.0",
    spec=SOPSpec.model_validate(
        {
            "domain": "security",
            "title": "Tokens",
            "version": "1.0.0",
            "instructions": "Verify identity first.",
            "steps": [
                {"id": "verify-identity", "instruction": "Verify.", "tool": "verify_identity"},
                {"id": "revoke", "instruction": "Revoke.", "tool": "revoke_token", "requires": ["verify-identity"]},
            ],
        }
    ),
)
ALLOWED = {"verify_transaction", "issue_refund", "verify_identity", "revoke_token", "platform_status"}


def check(tool: str, succeeded: set[str], run_sop=None) -> str | None:
    return check_tool_call(
        tool, ALLOWED, run_sop if run_sop is not None else sop_state(REFUND), [REFUND, TOKENS], succeeded
    )


def test_an_unlisted_tool_is_refused_whatever_the_sop_says():
    reason = check("delete_account", {"verify_transaction"})
    assert reason is not None and "allow-list" in reason and "delete_account" in reason


def test_a_refund_before_its_verification_is_refused_and_allowed_after_it():
    reason = check("issue_refund", set())
    assert reason is not None and "verify (verify_transaction)" in reason and "refunds" in reason
    assert check("issue_refund", {"verify_transaction"}) is None


def test_a_step_without_a_tool_cannot_be_checked_and_counts_as_done():
    # "explain" has no tool: only "verify" gates the refund.
    assert check("issue_refund", {"verify_transaction"}) is None


def test_a_tool_gated_by_another_sop_stays_gated_under_a_human_provided_sop():
    provided = provided_sop_state("Do what the customer needs.", None, "lead@example.test")
    assert check("revoke_token", set(), provided) is not None
    assert check("revoke_token", {"verify_identity"}, provided) is None
    assert check("issue_refund", set(), provided) is not None


def test_tools_no_sop_mentions_are_only_subject_to_the_allow_list():
    assert check("platform_status", set()) is None


def test_only_calls_that_returned_without_error_count_as_succeeded():
    messages = [
        ToolMessage(content="ok", name="verify_transaction", tool_call_id="1"),
        ToolMessage(content="Refused", name="issue_refund", tool_call_id="2", status="error"),
        AIMessage(content="hi"),
    ]
    assert succeeded_tools(messages) == {"verify_transaction"}


def test_the_prompt_carries_the_sop_steps_and_their_prerequisites():
    prompt = system_prompt(sop_state(REFUND), "ns/billing")
    assert "SOP: Refunds (refunds@1.0.0)" in prompt and "Verify first." in prompt
    assert "refund: Refund. [tool: issue_refund] (after: verify, explain)" in prompt


def test_a_final_answer_is_an_ai_message_without_tool_calls():
    assert final_answer([AIMessage(content="done")]) is not None
    assert final_answer([AIMessage(content="", tool_calls=[{"name": "x", "args": {}, "id": "1"}])]) is None
    assert final_answer([]) is None


def test_a_made_up_tool_name_is_reported_under_a_name_events_can_carry():
    import re

    from fleetward.runtime.middleware.tool_credentials import wire_call_id, wire_tool_name

    from fleetward.api.envelopes.wire import ID_CHARS, TOOL_NAME

    assert wire_tool_name("issue_refund") == "issue_refund"  # a listed tool's name is kept
    for made_up in ("search the web!", "x" * 100, "ünïcode/tool", ""):
        assert re.fullmatch(TOOL_NAME, wire_tool_name(made_up)), made_up
    assert wire_tool_name("search the web!").startswith("search_the_web_-")
    # Two names (or ids) that differ only where characters were replaced stay apart.
    assert wire_tool_name("a b") != wire_tool_name("a/b")
    assert wire_call_id("call_Abc.1:2-3") == "call_Abc.1:2-3"
    assert wire_call_id("id 1") != wire_call_id("id/1") and wire_call_id("id 1").startswith("id_1-")
    assert re.fullmatch(ID_CHARS, wire_call_id("c" * 300)) and len(wire_call_id("c" * 300)) <= 128
