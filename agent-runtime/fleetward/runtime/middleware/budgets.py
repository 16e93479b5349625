"""Budgets in the run (SPEC §4 "Budgets"; the Agent's `spec.budget`).

Per run (a run is one LangGraph thread, thread id = run id, so LangChain's *thread* counts
are per run; their *run* counts are per invocation and not checkpointed, so a run resumed
after an interrupt or a crash would start them again):
- `maxStepsPerRun`: `StepBudgetMiddleware`, LangChain's `ModelCallLimitMiddleware` with
  `thread_limit`. A step is one turn of the agent loop: one model call (retries and
  fallbacks of that call included) with the tool calls it asks for. The count is taken
  after a call succeeded (after_model), so a retried call counts once.
- `maxToolCallsPerRun`: `ToolCallBudgetMiddleware`, LangChain's `ToolCallLimitMiddleware`
  with `thread_limit` and `exit_behavior="end"`: a model answer asking for more tool calls
  than are left runs none of them.
- `maxTokensPerRun`: `RunTokenBudgetMiddleware` (LangChain has no token cap): the provider's
  usage (`usage_metadata`, prompt + completion) of every model call, summed in the graph
  state (`run_tokens`, checkpointed with the model step, so a run continued from its
  checkpoint after a restart keeps its count). No model call starts once the run has used
  its tokens; a call that goes over the cap has spent its tokens: when it asks for tools
  they are not run, when it is the answer it is delivered.

Per agent per day (`dailyTokenBudget`): `DailyTokenBudgetMiddleware` reserves an estimate in
the shared ledger (budget.py, PostgreSQL across replicas) right before each model attempt
and settles it with the reported usage right after; a failed attempt is refunded, so a
retry does not count twice. It sits inside the retry and fallback middleware (each attempt
reserves for the model it calls) and passes the step gate before it reserves, so a halted
run, parked at the gate or in a backoff wait, holds no reservation. A call the budget
cannot cover is not made: the middleware answers in the model's place with the partial
result. Thresholds crossed by a charge go to the alerts topic (alerts.py).

A cap that is hit stops the run gracefully: `budget_stop` in the graph state (which budget,
the cap, what was used, the partial result: the best answer so far and a plain-words note
that the request hit its limit), an AI message with the partial result, and a jump to the
end, where RespondMiddleware sends it as `message`, then `budget_exceeded`, and records the
stop in the audit log; the executor marks the run `budget_stopped` (final, not failed, not
dead-lettered).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Annotated, Any, Literal, NotRequired

from fleetward.runtime.budget import BudgetExceeded, Charge, Reservation
from fleetward.runtime.context import RunContext
from fleetward.runtime.middleware.guardrails import GUARDRAIL_METADATA
from fleetward.runtime.middleware.sop_gate import succeeded_tools, system_prompt
from langchain.agents.middleware import (
    AgentMiddleware,
    AgentState,
    ModelCallLimitMiddleware,
    ModelRequest,
    ModelResponse,
    ToolCallLimitMiddleware,
)
from langchain.agents.middleware.types import ExtendedModelResponse, PrivateStateAttr, hook_config
from langchain_core.messages import AIMessage, SystemMessage, ToolMessage
from langchain_core.messages.utils import count_tokens_approximately
from langgraph.runtime import Runtime
from langgraph.types import Command

log = logging.getLogger("fleetward.runtime.budgets")

BudgetName = Literal["tokens", "toolCalls", "steps", "dailyTokens"]
BUDGET_STOP = "budget_stop"
"""The state key of a budget stop (declared in SpecialistState)."""

OUTPUT_ALLOWANCE = 1024
"""Completion tokens reserved per model call on top of the prompt's estimate.

