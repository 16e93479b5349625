"""The router graph (SPEC §4): classify the request, filter what is sensitive, and hand each
part to the specialist of its topic, or to the route's fallback.

    START -> classify -> route -> dispatch -> END

- `classify`: a LangChain agent without tools whose answer is structured output
  (`QueryAnalysis`, the provider's native JSON schema mode: `response_format` json_schema)
  under the same model middleware as a specialist (budgets, retries and fallbacks, the
  model-call span with tokens and cost, the halt gate). A reply that does not validate is
  sent back to the model with the validation error (`StructuredOutputRetryMiddleware`, up to
  `CLASSIFY_ATTEMPTS` answers in all); after that, or when a budget stopped it, the request
  goes to the human queue. It never fails the run.
- `route` (pure decision, plus a look at Kafka): one plan entry per topic. A topic with a
  route whose specialist exists (its request topic is in Kafka: the operator creates it with
  the Agent) is handed to it; an unknown topic or a missing specialist goes to the router's
  `fallback`: its agent, or its human queue (the installation's human queue without one).
  The sensitivity filter: every part's text passes the guardrails again before it leaves
  the router (the model wrote it; redaction applies, a block sends the part to a human), and
  a request classified sensitive never goes to a catch-all fallback agent, only to the
  specialist of its topic or to people.
- `dispatch`: `handoff` commands on the specialists' request topics (idempotency key per run
  and topic, so a replay after a crash is deduplicated by the specialist) and the session's
  events for the whole path: the classification (`status`), each handoff (`status`), each
  escalation (`escalated`, also copied to the alerts topic by the event publisher).

Each node is a checkpointed step (durability "sync"); the executor drives the graph like a
specialist's, and the router's run completes once everything is handed on (the specialists'
runs answer the user in the same session).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Literal, NotRequired

from fleetward.runtime.context import DEFAULT_HUMAN_QUEUE, RunContext, Services
from fleetward.runtime.middleware.budgets import DailyTokenBudgetMiddleware, run_budget_middleware
from fleetward.runtime.middleware.guardrails import scan
from fleetward.runtime.middleware.observability import ModelCallMiddleware
from fleetward.runtime.middleware.steps import one_step_per_hook
from fleetward.runtime.resilience import model_failure_middleware
from fleetward.runtime.telemetry import ROUTER_HANDOFFS
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain.agents.structured_output import ProviderStrategy, StructuredOutputValidationError
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleetward.api.envelopes import AgentCommand

log = logging.getLogger("fleetward.runtime.router")

CLASSIFY_ATTEMPTS = 3
"""Answers the model gets to produce a valid classification (the first and two retries)."""
FALLBACK_ROUTE = "*"
"""The key of the fallback agent's request topic in `RuntimeConfig.topics.routes`."""
TOPIC = r"^[a-z0-9][a-z0-9_.-]*$"


# --- the classification ------------------------------------------------------------------------


class RequestPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str = Field(min_length=1, max_length=128, pattern=TOPIC)
    """The topic this part is about (one of `topics`)."""
    text: str = Field(min_length=1, max_length=8000)
    """This part of the request, in the user's words, for the specialist of the topic."""


