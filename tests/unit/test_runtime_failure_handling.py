"""Failure handling wired into the specialist runtime (SPEC §4 "Failure handling"): the
chat models and the middleware chain the runtime builds, a backoff wait that never holds
up a halt or a stop, the failure trail, and a run that fails for good: the degradation
message, `failed`, and the dead letter with the run's history.

Real pieces where they are cheap (the ledger on SQLite, the LangChain middleware, the step
gate); the graph of the executor test is a scripted stand-in that raises."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
import pytest
from fleetward.runtime.context import RunContext, RunStopped, Services, StepGate
from fleetward.runtime.graphs.specialist import chat_models, specialist_middleware
from fleetward.runtime.intake import dead_letter
from fleetward.runtime.persistence import RUN_FAILED, open_persistence
from fleetward.runtime.resilience import (
    IdempotentToolRetryMiddleware,
    ResilientModelRetryMiddleware,
    RetryBudgets,
    RetryPolicy,
    ToolCircuitBreakerMiddleware,
)
from fleetward.runtime.runs import (
    DEGRADED_REPLY,
    HISTORY_TEXT_CHARS,
    Delivery,
    Outcome,
    RunExecutor,
    RunRegistry,
    failure_reason,
    message_record,
)
from fleetward.runtime.tools import HttpTool, ToolHttpClient
from langchain.agents.middleware import ModelFallbackMiddleware
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from fleetward.api.envelopes import AgentCommand
from fleetward.api.runtimeconfig import RuntimeConfig

URL = "http://127.0.0.1:1/v1/chat/completions"


def config(**model: Any) -> RuntimeConfig:
    return RuntimeConfig.model_validate(
        {
            "installation": {"namespace": "fleetward-system", "trustBundle": {"namespace": "fleetward-system"}},
            "agent": {"namespace": "ns", "name": "billing"},
            "spec": {
                "role": "specialist",
                "model": {"name": "primary", "baseURL": "http://127.0.0.1:1/v1", "maxRetries": 3, **model},
                "tools": [
                    {
                        "name": "lookup",
                        "description": "Look up.",
                        "inputSchema": {"type": "object"},
                        "endpoint": "http://127.0.0.1:9/lookup",
                    }
                ],
            },
            "topics": {"request": "fleetward.requests.ns.billing"},
            "kafka": {"bootstrapServers": "127.0.0.1:9092", "consumerGroup": "g"},
            "credentials": {"signingKeyFile": "/k", "keyId": "kid"},
        }
    )


def status_error(status: int) -> openai.APIStatusError:
    response = httpx2.Response(status, request=httpx2.Request("POST", URL))
    cls = {400: openai.BadRequestError, 429: openai.RateLimitError}.get(status, openai.InternalServerError)
    return cls(f"Error code: {status}", response=response, body=None)


def run_context(gate: StepGate | None = None, run_id: str = "run-1") -> RunContext:
    services = SimpleNamespace(agent="ns/billing")
    return RunContext(run_id=run_id, session_id="s-1", trace_id="0" * 32, services=services, gate=gate or StepGate())  # type: ignore[arg-type]


# --- the chat models and the chain -------------------------------------------------------------


def test_every_model_of_the_chain_gets_its_own_key_and_the_sdk_never_retries():
    cfg = config(
        fallbacks=[
            {"name": "backup", "baseURL": "http://127.0.0.1:2/v1", "maxRetries": 1},
            {"name": "last", "baseURL": "http://127.0.0.1:3/v1", "maxRetries": 0},
        ]
    )
    keys = {0: "sk-primary", 1: "sk-backup", 2: None}
    models = chat_models(cfg, lambda _config, index: keys[index])
    assert [(m.model_name, e.name) for m, e in models] == [
        ("primary", "primary"),
        ("backup", "backup"),
        ("last", "last"),
    ]
    assert [m.openai_api_key.get_secret_value() for m, _ in models] == ["sk-primary", "sk-backup", "unused"]
    assert [m.max_retries for m, _ in models] == [0, 0, 0]
    assert [e.max_retries for _, e in models] == [3, 1, 0]  # applied by our middleware instead
    assert [str(m.openai_api_base) for m, _ in models] == [
        "http://127.0.0.1:1/v1",
        "http://127.0.0.1:2/v1",
        "http://127.0.0.1:3/v1",
    ]


def services_for(cfg: RuntimeConfig, budgets: RetryBudgets | None = None) -> Services:
    return Services(
        config=cfg,
        events=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        signing_key=None,  # type: ignore[arg-type]
        guardrails=None,
        retriever=None,  # type: ignore[arg-type]
        prices={},
        retry_budgets=budgets,
    )


def test_the_fallbacks_and_retries_wrap_each_model_attempt_and_the_tool_retries_each_fresh_token():
    cfg = config(fallbacks=[{"name": "backup", "baseURL": "http://127.0.0.1:2/v1", "maxRetries": 1}])
    (primary, _), (backup, _) = chat_models(cfg, lambda _c, _i: None)
    budgets = RetryBudgets()
    tools = [HttpTool(t, ToolHttpClient()) for t in cfg.spec.tools or []]
    chain = specialist_middleware(services_for(cfg, budgets), primary, tools, fallbacks=[backup])
    names = [type(m).__name__ for m in chain]
    assert names == [
        "SopRetrievalMiddleware",
        "ModelFallbackMiddleware",
        "ResilientModelRetryMiddleware",
        "ModelCallMiddleware",
        "SopPromptMiddleware",
        "ToolEventsMiddleware",
        "SopGateMiddleware",
        "GuardrailMiddleware",
        "IdempotentToolRetryMiddleware",
        "ToolCircuitBreakerMiddleware",
        "ToolCredentialsMiddleware",
        "RespondMiddleware",
        "DraftReviewMiddleware",
    ]
    fallback = next(m for m in chain if isinstance(m, ModelFallbackMiddleware))
    assert fallback.models == [backup]
    retry = next(m for m in chain if isinstance(m, ResilientModelRetryMiddleware))
    assert retry.max_retries_for(primary) == 3 and retry.max_retries_for(backup) == 1
    assert retry.budget_of is budgets
    assert next(m for m in chain if isinstance(m, IdempotentToolRetryMiddleware)).budget_of is budgets
    breakers = next(m for m in chain if isinstance(m, ToolCircuitBreakerMiddleware)).breakers
    assert "lookup" in breakers and breakers["lookup"].settings.failure_threshold == 5


def test_without_fallbacks_there_is_no_fallback_middleware_and_a_mismatch_is_refused():
    cfg = config()
    [(primary, _)] = chat_models(cfg, lambda _c, _i: None)
    chain = specialist_middleware(services_for(cfg), primary, [])
    assert not [m for m in chain if isinstance(m, ModelFallbackMiddleware)]
    with pytest.raises(ValueError, match="1 fallback model"):
        specialist_middleware(services_for(cfg), primary, [], fallbacks=[primary])


# --- backoff, halt and stop ------------------------------------------------------------------------


def test_a_halt_during_a_backoff_parks_the_run_at_once_and_the_rest_is_waited_after_resume():
    async def scenario() -> tuple[float, float, float]:
        gate = StepGate()
        ctx = run_context(gate)
        ctx.current_step = "model"
        started = time.monotonic()
        wait = asyncio.create_task(ctx.backoff(0.6))
        await asyncio.sleep(0.05)
        gate.halt()
        await asyncio.wait_for(ctx.parked_event.wait(), 0.2)  # parked long before the 0.6 s are up
        parked_after = time.monotonic() - started
        assert ctx.parked and not wait.done() and ctx.current_step == "model"
        await asyncio.sleep(0.15)
        gate.resume()
        resumed_at = time.monotonic() - started
        await asyncio.wait_for(wait, 2)
        return parked_after, resumed_at, time.monotonic() - started

    parked_after, resumed_at, total = asyncio.run(scenario())
    assert parked_after < 0.15
    assert total >= 0.55 and total - resumed_at >= 0.3  # what was left of the backoff, waited after resume


def test_a_halt_longer_than_the_backoff_retries_at_once_after_resume():
    async def scenario() -> float:
        gate = StepGate()
        ctx = run_context(gate)
        wait = asyncio.create_task(ctx.backoff(0.2))
        await asyncio.sleep(0.02)
        gate.halt()
        await asyncio.sleep(0.4)
        gate.resume()
        resumed = time.monotonic()
        await asyncio.wait_for(wait, 1)
        return time.monotonic() - resumed

    assert asyncio.run(scenario()) < 0.05


def test_a_stop_during_a_backoff_ends_it_at_once():
    async def scenario() -> float:
        gate = StepGate()
        ctx = run_context(gate)
        wait = asyncio.create_task(ctx.backoff(30))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        gate.stop.set()
        with pytest.raises(RunStopped):
            await asyncio.wait_for(wait, 1)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.1


def test_a_stop_while_parked_in_a_backoff_ends_it():
    async def scenario() -> None:
        gate = StepGate()
        ctx = run_context(gate)
        wait = asyncio.create_task(ctx.backoff(30))
        await asyncio.sleep(0.02)
        gate.halt()
        await asyncio.wait_for(ctx.parked_event.wait(), 0.5)
        gate.stop.set()
        with pytest.raises(RunStopped):
            await asyncio.wait_for(wait, 1)

    asyncio.run(scenario())


def test_the_registry_halts_and_resumes_gates_through_the_halted_event():
    registry = RunRegistry()
    ctx = run_context(registry.new_gate())
    registry.active[ctx.run_id] = ctx
    registry.halt()
    assert ctx.gate.halted.is_set() and not ctx.gate.resumed.is_set()
    late = registry.new_gate()  # a run started while halted
    assert late.halted.is_set() and not late.resumed.is_set()
    registry.resume()
    assert not ctx.gate.halted.is_set() and ctx.gate.resumed.is_set()


class RequestStub(SimpleNamespace):
    pass


def test_a_model_retry_waits_through_the_run_context_and_is_not_sent_while_halted():
    """The retry middleware's backoff is the run's: halted during it, no attempt is made
    until resume, and the trail records the failed attempt."""

    async def scenario() -> tuple[list[float], RunContext]:
        gate = StepGate()
        ctx = run_context(gate)
        calls: list[float] = []
        started = time.monotonic()

        async def handler(_request: Any) -> str:
            calls.append(time.monotonic() - started)
            if len(calls) == 1:
                raise status_error(503)
            return "answered"

        retry = ResilientModelRetryMiddleware(RetryPolicy(max_retries=2, base_delay=0.4, rand=lambda: 1.0))
        request = RequestStub(model=SimpleNamespace(model_name="primary"), runtime=SimpleNamespace(context=ctx))
        call = asyncio.create_task(retry.awrap_model_call(request, handler))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        gate.halt()
        await asyncio.wait_for(ctx.parked_event.wait(), 0.2)
        await asyncio.sleep(0.6)  # longer than the backoff: still no second attempt while halted
        assert len(calls) == 1
        gate.resume()
        assert await asyncio.wait_for(call, 2) == "answered"
        return calls, ctx

    calls, ctx = asyncio.run(scenario())
    assert len(calls) == 2 and calls[1] >= 0.6
    assert ctx.failures == [
        {
            "call": "model",
            "model": "primary",
            "attempt": 1,
            "failure": "server_error",
            "status": 503,
            "error": "InternalServerError",
            "then": "retried after 0.40 s",
        }
    ]


# --- a run that fails for good -------------------------------------------------------------------------


def test_the_reason_says_what_failed_without_error_text():
    trail = [
        {"call": "model", "model": "primary", "failure": "server_error", "status": 503},
        {"call": "tool", "tool": "lookup", "failure": "timeout"},
        {"call": "model", "model": "backup", "failure": "server_error", "status": 503},
    ]
    reason = failure_reason(status_error(503), trail)
    assert reason == (
        "No model could answer: primary, backup failed (last error: HTTP 503). "
        "The request was passed on to the dead-letter topic."
    )
    assert failure_reason(KeyError("secret user text"), trail, dead_lettered=False) == (
        "The run failed with an unexpected error (KeyError)."
    )


def test_history_messages_are_cut_and_name_tool_calls():
    ai = AIMessage(content="", tool_calls=[{"id": "c1", "name": "lookup", "args": {"q": "x"}}])
    tool = ToolMessage(content="x" * (HISTORY_TEXT_CHARS + 10), tool_call_id="c1", name="lookup", status="error")
    assert message_record(HumanMessage("hello")) == {"role": "human", "text": "hello"}
    assert message_record(ai) == {"role": "ai", "text": "", "toolCalls": [{"id": "c1", "name": "lookup"}]}
    record = message_record(tool)
    assert record["text"].endswith("[cut: 10 more characters]") and len(record["text"]) < HISTORY_TEXT_CHARS + 40
    assert (record["toolCallId"], record["name"], record["status"]) == ("c1", "lookup", "error")


class KafkaRecord:
    def __init__(self, value: bytes, key: bytes = b"s-1") -> None:
        self._value, self._key = value, key

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key

    def topic(self) -> str:
        return "fleetward.requests.ns.billing"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41


def test_the_dead_letter_of_a_failed_run_carries_its_history_and_says_its_kind():
    value, headers = dead_letter(KafkaRecord(b'{"x": 1}'), "No model could answer", "ns/billing", {"runId": "r"})
    body = json.loads(value)
    assert body["history"] == {"runId": "r"} and body["value"] == '{"x": 1}' and body["offset"] == 41
    assert headers["fleetward-dlq-kind"] == "run_failed" and headers["fleetward-dlq-reason"] == "No model could answer"
    value, headers = dead_letter(KafkaRecord(b"bad"), "Invalid JSON", "ns/billing")
    assert "history" not in json.loads(value) and headers["fleetward-dlq-kind"] == "rejected"


class RecordingEvents:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    async def emit(self, key: str, type: str, *, data: Any, **_: Any) -> None:
        self.sent.append((key.split("/", 1)[1], type, dict(data)))


class FailingGraph:
    """Stands in for the compiled graph: the model chain is exhausted mid-run."""

    def __init__(self, error: Exception, ctx_failures: list[dict[str, Any]]) -> None:
        self.error = error
        self.ctx_failures = ctx_failures
        self.messages: list[Any] = []

    async def aget_state(self, _config: Any) -> Any:
        if not self.messages:  # no checkpoint yet
            return SimpleNamespace(values={}, interrupts=(), next=())
        return SimpleNamespace(values={"messages": self.messages, "sop": {"name": "refunds", "version": "1.0.0"}})

    async def astream(self, graph_input: Any, _config: Any, *, context: RunContext, **_: Any) -> Any:
        self.messages = list(graph_input["messages"])
        context.current_step = "model"
        budget = context.services.retry_budgets.for_run(context.run_id)  # type: ignore[union-attr]
        for entry in self.ctx_failures:
            context.note_failure(entry)
            budget.try_spend()
        raise self.error
        yield  # an async generator


def test_a_run_that_fails_for_good_degrades_gracefully_and_is_dead_lettered_with_its_history(tmp_path: Path):
    trail = [
        {
            "call": "model",
            "model": "primary",
            "attempt": 1,
            "failure": "server_error",
            "status": 503,
            "then": "gave up",
        },
        {"call": "model", "model": "backup", "attempt": 1, "failure": "server_error", "status": 503, "then": "gave up"},
    ]

    async def scenario() -> tuple[Outcome, RecordingEvents, list[Any], Any, RetryBudgets]:
        async with open_persistence(None, str(tmp_path / "state.db")) as persistence:
            events = RecordingEvents()
            budgets = RetryBudgets()
            services = Services(
                config=config(),
                events=events,  # type: ignore[arg-type]
                ledger=persistence.ledger,
                signing_key=None,  # type: ignore[arg-type]
                guardrails=None,
                retriever=None,  # type: ignore[arg-type]
                prices={},
                retry_budgets=budgets,
            )
            letters: list[Any] = []

            async def sink(delivery: Delivery, reason: str, history: dict[str, Any]) -> None:
                run = await persistence.ledger.get_run(history["runId"])
                letters.append((delivery, reason, history, run.status if run else None))

            executor = RunExecutor(services, FailingGraph(status_error(503), trail), RunRegistry(), dead_letter=sink)
            command = AgentCommand.new(
                "user_message",
                session_id="s-1",
                agent="ns/billing",
                idempotency_key="idem-1",
                user={"sub": "jdoe@example.test", "role": "user"},
                data={"text": "refund txn_1002 please"},
            )
            outcome = await executor.handle(Delivery(command, source="record"))
            run_id = letters[0][2]["runId"]
            run = await persistence.ledger.get_run(run_id)
            again = await executor.handle(Delivery(command, source="record"))  # redelivered: served once
            return outcome, events, letters, (run, again), budgets

    outcome, events, letters, (run, again), budgets = asyncio.run(scenario())
    assert outcome is Outcome.FAILED and again is Outcome.DUPLICATE
    assert [(key, type_) for key, type_, _ in events.sent] == [
        ("start", "status"),
        ("degraded", "message"),
        ("failed", "failed"),
    ]
    message, failed = events.sent[1][2], events.sent[2][2]
    assert message == {"role": "assistant", "text": DEGRADED_REPLY}
    assert "can't answer your request right now" in DEGRADED_REPLY and "passed on" in DEGRADED_REPLY
    assert failed["error"] == "InternalServerError" and "primary, backup failed" in failed["reason"]
    [(delivery, reason, history, status_at_dead_letter)] = letters
    assert delivery.source == "record" and reason == failed["reason"]
    assert status_at_dead_letter != RUN_FAILED  # the dead letter goes out before the run is closed
    assert run.status == RUN_FAILED
    assert history["attempts"] == trail and history["step"] == "model" and history["sessionId"] == "s-1"
    assert history["error"] == {"type": "InternalServerError", "kind": "server_error", "status": 503}
    assert history["sop"] == {"name": "refunds", "version": "1.0.0"}
    assert history["messages"] == [{"role": "human", "text": "refund txn_1002 please"}]
    assert budgets.for_run(history["runId"]).spent == 0  # the run's budget (2 spent) was released at its end


def test_reviewed_tools_get_their_middleware_only_when_a_tool_needs_a_reviewer():
    """Every hook is a graph node (a checkpoint write per model call): an Agent without any
    tool that needs approval gets neither the reviewed-tools nor the escalation middleware."""
    cfg = config()
    (primary, _) = chat_models(cfg, lambda _c, _i: None)[0]
    tools = [HttpTool(t, ToolHttpClient()) for t in cfg.spec.tools or []]
    plain = [type(m).__name__ for m in specialist_middleware(services_for(cfg), primary, tools)]
    assert "ReviewedToolsMiddleware" not in plain and "ReviewEscalationMiddleware" not in plain
    assert "DraftReviewMiddleware" in plain
    spec = cfg.spec.model_copy(
        update={"tools": [t.model_copy(update={"requires_approval": True}) for t in cfg.spec.tools or []]}
    )
    reviewed_cfg = cfg.model_copy(update={"spec": spec})
    reviewed = [type(m).__name__ for m in specialist_middleware(services_for(reviewed_cfg), primary, tools)]
    assert reviewed.index("SopGateMiddleware") < reviewed.index("ReviewedToolsMiddleware")
    assert reviewed.index("ReviewedToolsMiddleware") < reviewed.index("GuardrailMiddleware")
    assert reviewed[-1] == "ReviewEscalationMiddleware"
