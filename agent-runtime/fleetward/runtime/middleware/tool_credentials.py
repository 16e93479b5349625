"""Per-invocation tool credentials, and the record of each call (SPEC §4, §6).

`ToolEventsMiddleware` (outer): emits `tool_call` (arguments redacted) before the call and
`tool_result` after it, from the final, guarded ToolMessage — refusals included.

`ToolCredentialsMiddleware` (innermost, right around the HTTP call): mints a tool token
(EdDSA, TTL 60 s, kid = the agent key's id, scoped to agent, tool, run and idempotency
key), derives the Idempotency-Key from (run id, tool call id) so a replay after a crash
reuses it, and carries `traceparent`; hands all of it to the tool through
`tools.CURRENT_INVOCATION`; records the tool span and metrics.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fleetward.runtime.context import RunContext
from fleetward.runtime.middleware.guardrails import redact_value
from fleetward.runtime.telemetry import TOOL_DURATION, TOOL_ERRORS, traceparent_of, tracer
from fleetward.runtime.tools import CURRENT_INVOCATION, HttpTool, Invocation, idempotency_key
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import ToolMessage
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command
from opentelemetry import trace

from fleetward.api.envelopes.wire import ID_CHARS, TOOL_NAME
from fleetward.toolkit.tokens import mint_tool_token

EVENT_RESULT_CHARS = 4000


def _wire_form(value: str, pattern: str, bad: str, limit: int) -> str:
    """`value` when it matches `pattern`, else its characters outside the pattern replaced
    and a short hash of the original added, so two different values never become one (an
    event's key is built from the call id: a collision would drop the second call's events)."""
    if len(value) <= limit and re.fullmatch(pattern, value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{re.sub(bad, '_', value)[: limit - 9]}-{digest}"


def wire_tool_name(name: str) -> str:
    """A tool name as events may carry it (TOOL_NAME). A listed tool's name always is one; a
    name the model made up may not be ("search web"), and its call must still be refused and
    reported, not fail the run on an invalid event. The refusal's error text quotes the name
    as the model wrote it."""
    return _wire_form(name, TOOL_NAME, r"[^a-zA-Z0-9_-]", 64)


def wire_call_id(call_id: str) -> str:
    """A call id as events may carry it (ID_CHARS, at most 128): the providers' ids are; one
    a model or a proxy made up may not be."""
    return _wire_form(call_id, ID_CHARS, r"[^A-Za-z0-9._:-]", 128)


def _message_of(result: ToolMessage | Command) -> ToolMessage | None:
    if isinstance(result, ToolMessage):
        return result
    update = result.update if isinstance(result.update, dict) else {}
    return next((m for m in update.get("messages", []) if isinstance(m, ToolMessage)), None)


def _result_payload(content: Any) -> Any:
    text = content if isinstance(content, str) else json.dumps(content)
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if isinstance(value, str) and len(value) > EVENT_RESULT_CHARS:
        value = value[:EVENT_RESULT_CHARS] + "..."
    return value


class ToolEventsMiddleware(AgentMiddleware[Any, RunContext]):
    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command]]
    ) -> ToolMessage | Command:
        ctx: RunContext = request.runtime.context
        call = request.tool_call
        tool, call_id = wire_tool_name(call["name"]), wire_call_id(call["id"])
        await ctx.before_step(f"tool:{tool}")
        engine = ctx.services.guardrails
        await ctx.emit(
            f"tool_call/{call_id}",
            "tool_call",
            {
                "tool": tool,
                "callId": call_id,
                "arguments": redact_value(engine, call.get("args") or {}, "output", ctx.services.agent),
            },
        )
        result = await handler(request)
        message = _message_of(result)
        artifact = message.artifact if message is not None and isinstance(message.artifact, dict) else {}
        ok = message is not None and message.status != "error" and artifact.get("ok", True)
        data: dict[str, Any] = {"tool": tool, "callId": call_id, "ok": bool(ok)}
        if artifact.get("durationMs") is not None:
            data["durationMs"] = artifact["durationMs"]
        if ok:
            data["result"] = _result_payload(message.content)  # type: ignore[union-attr]
        else:
            error = artifact.get("error") or (str(message.content)[:500] if message is not None else "no result")
            data["error"] = redact_value(engine, error, "toolResults", ctx.services.agent)
        await ctx.emit(f"tool_result/{call_id}", "tool_result", data)
        return result


class ToolCredentialsMiddleware(AgentMiddleware[Any, RunContext]):
    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command]]
    ) -> ToolMessage | Command:
        ctx: RunContext = request.runtime.context
        call = request.tool_call
        tool = request.tool
        services = ctx.services
        if not isinstance(tool, HttpTool):  # unlisted tools never get here (SOP gate), but fail closed
            return await handler(request)
        key = idempotency_key(ctx.run_id, call["id"])
        with tracer().start_as_current_span(
            f"tool {call['name']}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "fleetward.tool": call["name"],
                "fleetward.tool.call_id": call["id"],
                "fleetward.run_id": ctx.run_id,
                "fleetward.tool.mutating": tool.spec.mutating,
            },
        ) as span:
            token = mint_tool_token(
                services.signing_key.private_key,
                services.signing_key.key_id,
                services.agent,
                call["name"],
                ctx.run_id,
                key,
                issuer=services.config.installation.id,
            )
            invocation = Invocation(
                call["name"], call["id"], ctx.run_id, token, key, traceparent_of(span), services.audit
            )
            reset = CURRENT_INVOCATION.set(invocation)
            started = time.monotonic()
            try:
                result = await handler(request)
            finally:
                CURRENT_INVOCATION.reset(reset)
            outcome = tool.last_outcomes.pop(call["id"], None)
            elapsed = time.monotonic() - started
            message = _message_of(result)
            ok = outcome.ok if outcome is not None else (message is not None and message.status != "error")
            label = "ok" if ok else "error"
            TOOL_DURATION.labels(services.agent, call["name"], label).observe(elapsed)
            span.set_attribute("fleetward.tool.ok", ok)
            if outcome is not None and outcome.status is not None:
                span.set_attribute("http.response.status_code", outcome.status)
            if not ok:
                reason = f"http_{outcome.status}" if outcome is not None and outcome.status else "call_failed"
                TOOL_ERRORS.labels(services.agent, call["name"], reason).inc()
                span.set_status(trace.Status(trace.StatusCode.ERROR, reason))
            if isinstance(result, ToolMessage):
                artifact = {"ok": ok, "durationMs": int(elapsed * 1000)}
                if outcome is not None:
                    artifact["httpStatus"] = outcome.status
                    artifact["replayed"] = outcome.replayed
                    if outcome.error:
                        artifact["error"] = outcome.error
                result = result.model_copy(update={"artifact": artifact, "status": "success" if ok else "error"})
            return result