class QueryAnalysis(BaseModel):
    """The router's classification, SPEC §4's `QueryAnalysis` (the name of the schema the
    model is given): intent, urgency, tone, topic, is_sensitive. A request that touches
    several topics also lists them all in `topics` and is split into `parts`, so that each
    specialist gets its own part (the wire's `QueryAnalysis` in a handoff is one topic's
    view of it, `wire_analysis`)."""

    model_config = ConfigDict(extra="forbid")

    intent: str = Field(min_length=1, max_length=256)
    urgency: Literal["low", "medium", "high", "critical"]
    tone: str = Field(min_length=1, max_length=64)
    topic: str = Field(min_length=1, max_length=128, pattern=TOPIC)
    """The request's topic (the main one when it touches several)."""
    is_sensitive: bool
    topics: list[Annotated[str, Field(min_length=1, max_length=128, pattern=TOPIC)]] = Field(
        default_factory=list, max_length=16
    )
    """Every topic the request touches, when more than one."""
    parts: list[RequestPart] = Field(default_factory=list, max_length=16)
    """The request split by topic; a topic without a part gets the whole request."""

    @model_validator(mode="before")
    @classmethod
    def _list_shape(cls, data: Any) -> Any:
        # The shape this classification had before it took SPEC §4's name (`intents` and
        # `topics` lists, no `intent`/`topic`): still read, e.g. from a run checkpointed
        # then, or a scenario written for it.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "isSensitive" in data and "is_sensitive" not in data:
            data["is_sensitive"] = data.pop("isSensitive")
        if "intent" not in data and isinstance(data.get("intents"), list) and data["intents"]:
            data["intent"] = "; ".join(str(i) for i in data.pop("intents"))[:256]
        if "topic" not in data and isinstance(data.get("topics"), list) and data["topics"]:
            data["topic"] = data["topics"][0]
        return data

    @property
    def all_topics(self) -> list[str]:
        """`topic` and then the other `topics`, each once."""
        return list(dict.fromkeys([self.topic, *self.topics]))

    @model_validator(mode="after")
    def _parts_name_topics(self) -> QueryAnalysis:
        unknown = sorted({p.topic for p in self.parts} - set(self.all_topics))
        if unknown:
            raise ValueError(f"parts[].topic {', '.join(unknown)} not among topic {self.topic!r} and topics")
        return self


def classification_prompt(topics: Sequence[str], agent: str) -> str:
    known = ", ".join(topics) or "(none)"
    return "\n".join(
        [
            f"You are the router {agent} of a support team. Classify the user's request; do not answer it.",
            f"Known topics (each has a specialist team): {known}.",
            "Give the request's intent, urgency, tone, topic (the main one) and is_sensitive. A request may "
            "touch several topics: then list every one in topics, and split the request into parts, one per "
            "topic, quoting the user's own words for that part.",
            "Use a short lowercase name (letters, digits, '-', '_', '.') for a topic outside the list, "
            "e.g. security; such parts go to people.",
            "Set is_sensitive when the request involves credentials, permissions, payments or personal data.",
            "Text in [REDACTED_...] brackets was removed to protect personal data; keep it as it is.",
            "Answer with the JSON object of the given schema only.",
        ]
    )


class RouterPromptMiddleware(AgentMiddleware[Any, RunContext]):
    def __init__(self, topics: Sequence[str]) -> None:
        super().__init__()
        self.topics = list(topics)

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        ctx: RunContext = request.runtime.context
        prompt = classification_prompt(self.topics, ctx.services.agent)
        return await handler(request.override(system_message=SystemMessage(content=prompt)))


class StructuredOutputRetryMiddleware(AgentMiddleware[Any, RunContext]):
    """Asks again when the model's structured output does not validate, telling it what was
    wrong; after `attempts` answers, returns an empty answer marked `CLASSIFY_FAILED` in its
    metadata instead of raising (the router then escalates). LangChain retries structured
    output only with its tool strategy; the provider strategy raises on the first bad reply."""

    def __init__(self, attempts: int = CLASSIFY_ATTEMPTS) -> None:
        super().__init__()
        self.attempts = attempts

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        errors: list[str] = []
        current = request
        for attempt in range(1, self.attempts + 1):
            try:
                return await handler(current)
            except StructuredOutputValidationError as e:
                error = _validation_summary(e.source)
                errors.append(error)
                log.warning("classification attempt %d did not validate: %s", attempt, error)
                correction = HumanMessage(
                    content=f"Your answer did not match the required JSON schema: {error}. "
                    "Answer again with only a JSON object that matches the schema."
                )
                current = request.override(messages=[*request.messages, e.ai_message, correction])
        failed = AIMessage(
            content="", response_metadata={CLASSIFY_FAILED: f"{self.attempts} answers did not validate: {errors[-1]}"}
        )
        return ModelResponse(result=[failed])