Why an estimate of prompt + allowance, and not a fixed amount per call: the prompt is
known before the call and grows with the run (the SOP, the tools, every tool result), so
counting it keeps the reservation close to the truth on long runs, where a fixed estimate
would under-reserve and let concurrent replicas overspend by the difference. The
completion is not known and the models are not given a max_tokens (an answer cut short is
worse than a budget settled a little over), so a fixed allowance stands for it: 1024
tokens is more than a support answer or a tool call usually takes. Settling books the
actual usage either way (a refund when less was used; an extra, never refused, when more
was), so the estimate decides only how close to the limit a call may still start."""

PARTIAL_CHARS = 3000
"""The longest "best answer so far" quoted in a partial result."""

LIMIT_WORDS: dict[str, str] = {
    "tokens": "the limit of {limit} model tokens that may be spent on one request",
    "toolCalls": "the limit of {limit} tool calls for one request",
    "steps": "the limit of {limit} steps for one request",
    "dailyTokens": "this assistant's daily allowance of {limit} model tokens (renewed at midnight UTC)",
}

NOT_RUN = "Not run: the request reached its {what} limit before this call could be made."


def best_answer(messages: Iterable[Any]) -> str:
    """The last text the model produced in this run (not one a guardrail withheld)."""
    for m in reversed(list(messages)):
        if not isinstance(m, AIMessage) or (m.response_metadata or {}).get(GUARDRAIL_METADATA):
            continue
        if (m.additional_kwargs or {}).get(BUDGET_STOP):
            continue
        text = (m.text or "").strip()
        if text:
            return text if len(text) <= PARTIAL_CHARS else text[:PARTIAL_CHARS].rstrip() + " ..."
    return ""


def partial_result(budget: str, limit: int, messages: Sequence[Any]) -> str:
    """What the user is told when the run stops at a cap: the best answer so far, if any, and
    in plain words that the request hit its limit and what was done."""
    reached = LIMIT_WORDS[budget].format(limit=limit)
    answer = best_answer(messages)
    done = sorted(succeeded_tools(messages))
    if answer:
        text = f"{answer}\n\nI had to stop here before finishing your request: it reached {reached}."
    else:
        text = f"I'm sorry, I could not finish your request: it reached {reached}."
    if done:
        text += f" Completed so far: {', '.join(done)}."
    if budget == "dailyTokens":
        text += " Please try again later, or contact our support team if it is urgent."
    else:
        text += " Please contact our support team if you still need help."
    return text


def budget_stop(budget: BudgetName, limit: int, used: int, messages: Sequence[Any]) -> dict[str, Any]:
    """The `budget_stop` state entry: which budget, its cap, what was used, the partial result."""
    return {
        "budget": budget,
        "scope": "day" if budget == "dailyTokens" else "run",
        "limit": int(limit),
        "used": max(int(used), 0),
        "partial": partial_result(budget, limit, messages),
    }


def stop_message(stop: dict[str, Any]) -> AIMessage:
    """The run's last AI message at a budget stop: the partial result (marked, so a later
    partial result never quotes it as an answer)."""
    return AIMessage(content=stop["partial"], additional_kwargs={BUDGET_STOP: stop["budget"]})


def not_run(calls: Iterable[dict[str, Any]], what: str) -> list[ToolMessage]:
    """Results for tool calls that will not run, so the conversation stays valid."""
    return [
        ToolMessage(
            content=NOT_RUN.format(what=what),
            tool_call_id=c["id"],
            name=c.get("name"),
            status="error",
            artifact={"ok": False, "error": f"not run: {what} limit reached"},
        )
        for c in calls
    ]


def response_tokens(messages: Iterable[Any]) -> int | None:
    """The tokens (prompt + completion) the provider reported for a model response; None when
    it reported none."""
    total: int | None = None
    for m in messages:
        usage = m.usage_metadata if isinstance(m, AIMessage) else None
        if usage:
            tokens = usage.get("total_tokens") or (usage.get("input_tokens", 0) + usage.get("output_tokens", 0))
            total = (total or 0) + int(tokens)
    return total


def _stopped(state: Any) -> bool:
    return bool(state.get(BUDGET_STOP)) if isinstance(state, dict) else False


# -- per run: steps ---------------------------------------------------------------------------


class StepBudgetMiddleware(ModelCallLimitMiddleware):  # type: ignore[type-arg]
    """`maxStepsPerRun` (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        super().__init__(thread_limit=limit, exit_behavior="end")
        self.limit = limit

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: Any, runtime: Runtime[Any]) -> dict[str, Any] | None:
        if _stopped(state):
            return None
        result = super().before_model(state, runtime)
        if not result or result.get("jump_to") != "end":
            return result
        stop = budget_stop("steps", self.limit, state.get("thread_model_call_count", 0), state.get("messages", []))
        _log_stop(runtime, stop)
        return {"jump_to": "end", "messages": [stop_message(stop)], BUDGET_STOP: stop}

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return self.before_model(state, runtime)


