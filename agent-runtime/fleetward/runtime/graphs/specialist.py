"""The specialist graph (SPEC §4): a LangChain 1.x agent whose steps are LangGraph nodes,
each checkpointed before the next starts (durability "sync", set by the executor):

    retrieve_sop (SopRetrievalMiddleware.before_agent; interrupt when no SOP matches)
      -> model <-> tools   (the agent loop; tools bound under the gates below)
      -> review            (DraftReviewMiddleware.after_agent; interrupt when the draft
                            needs a human per humanReview; review.py)
      -> respond           (RespondMiddleware.after_agent)

Concerns live in middleware, outermost first on each model/tool call:
- budgets (middleware/budgets.py; each only when `spec.budget` sets it): before every model
  call StepBudgetMiddleware (`maxStepsPerRun`, LangChain's ModelCallLimitMiddleware) and
  RunTokenBudgetMiddleware (`maxTokensPerRun`) check the run's counts, checkpointed in the
  graph state; after it ToolCallBudgetMiddleware (`maxToolCallsPerRun`, LangChain's
  ToolCallLimitMiddleware) and the token cap decide whether the tools it asks for may run.
  They count a call once it succeeded, outside the failure handling, so a retried or
  fallen-back call counts once. A cap that is hit jumps to the respond step with a partial
  result;
- model call: RunTokenBudgetMiddleware (sums the reported usage into the state) ->
  ModelFallbackMiddleware (the Agent's `model.fallbacks`, in order; only when
  there are any) -> ResilientModelRetryMiddleware (transient errors only, full-jitter
  backoff, each model its own `maxRetries`, the run's retry budget, the step gate before
  every attempt) -> DailyTokenBudgetMiddleware (`dailyTokenBudget`: past the step gate,
  reserves in the shared ledger before each attempt and settles after it, a failed attempt
  refunded; a call the budget cannot cover is answered with the partial result instead) ->
  ModelCallMiddleware (halt gate, span, tokens, cost: one span per attempt) ->
  SopPromptMiddleware (system prompt from the SOP) -> MemoryMiddleware (the user's earlier
  outcomes appended to it; memory.py) -> GuardrailMiddleware (output) ->
  PIIMiddleware (from the Guardrails, defence in depth) -> the model;
- tool call: ToolEventsMiddleware (halt gate, tool_call/tool_result events) ->
  SopGateMiddleware (allow-list, SOP prerequisites) -> ReviewedToolsMiddleware (a reviewer's
  approval for `requiresApproval` tools and SOP steps with `approval: human`; review.py;
  only for Agents that have such tools, like ReviewEscalationMiddleware)
  -> GuardrailMiddleware (tool results)
  -> IdempotentToolRetryMiddleware (transient failures of calls safe to repeat) ->
  ToolCircuitBreakerMiddleware (per tool) -> ToolCredentialsMiddleware (token,
  Idempotency-Key, traceparent, span) -> HTTP (the tool's `timeoutSeconds`).

Steps: the hooks of one kind (before_agent, before_model, after_model, after_agent) run as
one checkpointed step, not one per middleware (middleware/steps.py, `one_step_per_hook`): a
plain request walks six graph nodes instead of nine.

Failure handling (resilience.py) sits outside the call it repeats: every model attempt is
its own span with its own tokens, every tool attempt gets a fresh token under the same
Idempotency-Key, and the guardrails and events see only the final outcome. The chat models
are built with `max_retries=0`: retries are ours (counted, budgeted, halt-aware), the
openai SDK's would repeat non-idempotent work behind our back with its own backoff.

The router graph (graphs/router.py, next to this one) is chosen by `build_graph` from the
Agent's role; both take the same `Services` and run under the same executor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fleetward.runtime.context import RunContext, Services
from fleetward.runtime.memory import MemoryMiddleware
from fleetward.runtime.middleware.budgets import DailyTokenBudgetMiddleware, run_budget_middleware
from fleetward.runtime.middleware.guardrails import GuardrailMiddleware
from fleetward.runtime.middleware.observability import ModelCallMiddleware
from fleetward.runtime.middleware.respond import RespondMiddleware
from fleetward.runtime.middleware.sop_gate import (
    SopGateMiddleware,
    SopPromptMiddleware,
    SopRetrievalMiddleware,
)
from fleetward.runtime.middleware.steps import one_step_per_hook
from fleetward.runtime.middleware.tool_credentials import ToolCredentialsMiddleware, ToolEventsMiddleware
from fleetward.runtime.resilience import model_failure_middleware, tool_failure_middleware
from fleetward.runtime.review import (
    DraftReviewMiddleware,
    ReviewedToolsMiddleware,
    ReviewEscalationMiddleware,
    ReviewPolicy,
    ReviewState,
    has_reviewed_tools,
)
from fleetward.runtime.tools import ToolHttpClient, build_tools
from langchain.agents import create_agent
from langchain_core.tools import BaseTool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.base import BaseCheckpointSaver

from fleetward.api.agent import ModelEndpoint
from fleetward.api.runtimeconfig import RuntimeConfig


def chat_model(endpoint: ModelEndpoint, api_key: str | None) -> ChatOpenAI:
    """One of the Agent's models through langchain-openai; any OpenAI-compatible endpoint.
    `max_retries=0`: the SDK never retries; `endpoint.maxRetries` is applied by
    ResilientModelRetryMiddleware (transient errors only, budgeted, halt-aware)."""
    return ChatOpenAI(
        model=endpoint.name,
        base_url=endpoint.base_url,
        api_key=api_key or "unused",  # some endpoints need no key; the client insists on one
        temperature=endpoint.temperature,
        timeout=endpoint.timeout_seconds,
        max_retries=0,
        stream_usage=True,
    )


def chat_models(
    config: RuntimeConfig, load_key: Callable[[RuntimeConfig, int], str | None]
) -> list[tuple[ChatOpenAI, ModelEndpoint]]:
    """The primary model and its fallbacks in order, each with its own API key: model `i`
    (0 = primary, 1..n = `model.fallbacks[i-1]`) reads the key the operator mounted for
    credential index `i` (`RuntimeConfig.credentials.models`)."""
    primary = config.spec.model
    endpoints: list[ModelEndpoint] = [primary, *(primary.fallbacks or [])]
    return [(chat_model(endpoint, load_key(config, i)), endpoint) for i, endpoint in enumerate(endpoints)]


def specialist_middleware(
    services: Services, model: Any, tools: Sequence[BaseTool], *, fallbacks: Sequence[Any] = ()
) -> list[Any]:
    """The specialist's middleware, outermost first (see the module docstring). `model` is
    the primary chat model; `fallbacks` the chat models of the Agent's `model.fallbacks`, in
    the same order (see `chat_models`)."""
    config = services.config
    endpoints = list(config.spec.model.fallbacks or [])
    if len(fallbacks) != len(endpoints):
        raise ValueError(f"{len(fallbacks)} fallback model(s) given for {len(endpoints)} in model.fallbacks")
    budgets = services.retry_budgets
    review = ReviewPolicy.of(config.spec)
    reviewed_tools = has_reviewed_tools(review, list(config.sops))
    chain = list(zip(fallbacks, endpoints, strict=True))
    middleware: list[Any] = [
        SopRetrievalMiddleware(),
        *run_budget_middleware(config.spec.budget),
        *model_failure_middleware((model, config.spec.model), chain, budget_of=budgets),
        *([DailyTokenBudgetMiddleware()] if services.token_ledger is not None else []),
        ModelCallMiddleware(config.spec.model.name),
        SopPromptMiddleware(),
        *([MemoryMiddleware(services.memory)] if services.memory is not None else []),
        ToolEventsMiddleware(),
        SopGateMiddleware([t.name for t in tools], [s for s in config.sops]),
        *([ReviewedToolsMiddleware(review, {t.name for t in tools}, list(config.sops))] if reviewed_tools else []),
        GuardrailMiddleware(services.guardrails),
        *tool_failure_middleware(services.agent, config.spec.tools, budget_of=budgets),
        ToolCredentialsMiddleware(),
        RespondMiddleware(),
        DraftReviewMiddleware(review),  # after_agent hooks run last-listed first: review, then respond
        *([ReviewEscalationMiddleware()] if reviewed_tools else []),
    ]
    if config.guardrails:
        from fleetward.runtime.guardrails.middleware import pii_middleware

        middleware += pii_middleware(
            [g.spec for g in config.guardrails],
            names=[g.name for g in config.guardrails],
            hash_key=services.pii_hash_key,
        )
    return middleware


def build_specialist(
    services: Services,
    model: Any,
    tool_client: ToolHttpClient,
    checkpointer: BaseCheckpointSaver,
    *,
    fallbacks: Sequence[Any] = (),
) -> Any:
    """`model` is the primary chat model; `fallbacks` the chat models of the Agent's
    `model.fallbacks`, in the same order (see `chat_models`)."""
    config = services.config
    tools = build_tools(config.spec.tools, tool_client)
    return create_agent(
        model,
        tools,
        middleware=one_step_per_hook(specialist_middleware(services, model, tools, fallbacks=fallbacks)),
        state_schema=ReviewState,
        context_schema=RunContext,
        checkpointer=checkpointer,
        name=f"specialist:{config.agent.ref}",
    )
