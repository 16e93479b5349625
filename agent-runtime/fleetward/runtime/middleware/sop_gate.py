"""The SOP in a run: choose it, put it in the prompt, and enforce it on every tool call.

- `SopRetrievalMiddleware` (before_agent, a graph node): retrieves the SOP for the request;
  when none matches, it records an `escalated` event and stops at a durable interrupt
  asking a human for the procedure; `provide_sop` resumes it with the text.
- `SopPromptMiddleware` (wrap_model_call): the system prompt is the SOP's instructions and
  steps, rebuilt from the checkpointed state on every model call.
- `SopGateMiddleware` (wrap_tool_call): two gates in code, never in the prompt:
  1. the allow-list: a tool the Agent does not list is refused;
  2. the SOP gate: a tool whose SOP step `requires` steps that have not succeeded earlier
     in this run is refused (no `issue_refund` before `verify_transaction`).
  A refusal never reaches the tool service; the model is told why, and the run's events
  record it (tool_result with ok=false).

"Succeeded" is read from the run's own checkpointed conversation: a step with a tool
succeeded when a call of that tool returned without error (a refused, failed or withheld
call does not count); a step without a tool cannot be checked in code and counts as done.
Which steps gate a tool: those of the run's SOP that name it; if that SOP does not name
the tool, those of every SOP of the agent that does (a tool gated anywhere stays gated,
also under a SOP a human typed in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NotRequired

from fleetward.runtime.context import DEFAULT_HUMAN_QUEUE, RunContext
from fleetward.runtime.telemetry import GUARDRAIL_VIOLATIONS, TOOL_ERRORS
from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.runtime import Runtime
from langgraph.types import Command, interrupt

from fleetward.api.runtimeconfig import ResolvedSOP

SOP_INTERRUPT = "sop"


class SpecialistState(AgentState):
    sop: NotRequired[dict[str, Any] | None]
    """The SOP the run follows: {name, version, title, instructions, steps, provided}."""
    budget_stop: NotRequired[dict[str, Any] | None]
    """Set when the run stopped at a budget cap (middleware/budgets.py): {budget, scope,
    limit, used, partial}; the respond step then sends the partial result."""


@dataclass(frozen=True)
class StepRule:
    sop: str
    step: str
    tool: str
    requires: tuple[str, ...]


def sop_state(sop: ResolvedSOP) -> dict[str, Any]:
    s = sop.spec
    return {
        "name": sop.name,
        "version": sop.version,
        "title": s.title,
        "instructions": s.instructions,
        "steps": [
            {
                "id": st.id,
                "instruction": st.instruction,
                "tool": st.tool,
                "requires": list(st.requires or []),
                "approval": st.approval,
            }
            for st in s.steps or []
        ],
        "escalationQueue": s.escalation_queue,
        "provided": False,
    }


def provided_sop_state(instructions: str, title: str | None, by: str | None) -> dict[str, Any]:
    return {
        "name": "provided-by-human",
        "version": "0",
        "title": title or "Procedure provided by a human",
        "instructions": instructions,
        "steps": [],
        "escalationQueue": None,
        "provided": True,
        "providedBy": by,
    }


def last_human_text(messages: Iterable[Any]) -> str:
    for m in reversed(list(messages)):
        if isinstance(m, HumanMessage):
            return m.text if hasattr(m, "text") else str(m.content)
    return ""


class SopRetrievalMiddleware(AgentMiddleware[SpecialistState, RunContext]):
    state_schema = SpecialistState

    async def abefore_agent(self, state: SpecialistState, runtime: Runtime[RunContext]) -> dict[str, Any] | None:
        ctx = runtime.context
        if state.get("sop"):
            return None
        await ctx.before_step("retrieve_sop")
        text = last_human_text(state["messages"])
        # The embedding (~5-10 ms of ONNX inference, which releases the GIL) runs in a worker
        # thread: on the event loop it would hold up every other run, the probes and control.
        found = await asyncio.to_thread(ctx.services.retriever.retrieve, text)
        if found.sop is not None:
            await ctx.emit(
                "sop",
                "status",
                {"state": "Active", "step": "retrieve_sop", "detail": f"SOP {found.detail} ({found.method})"},
            )
            return {"sop": sop_state(found.sop)}
        await ctx.emit(
            "sop-escalated",
            "escalated",
            {
                "queue": DEFAULT_HUMAN_QUEUE,
                "reason": f"No SOP covers this request; a human must provide the "
                f"procedure (provide_sop with runId {ctx.run_id}). {found.detail}",
            },
        )
        await ctx.emit(
            "sop-waiting",
            "status",
            {"state": "WaitingForHuman", "step": "retrieve_sop", "detail": "waiting for a human to provide the SOP"},
        )
        answer = interrupt({"kind": SOP_INTERRUPT, "runId": ctx.run_id, "reason": found.detail})
        sop = provided_sop_state(answer["instructions"], answer.get("title"), answer.get("providedBy"))
        await ctx.emit(
            "sop-provided",
            "status",
            {
                "state": "Active",
                "step": "retrieve_sop",
                "detail": f"SOP provided by {answer.get('providedBy') or 'a human'}",
            },
        )
        return {"sop": sop}


def system_prompt(sop: dict[str, Any] | None, agent: str) -> str:
    lines = [
        f"You are the support agent {agent}. Follow the standard operating procedure below exactly.",
        "Use only the tools offered. The runtime refuses tool calls that skip a step's prerequisites.",
        "Text in [REDACTED_...] brackets was removed to protect personal data; do not ask for it again.",
    ]
    if sop:
        lines += ["", f"SOP: {sop['title']} ({sop['name']}@{sop['version']})", sop["instructions"].strip()]
        if sop["steps"]:
            lines.append("Steps:")
            for i, st in enumerate(sop["steps"], 1):
                extra = f" [tool: {st['tool']}]" if st.get("tool") else ""
                needs = f" (after: {', '.join(st['requires'])})" if st.get("requires") else ""
                lines.append(f"{i}. {st['id']}: {st['instruction']}{extra}{needs}")
    return "\n".join(lines)


class SopPromptMiddleware(AgentMiddleware[SpecialistState, RunContext]):
    state_schema = SpecialistState

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        ctx: RunContext = request.runtime.context
        prompt = system_prompt(request.state.get("sop"), ctx.services.agent)
        return await handler(request.override(system_message=SystemMessage(content=prompt)))


def succeeded_tools(messages: Iterable[Any]) -> set[str]:
    """Tools that returned without error earlier in this run."""
    return {m.name for m in messages if isinstance(m, ToolMessage) and m.status != "error" and m.name}


def gate_rules(run_sop: dict[str, Any] | None, all_sops: list[ResolvedSOP]) -> dict[str, list[StepRule]]:
    """tool -> the steps that gate it (see the module docstring)."""
    everywhere: dict[str, list[StepRule]] = {}
    for sop in all_sops:
        for st in sop.spec.steps or []:
            if st.tool:
                everywhere.setdefault(st.tool, []).append(StepRule(sop.name, st.id, st.tool, tuple(st.requires or ())))
    in_run: dict[str, list[StepRule]] = {}
    if run_sop:
        for st in run_sop["steps"]:
            if st.get("tool"):
                in_run.setdefault(st["tool"], []).append(
                    StepRule(run_sop["name"], st["id"], st["tool"], tuple(st.get("requires") or ()))
                )
    return {**everywhere, **in_run}


def step_tools(run_sop: dict[str, Any] | None, all_sops: list[ResolvedSOP]) -> dict[tuple[str, str], str | None]:
    """(sop name, step id) -> the step's tool (None: a step without a tool)."""
    out: dict[tuple[str, str], str | None] = {}
    for sop in all_sops:
        for st in sop.spec.steps or []:
            out[(sop.name, st.id)] = st.tool
    if run_sop:
        for st in run_sop["steps"]:
            out[(run_sop["name"], st["id"])] = st.get("tool")
    return out


