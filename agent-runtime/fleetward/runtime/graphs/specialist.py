"""The specialist graph (SPEC §4): a LangChain 1.x agent whose steps are LangGraph nodes,
each checkpointed before the next starts (durability "sync", set by the executor):

    retrieve_sop (SopRetrievalMiddleware.before_agent; interrupt when no SOP matches)
      -> model <-> tools   (the agent loop; tools bound under the gates below)
      -> respond           (RespondMiddleware.after_agent)

Concerns live in middleware, outermost first on each model/tool call:
- model call: ModelCallMiddleware (halt gate, span, tokens, cost) -> SopPromptMiddleware
  (system prompt from the SOP) -> GuardrailMiddleware (output) -> PIIMiddleware (from the
  Guardrails, defence in depth) -> the model;
- tool call: ToolEventsMiddleware (halt gate, tool_call/tool_result events) ->
  SopGateMiddleware (allow-list, SOP prerequisites) -> GuardrailMiddleware (tool results)
  -> ToolCredentialsMiddleware (token, Idempotency-Key, traceparent, span) -> HTTP.

The router graph (graphs/router.py, next to this one) is chosen by `build_graph` from the
Agent's role; both take the same `Services` and run under the same executor.
"""

from __future__ import annotations

from typing import Any

from fleetward.runtime.context import RunContext, Services
from fleetward.runtime.middleware.guardrails import GuardrailMiddleware
from fleetward.runtime.middleware.observability import ModelCallMiddleware
from fleetward.runtime.middleware.respond import RespondMiddleware
from fleetward.runtime.middleware.sop_gate import (
    SopGateMiddleware,
    SopPromptMiddleware,
    SopRetrievalMiddleware,
    SpecialistState,
)
from fleetward.runtime.middleware.tool_credentials import ToolCredentialsMiddleware, ToolEventsMiddleware
from fleetward.runtime.tools import ToolHttpClient, build_tools
from langchain.agents import create_agent
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.base import BaseCheckpointSaver

from fleetward.api.runtimeconfig import RuntimeConfig


def chat_model(config: RuntimeConfig, api_key: str | None) -> ChatOpenAI:
    """The Agent's model through langchain-openai; any OpenAI-compatible endpoint."""
    m = config.spec.model
    return ChatOpenAI(
        model=m.name,
        base_url=m.base_url,
        api_key=api_key or "unused",  # some endpoints need no key; the client insists on one
        temperature=m.temperature,
        timeout=m.timeout_seconds,
        max_retries=m.max_retries,
        stream_usage=True,
    )


def build_specialist(
    services: Services, model: Any, tool_client: ToolHttpClient, checkpointer: BaseCheckpointSaver
) -> Any:
    config = services.config
    tools = build_tools(config.spec.tools, tool_client)
    middleware: list[Any] = [
        SopRetrievalMiddleware(),
        ModelCallMiddleware(config.spec.model.name),
        SopPromptMiddleware(),
        ToolEventsMiddleware(),
        SopGateMiddleware([t.name for t in tools], [s for s in config.sops]),
        GuardrailMiddleware(services.guardrails),
        ToolCredentialsMiddleware(),
        RespondMiddleware(),
    ]
    if config.guardrails:
        from fleetward.runtime.guardrails.middleware import pii_middleware

        middleware += pii_middleware([g.spec for g in config.guardrails], names=[g.name for g in config.guardrails])
    return create_agent(
        model,
        tools,
        middleware=middleware,
        state_schema=SpecialistState,
        context_schema=RunContext,
        checkpointer=checkpointer,
        name=f"specialist:{config.agent.ref}",
    )