# -- per run: tool calls ----------------------------------------------------------------------


class ToolCallBudgetMiddleware(ToolCallLimitMiddleware):  # type: ignore[type-arg]
    """`maxToolCallsPerRun` (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        super().__init__(thread_limit=limit, exit_behavior="end")
        self.limit = limit

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: Any, runtime: Runtime[Any]) -> dict[str, Any] | None:
        if _stopped(state):
            return None
        result = super().after_model(state, runtime)
        if not result or result.get("jump_to") != "end":
            return result
        made = (state.get("thread_tool_call_count") or {}).get("__all__", 0)
        stop = budget_stop("toolCalls", self.limit, made, state.get("messages", []))
        _log_stop(runtime, stop)
        # The library's ToolMessages for every pending call stay; its closing AI message
        # (limits in its own words) is replaced by the partial result.
        kept = [m for m in result["messages"] if not isinstance(m, AIMessage)]
        return {**result, "messages": [*kept, stop_message(stop)], BUDGET_STOP: stop}

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: Any, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return self.after_model(state, runtime)


# -- per run: tokens ----------------------------------------------------------------------------


class RunTokenState(AgentState):
    run_tokens: NotRequired[Annotated[int, PrivateStateAttr]]
    """Model tokens (prompt + completion, as reported by the provider) used by this run."""


class RunTokenBudgetMiddleware(AgentMiddleware[RunTokenState, RunContext]):
    """`maxTokensPerRun` (see the module docstring). Place it outside the model failure
    middleware: it counts the response of the call, whichever attempt and model gave it."""

    state_schema = RunTokenState

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: RunTokenState, runtime: Runtime[RunContext]) -> dict[str, Any] | None:
        used = state.get("run_tokens") or 0
        if _stopped(state) or used < self.limit:
            return None
        stop = budget_stop("tokens", self.limit, used, state.get("messages", []))
        _log_stop(runtime, stop)
        return {"jump_to": "end", "messages": [stop_message(stop)], BUDGET_STOP: stop}

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: RunTokenState, runtime: Runtime[RunContext]) -> dict[str, Any] | None:
        used = state.get("run_tokens") or 0
        messages = state.get("messages", [])
        last = messages[-1] if messages else None
        if _stopped(state) or used < self.limit or not (isinstance(last, AIMessage) and last.tool_calls):
            return None  # under the cap, or an answer: delivered (its tokens are spent already)
        stop = budget_stop("tokens", self.limit, used, messages)
        _log_stop(runtime, stop)
        return {
            "jump_to": "end",
            "messages": [*not_run(last.tool_calls, "token"), stop_message(stop)],
            BUDGET_STOP: stop,
        }

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse | ExtendedModelResponse:
        response = await handler(request)
        tokens = response_tokens(response.result)
        if not tokens:
            return response
        used = (request.state.get("run_tokens") or 0) + tokens
        return ExtendedModelResponse(model_response=response, command=Command(update={"run_tokens": used}))


# -- per agent per day ----------------------------------------------------------------------------


def reservation_estimate(request: ModelRequest, agent: str, allowance: int = OUTPUT_ALLOWANCE) -> int:
    """Tokens to reserve for a model call: the prompt as it will be sent (the SOP system prompt
    SopPromptMiddleware puts in front, the conversation, the tool schemas), estimated at four
    characters a token, plus `allowance` for the completion (see OUTPUT_ALLOWANCE)."""
    system = SystemMessage(content=system_prompt(request.state.get("sop"), agent))
    prompt = count_tokens_approximately([system, *request.messages], tools=list(request.tools or []) or None)
    return int(prompt) + allowance


class DailyTokenBudgetMiddleware(AgentMiddleware[Any, RunContext]):
    """`dailyTokenBudget` (see the module docstring): the ledger is `Services.token_ledger`,
    the alerts go through `Services.alerts`. Place it inside the model failure middleware,
    outside ModelCallMiddleware."""

    def __init__(self, allowance: int = OUTPUT_ALLOWANCE) -> None:
        super().__init__()
        self.allowance = allowance

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse | ExtendedModelResponse:
        ctx: RunContext = request.runtime.context
        ledger = ctx.services.token_ledger
        if ledger is None:
            return await handler(request)
        await ctx.before_step("model")  # parks a halted run here, before it reserves anything
        agent = ctx.services.agent
        estimate = reservation_estimate(request, agent, self.allowance)
        try:
            reservation = await ledger.reserve(agent, estimate)
        except BudgetExceeded as refused:
            stop = budget_stop("dailyTokens", refused.limit, refused.used, request.state.get("messages", []))
            log.warning(
                "model call not made: %s",
                refused,
                extra={"fw": {"runId": ctx.run_id, "sessionId": ctx.session_id, "estimate": estimate}},
            )
            return ExtendedModelResponse(
                model_response=ModelResponse(result=[stop_message(stop)]),
                command=Command(update={BUDGET_STOP: stop}),
            )
        await self._alert(ctx, reservation.charge)
        try:
            response = await handler(request)
        except BaseException:
            await self._settle(ctx, reservation, 0)  # nothing reported: refund; a retry reserves anew
            raise
        actual = response_tokens(response.result)
        # No usage reported: keep the estimate charged (the budget errs towards refusing).
        await self._settle(ctx, reservation, estimate if actual is None else actual)
        return response

    async def _settle(self, ctx: RunContext, reservation: Reservation, tokens: int) -> None:
        ledger = ctx.services.token_ledger
        assert ledger is not None
        try:
            charge = await ledger.settle(reservation, tokens)
        except Exception as e:  # the call's outcome stands; the estimate stays charged
            log.error(
                "could not settle a daily token reservation of %d tokens with %d: %s",
                reservation.tokens,
                tokens,
                e,
                extra={"fw": {"runId": ctx.run_id}},
            )
            return
        await self._alert(ctx, charge)

    @staticmethod
    async def _alert(ctx: RunContext, charge: Charge) -> None:
        if charge.crossed and ctx.services.alerts is not None:
            await ctx.services.alerts.budget_thresholds(
                charge.crossed, session_id=ctx.session_id, run_id=ctx.run_id, trace_id=ctx.trace_id
            )


# -- wiring ----------------------------------------------------------------------------------------


def run_budget_middleware(budget: Any) -> list[AgentMiddleware[Any, Any]]:
    """The per-run caps of `spec.budget` that are set, outermost first: steps, tool calls,
    tokens. Place them outside the model failure middleware (see the module docstring)."""
    out: list[AgentMiddleware[Any, Any]] = []
    if budget.max_steps_per_run is not None:
        out.append(StepBudgetMiddleware(budget.max_steps_per_run))
    if budget.max_tool_calls_per_run is not None:
        out.append(ToolCallBudgetMiddleware(budget.max_tool_calls_per_run))
    if budget.max_tokens_per_run is not None:
        out.append(RunTokenBudgetMiddleware(budget.max_tokens_per_run))
    return out


def _log_stop(runtime: Runtime[Any], stop: dict[str, Any]) -> None:
    ctx = getattr(runtime, "context", None)
    fields: dict[str, Any] = {"budget": stop["budget"], "limit": stop["limit"], "used": stop["used"]}
    if isinstance(ctx, RunContext):
        fields.update(runId=ctx.run_id, sessionId=ctx.session_id)
    log.warning(
        "run stopped at its %s budget (%d of %d used)",
        stop["budget"],
        stop["used"],
        stop["limit"],
        extra={"fw": fields},
    )
