"""Tool calls: idempotency keys and the fail-closed HTTP tool (tools.py)."""

from __future__ import annotations

import asyncio

from fleetward.runtime.tools import (
    MAX_RESULT_CHARS,
    HttpTool,
    ToolHttpClient,
    ToolOutcome,
    idempotency_key,
    result_text,
)

from fleetward.api.agent import Tool

SPEC = Tool.model_validate(
    {
        "name": "issue_refund",
        "description": "Refund.",
        "inputSchema": {"type": "object", "properties": {"transaction_id": {"type": "string"}}},
        "endpoint": "http://127.0.0.1:9/tools/issue_refund",
        "mutating": True,
    }
)


def test_the_idempotency_key_is_derived_from_run_and_tool_call_only():
    key = idempotency_key("run-1", "call_a")
    assert key == idempotency_key("run-1", "call_a")  # a replay after a crash reuses it
    assert key != idempotency_key("run-1", "call_b") and key != idempotency_key("run-2", "call_a")
    assert key.startswith("fw1-") and len(key) == 44 and key.isascii()
    # No separator ambiguity: ("ab", "c") and ("a", "bc") differ.
    assert idempotency_key("ab", "c") != idempotency_key("a", "bc")


def test_a_tool_called_without_minted_credentials_refuses_to_run():
    async def call() -> str:
        client = ToolHttpClient()
        try:
            tool = HttpTool(SPEC, client)
            return await tool.ainvoke({"transaction_id": "txn_1"})
        finally:
            await client.close()

    out = asyncio.run(call())
    assert "no credentials were issued" in out


def test_tool_results_for_the_model_are_bounded():
    ok = ToolOutcome(True, 200, {"a": "x" * (MAX_RESULT_CHARS * 2)}, None, 3)
    text = result_text(ok)
    assert len(text) < MAX_RESULT_CHARS + 100 and text.endswith("more characters]")
    failed = ToolOutcome(
        False, 409, {"error": "already_refunded", "message": "no"}, "HTTP 409: already_refunded: no", 3
    )
    assert result_text(failed) == "Tool call failed: HTTP 409: already_refunded: no"
