"""Failure handling (runtime/resilience.py): circuit breakers, transient-error classification,
backoff with full jitter and Retry-After, the per-run retry budget, and the middleware.

Real components throughout: openai SDK exception objects built on real httpx2 responses (the
transport the openai SDK uses), LangChain's create_agent with its ModelFallbackMiddleware, and
the runtime's HttpTool + ToolCredentialsMiddleware calling a real local HTTP server. The only
stand-ins are the chat models (scripted fakes that raise) and an injected clock/sleep."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, ClassVar

import httpx
import httpx2
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetward.runtime.context import RunContext, RunStopped, StepGate
from fleetward.runtime.middleware.tool_credentials import ToolCredentialsMiddleware
from fleetward.runtime.resilience import (
    TOOL_CIRCUIT_STATE,
    CircuitOpenError,
    CircuitState,
    FailureKind,
    IdempotentToolRetryMiddleware,
    ResilientModelRetryMiddleware,
    RetryBudget,
    RetryBudgets,
    RetryPolicy,
    ToolCircuitBreaker,
    ToolCircuitBreakerMiddleware,
    ToolCircuitBreakers,
    classify_model_error,
    classify_tool_error,
    classify_tool_result,
    is_transient_model_error,
    is_transient_tool_error,
    model_failure_middleware,
    retry_after_seconds,
    retry_safe_tool_names,
    retry_unsafe_reason,
    tool_failure_middleware,
)
from fleetward.runtime.tools import HttpTool, ToolHttpClient
from langchain.agents import create_agent
from langchain.agents.middleware import ModelFallbackMiddleware, ModelRetryMiddleware, ToolCallRequest
from langchain.agents.middleware._retry import default_retry_on
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatResult
from langchain_core.tools import StructuredTool
from langchain_openai.chat_models.base import (
    OpenAIAPIError,
    OpenAIAuthenticationError,
    OpenAIInvalidRequestError,
    OpenAIRateLimitError,
    OpenAITimeoutError,
)
from prometheus_client import REGISTRY
from pydantic import Field

from fleetward.api.agent import CircuitBreaker, ModelEndpoint, Tool

URL = "http://model.test/v1/chat/completions"


# --- helpers -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSleep:
    def __init__(self, on_sleep: Any = None) -> None:
        self.delays: list[float] = []
        self.on_sleep = on_sleep

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep()


def gauge(agent: str, tool: str) -> float | None:
    return REGISTRY.get_sample_value(TOOL_CIRCUIT_STATE._name, {"agent": agent, "tool": tool})


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    """What the openai SDK raises for an HTTP error status (its _make_status_error mapping)."""
    response = httpx2.Response(status, request=httpx2.Request("POST", URL), headers=headers or {})
    classes: dict[int, type[openai.APIStatusError]] = {
        400: openai.BadRequestError,
        401: openai.AuthenticationError,
        403: openai.PermissionDeniedError,
        404: openai.NotFoundError,
        409: openai.ConflictError,
        422: openai.UnprocessableEntityError,
        429: openai.RateLimitError,
    }
    cls = classes.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
    return cls(f"Error code: {status}", response=response, body=None)


def breaker(tool: str = "lookup", *, agent: str, threshold: int = 3, reset: int = 30, probes: int = 1):
    clock = FakeClock()
    settings = CircuitBreaker(failure_threshold=threshold, reset_timeout_seconds=reset, half_open_requests=probes)
    return ToolCircuitBreaker(tool, settings, agent=agent, clock=clock), clock


def fail(b: ToolCircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        b.record_failure(b.acquire(), classify_model_error(status_error(503)))


def spec(name: str, *, mutating: bool, endpoint: str = "http://127.0.0.1:9/t", **extra: Any) -> Tool:
    return Tool.model_validate(
        {
            "name": name,
            "description": "A tool.",
            "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}},
            "endpoint": endpoint,
            "mutating": mutating,
            **extra,
        }
    )


def tool_request(tool: Any, name: str, context: Any = None, call_id: str = "call_1") -> ToolCallRequest:
    return ToolCallRequest(
        tool_call={"name": name, "args": {"q": "x"}, "id": call_id, "type": "tool_call"},
        tool=tool,
        state={"messages": []},
        runtime=SimpleNamespace(context=context),  # type: ignore[arg-type]
    )


def failed_message(name: str, status: int | None, error: str = "HTTP 503", call_id: str = "call_1") -> ToolMessage:
    """A failed call as ToolCredentialsMiddleware reports it (artifact with httpStatus)."""
    return ToolMessage(
        content=f"Tool call failed: {error}",
        tool_call_id=call_id,
        name=name,
        status="error",
        artifact={"ok": False, "durationMs": 3, "httpStatus": status, "replayed": False, "error": error},
    )


def ok_message(name: str, call_id: str = "call_1") -> ToolMessage:
    return ToolMessage(
        content='{"ok": true}',
        tool_call_id=call_id,
        name=name,
        artifact={"ok": True, "durationMs": 3, "httpStatus": 200, "replayed": False},
    )


# --- circuit breaker -----------------------------------------------------------------------------


def test_the_circuit_opens_after_the_threshold_of_consecutive_failures():
    b, _ = breaker(agent="t/opens", threshold=3)
    fail(b, 2)
    b.record_success(b.acquire())  # a success resets the count: failures must be consecutive
    fail(b, 2)
    assert b.state is CircuitState.CLOSED and b.consecutive_failures == 2
    fail(b)
    assert b.state is CircuitState.OPEN


def test_an_open_circuit_refuses_at_once_naming_the_tool_and_when_it_lets_calls_through():
    b, clock = breaker("issue_refund", agent="t/refuses", threshold=2, reset=30)
    fail(b, 2)
    with pytest.raises(CircuitOpenError) as refused:
        b.acquire()
    message = str(refused.value)
    assert "tool 'issue_refund'" in message and "opened after 2 consecutive failures" in message
    assert "(last: HTTP 503)" in message and "refused without contacting the tool" in message
    assert "again in 30 s" in message and refused.value.retry_in == 30
    clock.advance(10.5)
    with pytest.raises(CircuitOpenError, match="again in 20 s"):
        b.acquire()
    assert b.state is CircuitState.OPEN and b.retry_in() == pytest.approx(19.5)


def test_after_the_reset_timeout_only_the_configured_probes_go_through():
    b, clock = breaker(agent="t/probe", threshold=1, reset=30, probes=2)
    fail(b)
    clock.advance(30)
    first, second = b.acquire(), b.acquire()
    assert b.state is CircuitState.HALF_OPEN and first.probe and second.probe
    with pytest.raises(CircuitOpenError, match=r"half-open, 2 of 2 probe calls in flight") as refused:
        b.acquire()
    assert refused.value.state is CircuitState.HALF_OPEN and refused.value.retry_in is None
    b.release(first)  # a probe that ended without a verdict (cancelled) frees its slot
    assert b.acquire().probe


def test_the_circuit_closes_only_when_all_probes_succeeded():
    b, clock = breaker(agent="t/closes", threshold=1, reset=5, probes=2)
    fail(b)
    clock.advance(5)
    first, second = b.acquire(), b.acquire()
    b.record_success(first)
    assert b.state is CircuitState.HALF_OPEN
    b.record_success(second)
    assert b.state is CircuitState.CLOSED and b.consecutive_failures == 0
    assert not b.acquire().probe


def test_a_failed_probe_reopens_the_circuit_for_a_fresh_timeout():
    b, clock = breaker("search", agent="t/reopens", threshold=1, reset=20, probes=2)
    fail(b)
    clock.advance(25)
    first, second = b.acquire(), b.acquire()
    b.record_success(first)
    b.record_failure(second, classify_tool_error(httpx.ReadTimeout("slow")))
    assert b.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError, match=r"reopened after a failed probe call \(last: timeout\).*in 20 s"):
        b.acquire()
    clock.advance(20)
    assert b.acquire().probe


def test_outcomes_of_calls_from_before_a_transition_are_ignored():
    b, clock = breaker(agent="t/stale", threshold=1, reset=5)
    slow = b.acquire()  # started while closed, still running when the circuit opens
    fail(b)
    clock.advance(5)
    probe = b.acquire()
    b.record_failure(slow)  # late news from the closed period: must not reopen
    b.record_success(slow)  # nor close
    assert b.state is CircuitState.HALF_OPEN
    b.record_success(probe)
    assert b.state is CircuitState.CLOSED


def test_client_errors_mean_the_tool_works_and_calls_never_sent_give_no_verdict():
    b, _ = breaker(agent="t/verdicts", threshold=2)
    fail(b)
    b.record(b.acquire(), classify_tool_result(failed_message("lookup", 422, "HTTP 422")))
    assert b.consecutive_failures == 0  # the service answered: it is up
    fail(b)
    not_sent = ToolMessage(content="refused", tool_call_id="c", status="error", artifact={"ok": False, "durationMs": 0})
    b.record(b.acquire(), classify_tool_result(not_sent))
    assert b.consecutive_failures == 1 and b.state is CircuitState.CLOSED


def test_the_gauge_follows_the_state():
    agent = "t/gauge"
    b, clock = breaker("lookup", agent=agent, threshold=2, reset=10)
    assert gauge(agent, "lookup") == 0
    fail(b, 2)
    assert gauge(agent, "lookup") == 2
    clock.advance(10)
    probe = b.acquire()
    assert gauge(agent, "lookup") == 1
    b.record_failure(probe)
    assert gauge(agent, "lookup") == 2
    clock.advance(10)
    b.record_success(b.acquire())
    assert gauge(agent, "lookup") == 0


def test_breakers_are_built_per_tool_from_the_agent_spec():
    specs = [
        spec("lookup", mutating=False, circuitBreaker={"failureThreshold": 1, "resetTimeoutSeconds": 7}),
        spec("issue_refund", mutating=True),
    ]
    breakers = ToolCircuitBreakers("t/registry", specs, clock=FakeClock())
    assert len(breakers) == 2 and "lookup" in breakers and breakers.get("other") is None
    assert breakers["lookup"].settings.reset_timeout_seconds == 7
    assert breakers["issue_refund"].settings == CircuitBreaker()  # the API defaults: 5, 30 s, 1 probe
    assert gauge("t/registry", "lookup") == 0 and gauge("t/registry", "issue_refund") == 0


def test_concurrent_calls_in_half_open_let_exactly_the_probes_through():
    b, clock = breaker(agent="t/concurrent", threshold=1, reset=1, probes=2)
    fail(b)
    clock.advance(1)

    async def run() -> list[Any]:
        release = asyncio.Event()

        async def probe_call() -> str:
            await release.wait()
            return "ok"

        async def attempt() -> str:
            try:
                return await b.call(probe_call)
            except CircuitOpenError:
                return "refused"

        tasks = [asyncio.create_task(attempt()) for _ in range(5)]
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert sorted(results) == ["ok", "ok", "refused", "refused", "refused"]
    assert b.state is CircuitState.CLOSED


def test_the_breaker_middleware_refuses_without_calling_the_tool():
    specs = [spec("lookup", mutating=False, circuitBreaker={"failureThreshold": 2, "resetTimeoutSeconds": 60})]
    clock = FakeClock()
    middleware = ToolCircuitBreakerMiddleware(ToolCircuitBreakers("t/mw", specs, clock=clock))
    calls: list[str] = []

    async def failing(request: ToolCallRequest) -> ToolMessage:
        calls.append(request.tool_call["id"])
        return failed_message("lookup", 503, call_id=request.tool_call["id"])

    def errors() -> float:
        labels = {"agent": "t/mw", "tool": "lookup", "reason": "circuit_open"}
        return REGISTRY.get_sample_value("fleetward_tool_errors_total", labels) or 0.0

    async def run() -> ToolMessage:
        for i in range(2):
            await middleware.awrap_tool_call(tool_request(None, "lookup", call_id=f"c{i}"), failing)
        return await middleware.awrap_tool_call(tool_request(None, "lookup", call_id="c2"), failing)

    before = errors()
    refused = asyncio.run(run())
    assert calls == ["c0", "c1"]  # the third call never reached the tool
    assert refused.status == "error" and refused.tool_call_id == "c2"
    assert refused.content.startswith("Tool call failed: tool 'lookup' is unavailable")
    assert refused.artifact["circuit"] == "open" and refused.artifact["retryInSeconds"] == 60
    assert errors() == before + 1 and gauge("t/mw", "lookup") == 2


# --- classification ------------------------------------------------------------------------------

TRANSIENT_STATUSES = [429, 500, 502, 503, 504]
CLIENT_STATUSES = [400, 401, 403, 404, 409, 422]


@pytest.mark.parametrize("status", TRANSIENT_STATUSES)
def test_model_429_and_5xx_are_transient(status: int):
    exc = status_error(status)
    assert is_transient_model_error(exc) and classify_model_error(exc).status == status
    kinds = {429: FailureKind.RATE_LIMITED, 504: FailureKind.TIMEOUT}  # 504: the gateway timed out
    assert classify_model_error(exc).kind is kinds.get(status, FailureKind.SERVER_ERROR)


@pytest.mark.parametrize("status", CLIENT_STATUSES)
def test_model_client_errors_are_never_retried(status: int):
    exc = status_error(status)
    failure = classify_model_error(exc)
    assert not is_transient_model_error(exc) and failure.kind is FailureKind.CLIENT_ERROR


def test_model_timeouts_and_connection_errors_are_transient():
    request = httpx2.Request("POST", URL)
    assert classify_model_error(status_error(408)).kind is FailureKind.TIMEOUT  # request timeout (the SDK retries it)
    timeout, connection = openai.APITimeoutError(request=request), openai.APIConnectionError(request=request)
    assert classify_model_error(timeout).kind is FailureKind.TIMEOUT and is_transient_model_error(timeout)
    assert classify_model_error(connection).kind is FailureKind.CONNECTION and is_transient_model_error(connection)


def test_langchain_openai_reraised_errors_classify_like_the_sdk_ones():
    request = httpx2.Request("POST", URL)

    def response(status: int) -> httpx2.Response:
        return httpx2.Response(status, request=request, headers={"retry-after": "4"})

    assert classify_model_error(OpenAIRateLimitError("slow down", response=response(429), body=None)).retry_after == 4
    assert is_transient_model_error(OpenAIAPIError("boom", response=response(500), body=None))
    assert is_transient_model_error(OpenAITimeoutError(request))
    assert not is_transient_model_error(OpenAIInvalidRequestError("bad", response=response(400), body=None))
    assert not is_transient_model_error(OpenAIAuthenticationError("key", response=response(401), body=None))


def test_unclassified_errors_are_not_retried_unlike_the_library_default():
    bug = KeyError("messages")
    assert default_retry_on(bug)  # LangChain's default retries anything it cannot classify
    assert not is_transient_model_error(bug) and not is_transient_tool_error(bug)


@pytest.mark.parametrize("status", TRANSIENT_STATUSES)
def test_tool_429_and_5xx_are_transient(status: int):
    response = httpx.Response(status, request=httpx.Request("POST", "http://tools.test/t"))
    assert is_transient_tool_error(httpx.HTTPStatusError("x", request=response.request, response=response))
    assert classify_tool_result(failed_message("t", status)).transient


@pytest.mark.parametrize("status", CLIENT_STATUSES)
def test_tool_client_errors_are_not_transient(status: int):
    response = httpx.Response(status, request=httpx.Request("POST", "http://tools.test/t"))
    assert not is_transient_tool_error(httpx.HTTPStatusError("x", request=response.request, response=response))
    assert not classify_tool_result(failed_message("t", status, f"HTTP {status}")).transient


def test_tool_timeouts_and_connection_failures_are_transient():
    assert classify_tool_error(httpx.ReadTimeout("slow")).kind is FailureKind.TIMEOUT
    assert classify_tool_error(httpx.ConnectError("refused")).kind is FailureKind.CONNECTION
    timed_out = classify_tool_result(failed_message("t", None, "timed out after 30 s"))
    unreachable = classify_tool_result(failed_message("t", None, "could not reach the tool service: ConnectError"))
    assert timed_out.kind is FailureKind.TIMEOUT and timed_out.transient
    assert unreachable.kind is FailureKind.CONNECTION and unreachable.transient
    assert classify_tool_result(ok_message("t")) is None


# --- backoff and Retry-After ---------------------------------------------------------------------


def test_backoff_caps_grow_exponentially_up_to_max_delay():
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    assert [policy.backoff_cap(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.backoff_cap(10_000) == 4.0  # no overflow


def test_full_jitter_spreads_delays_over_zero_to_the_cap():
    rng = random.Random(7)
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0, rand=rng.random)
    for n in range(5):
        delays = [policy.delay(n) for _ in range(500)]
        cap = policy.backoff_cap(n)
        assert all(0.0 <= d <= cap for d in delays)
        assert min(delays) < 0.1 * cap and max(delays) > 0.9 * cap  # the whole range, not ±25 %
        assert len(set(delays)) == len(delays)
    assert RetryPolicy(rand=lambda: 0.0).delay(3) == 0.0
    assert RetryPolicy(base_delay=1.0, max_delay=8.0, rand=lambda: 0.5).delay(2) == 2.0


def test_retry_after_replaces_the_backoff_up_to_its_cap():
    policy = RetryPolicy(max_retry_after=30.0, rand=lambda: 0.99)
    assert policy.delay(0, retry_after=3.0) == 3.0  # honoured exactly, no jitter
    assert policy.delay(0, retry_after=0.0) == 0.0
    assert policy.delay(0, retry_after=31.0) is None  # longer than allowed: give up (default)
    assert RetryPolicy(max_retry_after=30.0, long_retry_after="wait_cap").delay(0, retry_after=600.0) == 30.0


def test_retry_after_headers_are_read_in_every_form():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "7"})) == 7.0
    assert retry_after_seconds(httpx2.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after_seconds(httpx.Headers({"Retry-After": date}), now=now.timestamp) == pytest.approx(90.0)
    assert retry_after_seconds(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({"Retry-After": "-3"})) == 0.0
    assert retry_after_seconds(httpx.Headers({})) is None and retry_after_seconds(None) is None
    assert classify_model_error(status_error(429, {"retry-after": "12"})).retry_after == 12.0


def test_invalid_policies_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="base_delay <= max_delay"):
        RetryPolicy(base_delay=10.0, max_delay=1.0)


# --- retry budget --------------------------------------------------------------------------------


def test_the_retry_budget_runs_out():
    budget = RetryBudget(2, run_id="run-1")
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend() and budget.exhausted
    assert (budget.spent, budget.remaining) == (2, 0)
    assert not RetryBudget(0).try_spend()


def test_budgets_are_kept_per_run_and_dropped_when_released_or_old():
    budgets = RetryBudgets(per_run=3, capacity=2)
    run_a = budgets(SimpleNamespace(run_id="a"))
    assert run_a is budgets.for_run("a") and run_a.limit == 3 and run_a.run_id == "a"
    assert budgets(SimpleNamespace()) is None
    run_a.try_spend()
    budgets.for_run("b")
    budgets.for_run("a")  # recently used: stays
    budgets.for_run("c")  # evicts b, the least recently used
    assert budgets.for_run("a").spent == 1 and budgets.for_run("b").spent == 0
    budgets.release("a")
    assert budgets.for_run("a").spent == 0


# --- model retries and fallbacks through a real LangChain agent ----------------------------------


class ScriptedModel(GenericFakeChatModel):
    """Raises the scripted exceptions in order, then answers `reply`; records its calls."""

    calls: ClassVar[list[str]] = []
    label: str = "model"
    failures: list[Any] = Field(default_factory=list)
    reply: str = "done"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        ScriptedModel.calls.append(self.label)
        if self.failures:
            raise self.failures.pop(0)
        self.messages = iter([AIMessage(f"{self.reply} by {self.label}")])
        return super()._generate(messages, *args, **kwargs)


def scripted(label: str, failures: list[Exception] | None = None) -> ScriptedModel:
    return ScriptedModel(label=label, failures=failures or [], messages=iter([]))


def endpoint(name: str, max_retries: int) -> ModelEndpoint:
    return ModelEndpoint.model_validate({"name": name, "baseURL": "http://127.0.0.1:1/v1", "maxRetries": max_retries})


def run_agent(middleware: list[Any], primary: ScriptedModel, context: Any = None) -> dict[str, Any]:
    agent = create_agent(primary, middleware=middleware)
    return asyncio.run(agent.ainvoke({"messages": [HumanMessage("hi")]}, context=context))


@pytest.fixture(autouse=True)
def _reset_calls() -> Iterator[None]:
    ScriptedModel.calls = []
    yield


def test_a_429_is_retried_after_its_retry_after_then_succeeds():
    primary = scripted("primary", [status_error(429, {"retry-after": "2"})])
    sleep = RecordingSleep()
    retry = ResilientModelRetryMiddleware(RetryPolicy(max_retries=2), sleep=sleep)
    out = run_agent([retry], primary)
    assert out["messages"][-1].content == "done by primary"
    assert ScriptedModel.calls == ["primary", "primary"] and sleep.delays == [2.0]


def test_the_sync_path_applies_the_same_policy():
    primary = scripted("primary", [status_error(500), status_error(429, {"retry-after-ms": "250"})])
    delays: list[float] = []
    retry = ResilientModelRetryMiddleware(RetryPolicy(max_retries=2, rand=lambda: 1.0), sync_sleep=delays.append)
    out = create_agent(primary, middleware=[retry]).invoke({"messages": [HumanMessage("hi")]})
    assert out["messages"][-1].content == "done by primary" and delays == [0.5, 0.25]


def test_a_400_is_not_retried_and_the_fallback_serves():
    primary = scripted("primary", [status_error(400)])
    fallback = scripted("fallback")
    sleep = RecordingSleep()
    middleware = model_failure_middleware(
        (primary, endpoint("primary", 2)), [(fallback, endpoint("fallback", 2))], sleep=sleep
    )
    assert isinstance(middleware[0], ModelFallbackMiddleware) and isinstance(middleware[1], ModelRetryMiddleware)
    out = run_agent(middleware, primary)
    assert ScriptedModel.calls == ["primary", "fallback"] and sleep.delays == []
    assert out["messages"][-1].content == "done by fallback"


def test_a_model_failing_for_good_is_retried_its_own_count_then_the_fallback_serves():
    primary = scripted("primary", [status_error(503) for _ in range(5)])
    fallback = scripted("fallback", [openai.APITimeoutError(request=httpx2.Request("POST", URL))])
    sleep = RecordingSleep()
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0, rand=lambda: 0.5)
    middleware = model_failure_middleware(
        (primary, endpoint("primary", 3)), [(fallback, endpoint("fallback", 1))], policy=policy, sleep=sleep
    )
    out = run_agent(middleware, primary)
    assert ScriptedModel.calls == ["primary"] * 4 + ["fallback"] * 2
    assert sleep.delays == [0.5, 1.0, 2.0, 0.5]  # full jitter at 0.5 of caps 1, 2, 4 (primary) and 1 (fallback)
    assert out["messages"][-1].content == "done by fallback"


def test_when_every_model_fails_the_last_error_propagates():
    primary = scripted("primary", [status_error(401)])
    fallback = scripted("fallback", [status_error(403)])
    middleware = model_failure_middleware(
        (primary, endpoint("primary", 2)), [(fallback, endpoint("fallback", 2))], sleep=RecordingSleep()
    )
    with pytest.raises(openai.PermissionDeniedError):
        run_agent(middleware, primary)
    assert ScriptedModel.calls == ["primary", "fallback"]


def test_the_run_retry_budget_stops_model_retries():
    budgets = RetryBudgets(per_run=1)
    context = SimpleNamespace(run_id="run-budget")
    primary = scripted("primary", [status_error(502), status_error(502), status_error(502)])
    retry = ResilientModelRetryMiddleware(RetryPolicy(max_retries=5), budget_of=budgets, sleep=RecordingSleep())
    with pytest.raises(openai.InternalServerError):
        run_agent([retry], primary, context=context)
    assert ScriptedModel.calls == ["primary", "primary"]  # one retry, then the budget was spent
    assert budgets.for_run("run-budget").exhausted


def test_no_model_is_called_after_the_run_is_stopped_during_a_backoff():
    gate = StepGate()
    services = SimpleNamespace(agent="t/stop")
    context = RunContext(run_id="run-stop", session_id="s", trace_id="0" * 32, services=services, gate=gate)  # type: ignore[arg-type]
    primary = scripted("primary", [status_error(503)])
    fallback = scripted("fallback")
    middleware = model_failure_middleware(
        (primary, endpoint("primary", 2)), [(fallback, endpoint("fallback", 2))], sleep=RecordingSleep(gate.stop.set)
    )
    with pytest.raises(RunStopped):
        run_agent(middleware, primary, context=context)
    assert ScriptedModel.calls == ["primary"]


# --- tool retries --------------------------------------------------------------------------------


def test_a_non_idempotent_tool_is_never_retried():
    refund = spec("issue_refund", mutating=True)
    plain = StructuredTool.from_function(lambda q: q, name="issue_refund", description="Refund.")
    assert retry_unsafe_reason(plain, refund) == "the tool changes state and its calls carry no idempotency key"
    assert retry_unsafe_reason(plain, None) is not None  # unknown tool: unknown safety
    assert retry_safe_tool_names([refund, spec("lookup", mutating=False)]) == ["lookup"]
    budgets = RetryBudgets(per_run=10)
    middleware = IdempotentToolRetryMiddleware(
        RetryPolicy(max_retries=3), specs=[refund], budget_of=budgets, sleep=RecordingSleep()
    )
    calls: list[int] = []

    async def flaky(request: ToolCallRequest) -> ToolMessage:
        calls.append(1)
        return failed_message("issue_refund", 503)

    result = asyncio.run(
        middleware.awrap_tool_call(tool_request(plain, "issue_refund", SimpleNamespace(run_id="r")), flaky)
    )
    assert calls == [1] and result.status == "error"
    assert result.content == (
        "Tool call failed: HTTP 503 (not retried: the tool changes state and its calls carry no idempotency key)"
    )
    assert budgets.for_run("r").spent == 0


def test_an_idempotent_tool_is_retried_for_transient_failures_only():
    lookup = spec("lookup", mutating=False)
    plain = StructuredTool.from_function(lambda q: q, name="lookup", description="Look up.")
    sleep = RecordingSleep()
    middleware = IdempotentToolRetryMiddleware(
        RetryPolicy(max_retries=3, rand=lambda: 1.0), specs=[lookup], sleep=sleep
    )
    script = [
        failed_message("lookup", None, "timed out after 30 s"),
        failed_message("lookup", 429),
        ok_message("lookup"),
    ]

    async def handler(request: ToolCallRequest) -> ToolMessage:
        return script.pop(0)

    result = asyncio.run(middleware.awrap_tool_call(tool_request(plain, "lookup"), handler))
    assert result.status == "success" and result.artifact["attempts"] == 3 and sleep.delays == [0.5, 1.0]

    script[:] = [failed_message("lookup", 404, "HTTP 404"), ok_message("lookup")]
    result = asyncio.run(middleware.awrap_tool_call(tool_request(plain, "lookup"), handler))
    assert result.artifact["httpStatus"] == 404 and len(script) == 1  # a client error is not retried


def test_tool_retries_stop_at_the_run_budget_shared_with_the_model():
    lookup = spec("lookup", mutating=False)
    budgets = RetryBudgets(per_run=2)
    budgets.for_run("r").try_spend()  # a model retry of the same run already took one
    middleware = IdempotentToolRetryMiddleware(
        RetryPolicy(max_retries=5), specs=[lookup], budget_of=budgets, sleep=RecordingSleep()
    )
    calls: list[int] = []

    async def down(request: ToolCallRequest) -> ToolMessage:
        calls.append(1)
        return failed_message("lookup", 500, "HTTP 500")

    result = asyncio.run(middleware.awrap_tool_call(tool_request(None, "lookup", SimpleNamespace(run_id="r")), down))
    assert len(calls) == 2 and result.artifact["attempts"] == 2
    assert result.content.endswith("(not retried: the run's retry budget of 2 is used up)")


# --- end to end with the runtime's HttpTool and ToolCredentialsMiddleware -----------------------


class ScriptedToolService:
    """A real HTTP server answering with scripted statuses; records the headers it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.seen: list[dict[str, str]] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                service.seen.append(dict(self.headers))
                status = service.statuses.pop(0) if service.statuses else 200
                body = json.dumps({"ok": True} if status < 400 else {"error": "unavailable"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tools/issue_refund"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def runtime_context(agent: str, run_id: str) -> Any:
    services = SimpleNamespace(
        agent=agent,
        signing_key=SimpleNamespace(private_key=Ed25519PrivateKey.generate(), key_id="k1"),
        config=SimpleNamespace(installation=SimpleNamespace(id="fleetward-test")),
        audit=None,
    )
    return RunContext(run_id=run_id, session_id="s", trace_id="0" * 32, services=services, gate=StepGate())  # type: ignore[arg-type]


def run_chain(middleware: list[Any], tool: HttpTool, context: Any, call_id: str = "call_1") -> Any:
    async def execute(request: ToolCallRequest) -> Any:
        return await request.tool.ainvoke(dict(request.tool_call))

    async def run() -> Any:
        handler = execute
        for layer in reversed(middleware):
            handler = (lambda m, inner: lambda r: m.awrap_tool_call(r, inner))(layer, handler)
        try:
            return await handler(tool_request(tool, tool.name, context, call_id))
        finally:
            await tool.client.close()

    return asyncio.run(run())


def test_a_keyed_mutating_call_is_retried_with_the_same_key_and_a_fresh_token():
    service = ScriptedToolService([503, 502])
    try:
        refund = spec("issue_refund", mutating=True, endpoint=service.url)
        tool = HttpTool(refund, ToolHttpClient())
        layers = tool_failure_middleware(
            "t/e2e", [refund], budget_of=RetryBudgets(), policy=RetryPolicy(rand=lambda: 0.0), sleep=RecordingSleep()
        )
        result = run_chain([*layers, ToolCredentialsMiddleware()], tool, runtime_context("t/e2e", "run-e2e"))
    finally:
        service.close()
    assert result.status == "success" and result.artifact["ok"] and result.artifact["attempts"] == 3
    keys = {h["Idempotency-Key"] for h in service.seen}
    tokens = {h["Authorization"] for h in service.seen}
    assert len(service.seen) == 3 and len(keys) == 1 and len(tokens) == 3
    assert gauge("t/e2e", "issue_refund") == 0


def test_the_circuit_opens_on_real_tool_failures_and_refuses_the_next_call():
    service = ScriptedToolService([500, 500, 500])
    try:
        lookup = spec(
            "issue_refund",
            mutating=False,
            endpoint=service.url,
            circuitBreaker={"failureThreshold": 2, "resetTimeoutSeconds": 30},
        )
        tool = HttpTool(lookup, ToolHttpClient())
        layers = tool_failure_middleware(
            "t/e2e-open", [lookup], budget_of=RetryBudgets(), policy=RetryPolicy(max_retries=4), sleep=RecordingSleep()
        )
        result = run_chain([*layers, ToolCredentialsMiddleware()], tool, runtime_context("t/e2e-open", "run-open"))
    finally:
        service.close()
    # Two 500s opened the circuit; the third attempt was refused by it and not retried further.
    assert len(service.seen) == 2 and result.status == "error"
    assert result.artifact["circuit"] == "open" and result.artifact["attempts"] == 3
    assert "tool 'issue_refund' is unavailable" in result.content
    assert gauge("t/e2e-open", "issue_refund") == 2