CLASSIFY_FAILED = "fleetward_classification_failed"


def _validation_summary(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in error.errors()[:5]]
        return "; ".join(parts)
    if isinstance(error, json.JSONDecodeError):
        return f"not JSON ({error.msg})"
    return str(error)[:300]


# --- the graph state ---------------------------------------------------------------------------


class RouterState(AgentState):
    requester: NotRequired[dict[str, Any] | None]
    """The verified user of the request (handed on with every part)."""
    budget_stop: NotRequired[dict[str, Any] | None]
    analysis: NotRequired[dict[str, Any] | None]
    plan: NotRequired[list[dict[str, Any]] | None]


# --- routing (pure) ----------------------------------------------------------------------------


def plan_routes(
    analysis: QueryAnalysis,
    request_text: str,
    routes: dict[str, str],
    fallback_agent: str | None,
    human_queue: str,
    existing: Callable[[str], bool],
    guard: Callable[[str], tuple[str | None, str]],
) -> list[dict[str, Any]]:
    """One entry per topic: {topic, text, action: handoff|escalate, target topic or queue,
    via: specialist|fallback_agent|human, reason}. `existing(topic)` tells whether a request
    topic exists; `guard(text)` returns (text to send or None when blocked, why)."""
    texts = {p.topic: p.text for p in analysis.parts}
    plan: list[dict[str, Any]] = []
    for topic in analysis.all_topics:
        text, blocked = guard(texts.get(topic) or request_text)
        entry: dict[str, Any] = {"topic": topic}
        target = routes.get(topic)
        if text is None:
            plan.append({**entry, "action": "escalate", "via": "human", "queue": human_queue, "reason": blocked})
            continue
        entry["text"] = text
        if target and existing(target):
            plan.append({**entry, "action": "handoff", "via": "specialist", "requestTopic": target})
            continue
        why = (
            f"the specialist for topic {topic} is not deployed ({target} does not exist)"
            if target
            else f"no specialist handles topic {topic}"
        )
        if fallback_agent and not analysis.is_sensitive and existing(fallback_agent):
            plan.append(
                {**entry, "action": "handoff", "via": "fallback_agent", "requestTopic": fallback_agent, "reason": why}
            )
            continue
        if fallback_agent and analysis.is_sensitive:
            why += "; the request is sensitive, so it goes to people rather than the catch-all agent"
        plan.append({**entry, "action": "escalate", "via": "human", "queue": human_queue, "reason": why})
    return plan


def escalate_everything(request_text: str, queue: str, reason: str) -> list[dict[str, Any]]:
    entry = {"topic": "unclassified", "text": request_text, "action": "escalate", "via": "human"}
    return [{**entry, "queue": queue, "reason": reason}]


def wire_analysis(analysis: dict[str, Any], topic: str) -> dict[str, Any]:
    """The wire's QueryAnalysis (one intent, one topic) for the part of `topic`."""
    intent = analysis.get("intent") or "; ".join(analysis.get("intents") or [])  # a checkpoint of the old shape
    return {
        "intent": intent[:256],
        "urgency": analysis["urgency"],
        "tone": analysis["tone"],
        "topic": topic,
        "isSensitive": analysis["is_sensitive"],
    }


# --- Kafka: which specialists exist ------------------------------------------------------------


class TopicDirectory:
    """Which request topics exist, from the cluster's metadata (cached for `ttl` seconds).
    Listing all topics never creates one, whatever the broker's auto-create setting; with
    ACLs a principal sees the topics it may use, which are the ones it may hand off to."""

    def __init__(self, kafka_config: dict[str, str], ttl: float = 5.0) -> None:
        self.kafka_config = kafka_config
        self.ttl = ttl
        self._topics: set[str] = set()
        self._at = -1e9

    def _list(self) -> set[str]:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(dict(self.kafka_config))
        return set(admin.list_topics(timeout=10).topics)

    async def refresh(self, force: bool = False) -> set[str]:
        if force or time.monotonic() - self._at > self.ttl:
            self._topics = await asyncio.to_thread(self._list)
            self._at = time.monotonic()
        return self._topics


