"""Guardrails in the run, from the Agent's referenced Guardrail resources (SPEC §4).

The detection is `fleetward.runtime.guardrails` (the engine behind `fleetward guardrail
scan`). Where it runs, so that PII never reaches the model, the logs, the traces or even
the checkpoints unredacted:
- input: before the request enters the graph (`guard_input`, called by the executor);
  the graph state only ever holds the redacted text; a blocked input never starts a run;
- tool results: `GuardrailMiddleware.awrap_tool_call`, before the ToolMessage enters the
  state: PII redacted, an injection (or other block) replaces the result with a notice
  and fails the call, so the step does not count as succeeded;
- output: `GuardrailMiddleware.awrap_model_call`, before the AI message enters the state:
  PII redacted; a blocked or escalated final answer is withheld (the respond step then
  reports `failed`/`escalated` instead of sending it).
LangChain's PIIMiddleware, built from the same specs by `guardrails.middleware`, is
composed as well (before/after every model call): defence in depth at the model boundary.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fleetward.runtime.audit import record_guardrail_block
from fleetward.runtime.context import RunContext
from fleetward.runtime.guardrails.engine import GuardrailEngine, ScanResult, Stage
from fleetward.runtime.telemetry import GUARDRAIL_VIOLATIONS, PII_DETECTIONS
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

GUARDRAIL_METADATA = "fleetward_guardrail"


@dataclass(frozen=True)
class Guarded:
    verdict: str
    text: str | None
    findings: list[dict[str, Any]]

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"


def scan(engine: GuardrailEngine | None, text: str, stage: Stage, agent: str) -> Guarded:
    """Run the engine and count what it found (types and kinds only, never values)."""
    if engine is None or not text:
        return Guarded("allow", text, [])
    result: ScanResult = engine.scan(text, stage)
    for f in result.findings:
        if f.kind == "pii":
            PII_DETECTIONS.labels(agent, stage, f.type).inc()
    if result.verdict != "allow":
        for kind in sorted({f.kind for f in result.findings} or {"unknown"}):
            GUARDRAIL_VIOLATIONS.labels(agent, stage, kind, result.verdict).inc()
    return Guarded(result.verdict, result.text, [f.to_json() for f in result.findings])


def finding_summary(findings: list[dict[str, Any]]) -> str:
    kinds = sorted({f"{f['kind']}:{f['type']}" for f in findings if f["kind"] != "pii"})
    return ", ".join(kinds) or "pii"


def redact_value(engine: GuardrailEngine | None, value: Any, stage: Stage, agent: str) -> Any:
    """A JSON value with every string redacted (for events and logs); a blocked string
    becomes a placeholder."""
    if isinstance(value, str):
        g = scan(engine, value, stage, agent)
        return g.text if g.text is not None else "[withheld by guardrail]"
    if isinstance(value, dict):
        return {k: redact_value(engine, v, stage, agent) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(engine, v, stage, agent) for v in value]
    return value


class GuardrailMiddleware(AgentMiddleware[Any, RunContext]):
    def __init__(self, engine: GuardrailEngine | None) -> None:
        super().__init__()
        self.engine = engine

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command]]
    ) -> ToolMessage | Command:
        result = await handler(request)
        if self.engine is None or not isinstance(result, ToolMessage):
            return result
        ctx: RunContext = request.runtime.context
        text = result.content if isinstance(result.content, str) else json.dumps(result.content)
        g = scan(self.engine, text, "toolResults", ctx.services.agent)
        if g.allowed:
            if g.text == text:
                return result
            return result.model_copy(update={"content": g.text})
        why = finding_summary(g.findings)
        await record_guardrail_block(ctx, "toolResults", g.verdict, why)
        artifact = dict(result.artifact or {}) if isinstance(result.artifact, dict) else {}
        artifact.update(
            {"ok": False, "error": f"result withheld by guardrail ({g.verdict}: {why})", "guardrail": g.verdict}
        )
        return result.model_copy(
            update={
                "content": f"[The tool result was withheld by a guardrail ({why}). Do not rely on it.]",
                "status": "error",
                "artifact": artifact,
            }
        )

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        response = await handler(request)
        if self.engine is None:
            return response
        ctx: RunContext = request.runtime.context
        out = []
        for message in response.result:
            if isinstance(message, AIMessage) and isinstance(message.content, str) and message.content:
                message = self._guard_output(message, ctx.services.agent)
                withheld = (message.response_metadata or {}).get(GUARDRAIL_METADATA)
                if withheld:
                    await record_guardrail_block(ctx, "output", withheld["verdict"], withheld["findings"])
            out.append(message)
        return ModelResponse(result=out, structured_response=response.structured_response)

    def _guard_output(self, message: AIMessage, agent: str) -> AIMessage:
        g = scan(self.engine, message.content, "output", agent)  # type: ignore[arg-type]
        if g.allowed and g.text == message.content:
            return message
        metadata = dict(message.response_metadata or {})
        if g.allowed:
            return message.model_copy(update={"content": g.text})
        metadata[GUARDRAIL_METADATA] = {"verdict": g.verdict, "findings": finding_summary(g.findings)}
        # The text is withheld from the state; tool calls (if any) stay for the gates to judge.
        return message.model_copy(update={"content": "", "response_metadata": metadata})