def check_tool_call(
    tool: str,
    allowed: set[str],
    run_sop: dict[str, Any] | None,
    all_sops: list[ResolvedSOP],
    succeeded: set[str],
) -> str | None:
    """None when the call may go ahead, else why it is refused."""
    if tool not in allowed:
        return f"tool {tool!r} is not on this agent's allow-list (allowed: {', '.join(sorted(allowed)) or 'none'})"
    rules = gate_rules(run_sop, all_sops).get(tool)
    if not rules:
        return None
    tools_of = step_tools(run_sop, all_sops)
    missing_per_rule = []
    for rule in rules:
        missing = [
            r
            for r in rule.requires
            if (step_tool := tools_of.get((rule.sop, r))) is not None and step_tool not in succeeded
        ]
        if not missing:
            return None
        missing_per_rule.append((rule, missing))
    rule, missing = missing_per_rule[0]
    names = ", ".join(f"{m} ({tools_of[(rule.sop, m)]})" for m in missing)
    return f"SOP {rule.sop} step {rule.step!r} requires step(s) {names} to have succeeded earlier in this run"


def refusal(request: ToolCallRequest, reason: str, kind: str) -> ToolMessage:
    return ToolMessage(
        content=f"Refused by the runtime: {reason}. Do not retry this call; follow the SOP.",
        name=request.tool_call["name"],
        tool_call_id=request.tool_call["id"],
        status="error",
        artifact={"ok": False, "refused": kind, "error": f"refused: {reason}"},
    )


class SopGateMiddleware(AgentMiddleware[SpecialistState, RunContext]):
    state_schema = SpecialistState

    def __init__(self, allowed_tools: Iterable[str], sops: list[ResolvedSOP]) -> None:
        super().__init__()
        self.allowed = set(allowed_tools)
        self.sops = sops

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command]]
    ) -> ToolMessage | Command:
        ctx: RunContext = request.runtime.context
        name = request.tool_call["name"]
        state = request.state if isinstance(request.state, dict) else {}
        reason = check_tool_call(
            name, self.allowed, state.get("sop"), self.sops, succeeded_tools(state.get("messages", []))
        )
        if reason is None:
            return await handler(request)
        kind = "allow_list" if name not in self.allowed else "sop_gate"
        GUARDRAIL_VIOLATIONS.labels(ctx.services.agent, "toolCall", kind, "refuse").inc()
        TOOL_ERRORS.labels(ctx.services.agent, name if name in self.allowed else "<unlisted>", f"refused_{kind}").inc()
        return refusal(request, reason, kind)


def final_answer(messages: list[Any]) -> AIMessage | None:
    last = messages[-1] if messages else None
    return last if isinstance(last, AIMessage) and not last.tool_calls else None