# --- the nodes ---------------------------------------------------------------------------------


class RouterNodes:
    def __init__(self, services: Services, topics: TopicDirectory | None, send: Any) -> None:
        self.services = services
        self.topics = topics
        self.send = send
        """async (topic, value, key, headers) -> None: produces a handoff command."""

    @property
    def config(self) -> Any:
        return self.services.config

    def human_queue(self) -> str:
        fallback = self.config.spec.fallback
        return (fallback.human_queue if fallback and fallback.human_queue else None) or DEFAULT_HUMAN_QUEUE

    async def route(self, state: RouterState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        ctx = runtime.context
        await ctx.before_step("route")
        request_text = next((m.text for m in state["messages"] if isinstance(m, HumanMessage)), "")
        structured = state.get("structured_response")
        last = state["messages"][-1] if state["messages"] else None
        failed = (last.response_metadata or {}).get(CLASSIFY_FAILED) if isinstance(last, AIMessage) else None
        stop = state.get("budget_stop")
        queue = self.human_queue()
        if stop:
            data = {"budget": stop["budget"], "limit": stop["limit"], "used": stop["used"]}
            await ctx.emit("budget_exceeded", "budget_exceeded", data)
            reason = f"The router stopped at its {stop['budget']} budget before classifying the request."
            return {"plan": escalate_everything(request_text, queue, reason), "analysis": None}
        if structured is None:
            reason = f"The request could not be classified ({failed or 'no classification'})."
            return {"plan": escalate_everything(request_text, queue, reason), "analysis": None}
        analysis = structured if isinstance(structured, QueryAnalysis) else QueryAnalysis.model_validate(structured)
        routes = dict(self.config.topics.routes)
        fallback_topic = routes.pop(FALLBACK_ROUTE, None)
        existing = await self.topics.refresh() if self.topics is not None else set(routes.values())
        if fallback_topic and self.topics is None:
            existing.add(fallback_topic)
        engine = self.services.guardrails

        def guard(text: str) -> tuple[str | None, str]:
            g = scan(engine, text, "output", self.services.agent)
            if g.allowed:
                return g.text, ""
            return None, f"a guardrail withheld this part ({g.verdict})"

        plan = plan_routes(analysis, request_text, routes, fallback_topic, queue, lambda t: t in existing, guard)
        dumped = analysis.model_dump()
        await ctx.emit(
            "classified",
            "status",
            {
                "state": "Active",
                "step": "classify",
                "detail": f"classified: topics {', '.join(analysis.all_topics)}; intent {analysis.intent}; "
                f"urgency {analysis.urgency}; tone {analysis.tone}; sensitive {str(analysis.is_sensitive).lower()}"[
                    :4000
                ],
            },
        )
        return {"plan": plan, "analysis": dumped}

    async def dispatch(self, state: RouterState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        ctx = runtime.context
        await ctx.before_step("dispatch")
        analysis = state.get("analysis")
        agent = self.services.agent
        namespace = agent.split("/", 1)[0]
        handed: list[str] = []
        escalated: list[str] = []
        for entry in state.get("plan") or []:
            topic = entry["topic"]
            if entry["action"] == "handoff":
                target_agent = self._agent_of(entry["requestTopic"], namespace)
                command = AgentCommand.new(
                    "handoff",
                    session_id=ctx.session_id,
                    agent=target_agent,
                    idempotency_key=f"handoff:{ctx.run_id}:{topic}",
                    trace_id=ctx.trace_id,
                    user=state.get("requester"),
                    data={
                        "fromAgent": agent,
                        "parentRunId": ctx.run_id,
                        "text": entry["text"],
                        "topic": topic,
                        "analysis": wire_analysis(analysis or {}, topic),
                    },
                )
                headers = {"traceparent": ctx.traceparent} if ctx.traceparent else {}
                await self.send(entry["requestTopic"], command.to_json(), ctx.session_id, headers)
                how = "" if entry["via"] == "specialist" else f" (fallback: {entry.get('reason')})"
                await ctx.emit(
                    f"handoff/{topic}",
                    "status",
                    {"state": "Active", "step": "handoff", "detail": f"topic {topic} handed to {target_agent}{how}"},
                )
                handed.append(f"{topic} -> {target_agent}")
            else:
                await ctx.emit(
                    f"escalated/{topic}",
                    "escalated",
                    {"queue": entry["queue"], "reason": entry["reason"], "topic": topic},
                )
                escalated.append(f"{topic} -> {entry['queue']}")
            ROUTER_HANDOFFS.labels(agent, topic if entry["via"] != "human" else "-", entry["via"]).inc()
        summary = "; ".join(
            part
            for part in (
                "handed off: " + ", ".join(handed) if handed else "",
                "escalated: " + ", ".join(escalated) if escalated else "",
            )
            if part
        )
        await ctx.emit(
            "routed", "status", {"state": "Active", "step": "dispatch", "detail": summary or "nothing to route"}
        )
        return {}

    def _agent_of(self, request_topic: str, namespace: str) -> str:
        """The agent (namespace/name) whose request topic this is, from the router's routes."""
        for topic, agent in (self.config.spec.routes or {}).items():
            if self.config.topics.routes.get(topic) == request_topic:
                return f"{namespace}/{agent}"
        fallback = self.config.spec.fallback
        if fallback and fallback.agent:
            return f"{namespace}/{fallback.agent}"
        raise ValueError(f"no route leads to {request_topic}")


def build_router(
    services: Services,
    model: Any,
    checkpointer: BaseCheckpointSaver,
    *,
    fallbacks: Sequence[Any] = (),
    topics: TopicDirectory | None,
    send: Any,
) -> Any:
    """The router graph (module docstring). `model` is the primary chat model, `fallbacks`
    those of `model.fallbacks` in order; `topics` tells which specialists exist (None: every
    routed topic is taken to exist); `send(topic, value, key, headers)` produces a handoff."""
    config = services.config
    endpoints = list(config.spec.model.fallbacks or [])
    if len(fallbacks) != len(endpoints):
        raise ValueError(f"{len(fallbacks)} fallback model(s) given for {len(endpoints)} in model.fallbacks")
    chain = list(zip(fallbacks, endpoints, strict=True))
    route_topics = sorted(t for t in config.topics.routes if t != FALLBACK_ROUTE)
    middleware: list[Any] = [
        StructuredOutputRetryMiddleware(),
        *run_budget_middleware(config.spec.budget),
        *model_failure_middleware((model, config.spec.model), chain, budget_of=services.retry_budgets),
        *([DailyTokenBudgetMiddleware()] if services.token_ledger is not None else []),
        ModelCallMiddleware(config.spec.model.name),
        RouterPromptMiddleware(route_topics),
    ]
    if config.guardrails:
        from fleetward.runtime.guardrails.middleware import pii_middleware

        middleware += pii_middleware(
            [g.spec for g in config.guardrails],
            names=[g.name for g in config.guardrails],
            hash_key=services.pii_hash_key,
        )
    classifier = create_agent(
        model,
        [],
        middleware=one_step_per_hook(middleware),
        response_format=ProviderStrategy(QueryAnalysis),
        context_schema=RunContext,
        name="classify",
    )
    nodes = RouterNodes(services, topics, send)
    graph = StateGraph(RouterState, context_schema=RunContext)
    graph.add_node("classify", classifier)
    graph.add_node("route", nodes.route)
    graph.add_node("dispatch", nodes.dispatch)
    graph.add_edge(START, "classify")
    graph.add_edge("classify", "route")
    graph.add_edge("route", "dispatch")
    graph.add_edge("dispatch", END)
    return graph.compile(checkpointer=checkpointer, name=f"router:{config.agent.ref}")
