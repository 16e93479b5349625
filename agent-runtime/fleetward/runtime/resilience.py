"""Failure handling of the agent runtime (SPEC §4 "Failure handling"): which errors are
transient, backoff with full jitter and Retry-After, a retry budget per run, per-tool
circuit breakers, and the middleware that applies them to model and tool calls.

What comes from LangChain (1.4.7) and what is ours:

- Model retries build on `ModelRetryMiddleware`: `ResilientModelRetryMiddleware` subclasses
  it (same constructor knobs: `retry_on`, `on_failure`, `max_retries`, delays; its
  `on_failure` handling) and replaces the retry loop, because the library's `calculate_delay`
  has ±25 % jitter rather than full jitter, ignores Retry-After, and the loop knows no per-run
  budget, no per-model retry count and no step gate (halt/stop). Its default
  `retry_on` retries every exception it cannot classify (a 422, a bug in a middleware);
  ours, `is_transient_model_error`, retries timeouts, connection errors, 429 and 5xx only.
- The fallback chain is LangChain's `ModelFallbackMiddleware`, unchanged; placed outside the
  retry middleware, so each model of the chain gets its own retries (`ModelEndpoint.maxRetries`
  is "retries ... before moving to the next fallback"). See `model_failure_middleware`.
- Tool retries are ours (`IdempotentToolRetryMiddleware`), not `ToolRetryMiddleware`: that
  middleware retries raised exceptions only, and the runtime's `HttpTool` never raises for a
  failed call (`handle_tool_error=True` turns it into an error ToolMessage, which
  `ToolCredentialsMiddleware` annotates with the HTTP status); it also cannot tell whether
  repeating a call is safe (idempotent or idempotency-keyed), nor honour Retry-After or the
  run's budget. For tools that do raise, `is_transient_tool_error` and
  `retry_safe_tool_names` are the `retry_on` and `tools` arguments `ToolRetryMiddleware` takes.
- Circuit breakers and the per-run retry budget are ours: LangChain 1.4.7 has neither.
  (`ToolCallLimitMiddleware` / `ModelCallLimitMiddleware` cap calls per run or thread; they
  count calls, not retries, and are the tool for `maxToolCallsPerRun`, not for this.)

Wiring (graphs/specialist.py): `model_failure_middleware` outside the model-call span (each
attempt is its own span), `tool_failure_middleware` right outside `ToolCredentialsMiddleware`;
the per-run budgets are `Services.retry_budgets`, released by the executor when a run ends.
Every backoff wait goes through the run's `RunContext.backoff`, so a halt ends it at once
(the run parks between the two attempts) and a stop raises there. Failed attempts are noted
on the run context (`RunContext.note_failure`) for the dead-letter record of a run that
fails for good. The circuit state gauge is `telemetry.TOOL_CIRCUIT_STATE`.

Concurrency: the runtime is asyncio; breaker and budget state change only in short
synchronous sections (no `await` inside), so coroutines cannot interleave within a
transition. A `threading.Lock` guards the same sections for callers on other threads.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
import httpx2
import openai
from fleetward.runtime.context import RunStopped
from fleetward.runtime.telemetry import TOOL_CIRCUIT_STATE, TOOL_ERRORS
from fleetward.runtime.tools import HttpTool
from langchain.agents.middleware import AgentMiddleware, ModelFallbackMiddleware, ModelRetryMiddleware
from langchain_core.exceptions import (
    ModelAPIError,
    ModelConnectionError,
    ModelError,
    ModelRateLimitError,
    ModelTimeoutError,
)
from langchain_core.messages import ToolMessage
from langgraph.errors import GraphBubbleUp
from langgraph.types import Command
from prometheus_client import Gauge

from fleetward.api.agent import CircuitBreaker as CircuitBreakerSpec
from fleetward.api.agent import ModelEndpoint
from fleetward.api.agent import Tool as ToolSpec

if TYPE_CHECKING:
    from langchain.agents.middleware import ModelRequest, ModelResponse, ToolCallRequest
    from langchain.agents.middleware._retry import OnFailure, RetryOn
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.tools import BaseTool

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
"""Monotonic seconds; `time.monotonic` unless a test injects its own."""
AsyncSleep = Callable[[float], Awaitable[None]]
BudgetOf = Callable[[Any], "RetryBudget | None"]
"""The retry budget of the run a model or tool call belongs to, from the LangGraph runtime
context (`RunContext` in the runtime); None: no per-run budget, only per-call limits."""

# --- Classification ----------------------------------------------------------------------------


class FailureKind(StrEnum):
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    CLIENT_ERROR = "client_error"
    NOT_SENT = "not_sent"
    """The call never reached the tool service (no credentials, audit record refused)."""
    CIRCUIT_OPEN = "circuit_open"
    OTHER = "other"


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    transient: bool
    """Whether repeating the same call may succeed."""
    status: int | None = None
    retry_after: float | None = None
    """Seconds the server asked us to wait (Retry-After), when it did."""

    def describe(self) -> str:
        """Kind and status only: never text from a response (it may carry user data)."""
        return f"HTTP {self.status}" if self.status is not None else self.kind.value.replace("_", " ")


_TIMEOUT_STATUSES = frozenset({408, 504})


def _status_failure(status: int, retry_after: float | None = None) -> Failure:
    """429 and 5xx can succeed when repeated; 408 (request timeout) is a timeout. Every other
    4xx (400, 401, 403, 404, 409, 422, ...) says the request itself is wrong: never retried."""
    if status == 429:
        return Failure(FailureKind.RATE_LIMITED, True, status, retry_after)
    if status in _TIMEOUT_STATUSES:
        return Failure(FailureKind.TIMEOUT, True, status, retry_after)
    if status >= 500:
        return Failure(FailureKind.SERVER_ERROR, True, status, retry_after)
    return Failure(FailureKind.CLIENT_ERROR, False, status, None)


def retry_after_seconds(headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI's header) or `Retry-After` (seconds or an
    HTTP date); None when absent or unreadable. `headers` must look names up case-insensitively
    (httpx and httpx2 headers do)."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        return max(0.0, seconds) if math.isfinite(seconds) else None
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - now())
    except (TypeError, ValueError, OverflowError):
        return None


def classify_model_error(exc: BaseException) -> Failure:
    """Model calls through `langchain-openai` (the openai SDK's exceptions, which
    langchain-openai re-raises as subclasses that are also LangChain `ModelError`s) or any
    other provider raising LangChain's `ModelError`."""
    # APITimeoutError is a subclass of APIConnectionError: test it first.
    if isinstance(exc, openai.APITimeoutError):
        return Failure(FailureKind.TIMEOUT, True)
    if isinstance(exc, openai.APIConnectionError):
        return Failure(FailureKind.CONNECTION, True)
    if isinstance(exc, openai.APIStatusError):
        return _status_failure(exc.status_code, retry_after_seconds(exc.response.headers))
    if isinstance(exc, ModelError):  # other providers: LangChain's classification, keyed to the status
        return Failure(_model_error_kind(exc), exc.is_retryable)
    return _transport_failure(exc) or Failure(FailureKind.OTHER, False)


def _model_error_kind(exc: ModelError) -> FailureKind:
    if isinstance(exc, ModelTimeoutError):
        return FailureKind.TIMEOUT
    if isinstance(exc, ModelConnectionError):
        return FailureKind.CONNECTION
    if isinstance(exc, ModelRateLimitError):
        return FailureKind.RATE_LIMITED
    if isinstance(exc, ModelAPIError):
        return FailureKind.SERVER_ERROR
    return FailureKind.CLIENT_ERROR if not exc.is_retryable else FailureKind.OTHER


def is_transient_model_error(exc: Exception) -> bool:
    """`retry_on` predicate for `ModelRetryMiddleware`: timeouts, connection errors, 429, 5xx."""
    return classify_model_error(exc).transient


def _transport_failure(exc: BaseException) -> Failure | None:
    if isinstance(exc, httpx.TimeoutException | httpx2.TimeoutException | TimeoutError):
        return Failure(FailureKind.TIMEOUT, True)
    if isinstance(exc, httpx.TransportError | httpx2.TransportError | ConnectionError):
        return Failure(FailureKind.CONNECTION, True)
    return None


def classify_tool_error(exc: BaseException) -> Failure:
    """A tool call that raised: transport errors, or an HTTP status error from the tool service."""
    transport = _transport_failure(exc)
    if transport is not None:
        return transport
    if isinstance(exc, httpx.HTTPStatusError | httpx2.HTTPStatusError):
        return _status_failure(exc.response.status_code, retry_after_seconds(exc.response.headers))
    if isinstance(exc, CircuitOpenError):
        return Failure(FailureKind.CIRCUIT_OPEN, False)
    return Failure(FailureKind.OTHER, False)


def is_transient_tool_error(exc: Exception) -> bool:
    """`retry_on` predicate for `ToolRetryMiddleware` (tools that raise on failure)."""
    return classify_tool_error(exc).transient


def _message_of(result: ToolMessage | Command[Any]) -> ToolMessage | None:
    if isinstance(result, ToolMessage):
        return result
    update = result.update if isinstance(result.update, dict) else {}
    return next((m for m in update.get("messages", []) if isinstance(m, ToolMessage)), None)


def classify_tool_result(result: ToolMessage | Command[Any]) -> Failure | None:
    """The outcome of a tool call that returned: None when it succeeded.

    Reads the artifact `ToolCredentialsMiddleware` puts on the ToolMessage: `ok`, and
    `httpStatus` whenever the HTTP request was attempted (None when it got no response:
    a timeout or connection error, per `ToolHttpClient.call`). No `httpStatus` at all means
    the call never left the runtime (refused before sending), which repeating cannot fix.
    Retry-After is not available here: `ToolOutcome` keeps no response headers.
    """
    message = _message_of(result)
    if message is None:
        return None
    artifact = message.artifact if isinstance(message.artifact, dict) else {}
    if artifact.get("circuit"):
        return Failure(FailureKind.CIRCUIT_OPEN, False)
    if message.status != "error" and artifact.get("ok", True):
        return None
    if "httpStatus" not in artifact:
        return Failure(FailureKind.NOT_SENT if artifact else FailureKind.OTHER, False)
    status = artifact["httpStatus"]
    if isinstance(status, int):
        return _status_failure(status)
    error = str(artifact.get("error") or "")
    # ToolHttpClient.call: "timed out after N s" or "could not reach the tool service: ..."
    kind = FailureKind.TIMEOUT if error.startswith("timed out") else FailureKind.CONNECTION
    return Failure(kind, True)


# --- Backoff -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: retry n (0-based) waits a uniformly random time in
    [0, min(max_delay, base_delay * 2**n)]. A Retry-After from the server replaces it, up to
    `max_retry_after`; what happens when the server asks for longer is `long_retry_after`."""

    max_retries: int = 2
    """Retries after the first attempt (the Agent API's default `maxRetries`)."""
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 30.0
    long_retry_after: Literal["give_up", "wait_cap"] = "give_up"
    """give_up: do not retry (waiting less than the server asked is a retry it already said
    will fail; the fallback chain takes over sooner). wait_cap: wait `max_retry_after`."""
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    """Uniform in [0, 1); injectable for tests."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.base_delay <= self.max_delay:
            raise ValueError(
                f"delays must satisfy 0 <= base_delay <= max_delay, got base_delay={self.base_delay}, "
                f"max_delay={self.max_delay}"
            )
        if self.max_retry_after < 0:
            raise ValueError(f"max_retry_after must be >= 0, got {self.max_retry_after}")
        if self.long_retry_after not in ("give_up", "wait_cap"):
            raise ValueError(f"long_retry_after must be 'give_up' or 'wait_cap', got {self.long_retry_after!r}")

    def backoff_cap(self, retry_number: int) -> float:
        """The upper bound of the jittered wait before retry `retry_number` (0-based)."""
        return min(self.max_delay, self.base_delay * 2.0 ** min(max(retry_number, 0), 64))

    def delay(self, retry_number: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry `retry_number`; None: do not retry (Retry-After too long)."""
        if retry_after is not None:
            if retry_after <= self.max_retry_after:
                return max(0.0, retry_after)
            return None if self.long_retry_after == "give_up" else self.max_retry_after
        return self.rand() * self.backoff_cap(retry_number)


# --- Retry budget per run ------------------------------------------------------------------------

DEFAULT_RETRIES_PER_RUN = 10
"""The Agent API has no field for it (yet); model and tool retries of a run draw on it together."""


class RetryBudget:
    """Retries one run may make across all its model and tool calls. LangChain has no such
    thing (its retry middlewares count per call), hence ours."""

    def __init__(self, max_retries: int = DEFAULT_RETRIES_PER_RUN, *, run_id: str | None = None) -> None:
        if max_retries < 0:
            raise ValueError(f"a retry budget must be >= 0, got {max_retries}")
        self.limit = max_retries
        self.run_id = run_id
        self._spent = 0
        self._lock = threading.Lock()

    def try_spend(self) -> bool:
        """Take one retry; False (and nothing taken) when the budget is used up."""
        with self._lock:
            if self._spent >= self.limit:
                return False
            self._spent += 1
            return True

    @property
    def spent(self) -> int:
        return self._spent

    @property
    def remaining(self) -> int:
        return self.limit - self._spent

    @property
    def exhausted(self) -> bool:
        return self._spent >= self.limit

    def __repr__(self) -> str:
        return f"RetryBudget(run_id={self.run_id!r}, spent={self._spent}, limit={self.limit})"


class RetryBudgets:
    """The budgets of the runs of one process, by run id; usable as `budget_of`.

    A run keeps its budget across its segments (interrupt and resume in this process);
    `release` drops it when the run ends, and the oldest are dropped beyond `capacity`.
    A restarted process starts a resumed run with a fresh budget."""

    def __init__(self, per_run: int = DEFAULT_RETRIES_PER_RUN, *, capacity: int = 10_000) -> None:
        if per_run < 0 or capacity < 1:
            raise ValueError(f"per_run must be >= 0 and capacity >= 1, got {per_run} and {capacity}")
        self.per_run = per_run
        self.capacity = capacity
        self._budgets: OrderedDict[str, RetryBudget] = OrderedDict()
        self._lock = threading.Lock()

    def for_run(self, run_id: str) -> RetryBudget:
        with self._lock:
            budget = self._budgets.get(run_id)
            if budget is None:
                budget = self._budgets[run_id] = RetryBudget(self.per_run, run_id=run_id)
                while len(self._budgets) > self.capacity:
                    self._budgets.popitem(last=False)
            else:
                self._budgets.move_to_end(run_id)
            return budget

    def release(self, run_id: str) -> None:
        with self._lock:
            self._budgets.pop(run_id, None)

    def __call__(self, context: Any) -> RetryBudget | None:
        run_id = getattr(context, "run_id", None)
        return self.for_run(run_id) if isinstance(run_id, str) and run_id else None


# --- Which tool calls may be repeated -------------------------------------------------------------


def sends_idempotency_key(tool: BaseTool | None) -> bool:
    """`ToolHttpClient.call` sends `Idempotency-Key` (derived from run id and tool-call id, so
    every attempt of one call carries the same key) on every call of a mutating HttpTool."""
    return isinstance(tool, HttpTool) and tool.spec.mutating


def retry_unsafe_reason(tool: BaseTool | None, spec: ToolSpec | None = None) -> str | None:
    """None when repeating a call of this tool is safe: the tool does not change state
    (`mutating: false`), or it does and the call carries an idempotency key, so the tool
    service applies it once. Otherwise why not."""
    if spec is None and isinstance(tool, HttpTool):
        spec = tool.spec
    if spec is None:
        return "the tool is not in the Agent's tool list, so whether a repeat is safe is unknown"
    if not spec.mutating:
        return None
    if sends_idempotency_key(tool):
        return None
    return "the tool changes state and its calls carry no idempotency key"


def retry_safe_tool_names(specs: Iterable[ToolSpec] | None) -> list[str]:
    """The `tools` argument of `ToolRetryMiddleware` for tools that raise: the read-only ones
    (a tool outside HttpTool has no idempotency key to rely on)."""
    return [s.name for s in specs or [] if not s.mutating]


# --- Circuit breaker -------------------------------------------------------------------------------


class CircuitState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitOpenError(Exception):
    """A call refused by a tool's circuit breaker, without contacting the tool."""

    def __init__(self, tool: str, state: CircuitState, message: str, retry_in: float | None) -> None:
        super().__init__(message)
        self.tool = tool
        self.state = state
        self.retry_in = retry_in
        """Seconds until calls are let through again (None while half-open probes are in flight)."""


@dataclass(frozen=True)
class CircuitPermit:
    """Leave to make one call; hand it back with the outcome (or `release` it)."""

    generation: int
    probe: bool


class ToolCircuitBreaker:
    """closed -> (failure_threshold consecutive failures) -> open -> (reset_timeout_seconds)
    -> half-open: up to half_open_requests probe calls go through; all must succeed to close,
    any failure opens again for another reset timeout.

    Failures are outcomes that say the tool service is unwell: timeouts, connection errors,
    429 and 5xx. A 4xx answer means the service works (the request was wrong) and counts as
    a success; a call that never reached the service (refused before sending, cancelled)
    counts as neither. An outcome reported for a permit from before the last transition is
    ignored (a slow call from the closed period must not close or reopen a later circuit).

    The open -> half-open transition happens when the first call arrives after the reset
    timeout: until then the gauge keeps showing open.
    """

    def __init__(
        self,
        tool: str,
        settings: CircuitBreakerSpec | None = None,
        *,
        agent: str,
        clock: Clock = time.monotonic,
        gauge: Gauge | None = TOOL_CIRCUIT_STATE,
    ) -> None:
        self.tool = tool
        self.agent = agent
        self.settings = settings or CircuitBreakerSpec()
        self._clock = clock
        self._gauge = gauge.labels(agent, tool) if gauge is not None else None
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._generation = 0
        self._failures = 0
        self._opened_at = 0.0
        self._probes_started = 0
        self._probe_successes = 0
        self._last_failure: str | None = None
        self._open_reason = ""
        self._publish()

    @property
    def state(self) -> CircuitState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_timeout_seconds - self._clock())

    def acquire(self) -> CircuitPermit:
        """A permit for one call; raises CircuitOpenError when the call must be refused."""
        with self._lock:
            if self._state is CircuitState.OPEN:
                remaining = self._opened_at + self.settings.reset_timeout_seconds - self._clock()
                if remaining > 0:
                    raise CircuitOpenError(
                        self.tool,
                        CircuitState.OPEN,
                        f"tool '{self.tool}' is unavailable: its circuit breaker {self._open_reason} "
                        f"(last: {self._last_failure}); the call was refused without contacting the tool. "
                        f"Calls will be let through again in {math.ceil(remaining)} s.",
                        remaining,
                    )
                self._transition(CircuitState.HALF_OPEN)
            if self._state is CircuitState.HALF_OPEN:
                limit = self.settings.half_open_requests
                if self._probes_started >= limit:
                    raise CircuitOpenError(
                        self.tool,
                        CircuitState.HALF_OPEN,
                        f"tool '{self.tool}' is being probed after an outage (circuit breaker half-open, "
                        f"{self._probes_started} of {limit} probe calls in flight); the call was refused "
                        f"without contacting the tool. Try again once the probe has finished.",
                        None,
                    )
                self._probes_started += 1
                return CircuitPermit(self._generation, probe=True)
            return CircuitPermit(self._generation, probe=False)

    def record_success(self, permit: CircuitPermit) -> None:
        with self._lock:
            if permit.generation != self._generation:
                return
            if self._state is CircuitState.HALF_OPEN:
                self._probe_successes += 1
                if self._probe_successes >= self.settings.half_open_requests:
                    self._transition(CircuitState.CLOSED)
            elif self._state is CircuitState.CLOSED:
                self._failures = 0

    def record_failure(self, permit: CircuitPermit, failure: Failure | None = None) -> None:
        with self._lock:
            if permit.generation != self._generation:
                return
            self._last_failure = failure.describe() if failure is not None else "failed"
            if self._state is CircuitState.HALF_OPEN:
                self._open_reason = "reopened after a failed probe call"
                self._transition(CircuitState.OPEN)
            elif self._state is CircuitState.CLOSED:
                self._failures += 1
                if self._failures >= self.settings.failure_threshold:
                    self._open_reason = f"opened after {self._failures} consecutive failures"
                    self._transition(CircuitState.OPEN)

    def release(self, permit: CircuitPermit) -> None:
        """The call ended without a verdict on the tool's health: free its probe slot."""
        with self._lock:
            if permit.probe and permit.generation == self._generation and self._state is CircuitState.HALF_OPEN:
                self._probes_started = max(0, self._probes_started - 1)

    def record(self, permit: CircuitPermit, failure: Failure | None) -> None:
        """Record a classified outcome (None: success)."""
        if failure is None or failure.kind is FailureKind.CLIENT_ERROR:
            self.record_success(permit)
        elif failure.transient:
            self.record_failure(permit, failure)
        else:
            self.release(permit)

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        outcome: Callable[[T], Failure | None] = lambda _result: None,
    ) -> T:
        """Run `operation` under the breaker. `outcome` classifies a returned value (None:
        success); exceptions are classified with `classify_tool_error`; cancellation and
        LangGraph control flow (interrupts) give no verdict."""
        permit = self.acquire()
        try:
            result = await operation()
        except (GraphBubbleUp, asyncio.CancelledError):
            self.release(permit)
            raise
        except Exception as exc:
            self.record(permit, classify_tool_error(exc))
            raise
        self.record(permit, outcome(result))
        return result

    def _transition(self, state: CircuitState) -> None:
        # Called with the lock held.
        previous = self._state
        self._state = state
        self._generation += 1
        self._probes_started = 0
        self._probe_successes = 0
        if state is CircuitState.OPEN:
            self._opened_at = self._clock()
        elif state is CircuitState.CLOSED:
            self._failures = 0
        self._publish()
        fields = {"agent": self.agent, "tool": self.tool, "from": previous.name.lower(), "to": state.name.lower()}
        if state is CircuitState.OPEN:
            fields.update(last_failure=self._last_failure, retry_in_s=self.settings.reset_timeout_seconds)
            log.warning("circuit breaker of tool %s opened", self.tool, extra={"fw": fields})
        else:
            log.info("circuit breaker of tool %s is %s", self.tool, state.name.lower(), extra={"fw": fields})

    def _publish(self) -> None:
        if self._gauge is not None:
            self._gauge.set(int(self._state))


class ToolCircuitBreakers:
    """One breaker per tool of an Agent, configured from each `Tool.circuitBreaker`."""

    def __init__(
        self,
        agent: str,
        tools: Iterable[ToolSpec] | None,
        *,
        clock: Clock = time.monotonic,
        gauge: Gauge | None = TOOL_CIRCUIT_STATE,
    ) -> None:
        self.agent = agent
        self._breakers = {
            spec.name: ToolCircuitBreaker(spec.name, spec.circuit_breaker, agent=agent, clock=clock, gauge=gauge)
            for spec in tools or []
        }

    def get(self, tool: str) -> ToolCircuitBreaker | None:
        return self._breakers.get(tool)

    def __getitem__(self, tool: str) -> ToolCircuitBreaker:
        return self._breakers[tool]

    def __contains__(self, tool: object) -> bool:
        return tool in self._breakers

    def __len__(self) -> int:
        return len(self._breakers)


# --- Middleware ------------------------------------------------------------------------------------


async def _gate(context: Any, step: str) -> None:
    """The run's step gate (`RunContext.before_step`): parks while halted, raises when the run
    must stop, so no attempt starts after a halt or stop."""
    before_step = getattr(context, "before_step", None)
    if before_step is not None:
        await before_step(step)


def _context_of(request: Any) -> Any:
    runtime = getattr(request, "runtime", None)
    return getattr(runtime, "context", None)


async def _backoff(context: Any, delay: float, sleep: AsyncSleep) -> None:
    """Wait before the next attempt. With the run's context (`RunContext.backoff`) a halt
    cuts the wait short and parks the run at once, and a stop ends it: a backoff never
    delays a halt or a drain by more than the step in flight (see `RunContext.backoff`).
    Without one (a caller outside a run), a plain sleep."""
    if delay <= 0:
        return
    backoff = getattr(context, "backoff", None)
    if backoff is not None:
        await backoff(delay, sleep)
    else:
        await sleep(delay)


def _note(context: Any, **entry: Any) -> None:
    """Add a failed attempt to the run's failure trail (`RunContext.note_failure`), which a
    run that fails for good sends to the dead-letter topic. Kinds, statuses and names only."""
    note = getattr(context, "note_failure", None)
    if note is not None:
        note({k: v for k, v in entry.items() if v is not None})


class ResilientModelRetryMiddleware(ModelRetryMiddleware):
    """`ModelRetryMiddleware` with full-jitter backoff, Retry-After, the run's retry budget, the
    run's step gate before every attempt, and a retry count per model of the fallback chain.

    `on_failure` defaults to "error" (the library's default, "continue", would turn an
    exhausted primary model into an AIMessage reply and the fallback chain would never run).
    Every attempt passes the run's step gate, including a fallback model's first one: stock
    `ModelFallbackMiddleware` catches every exception, so a stop raised here makes it try
    the next model, whose attempt is refused by the same gate; no model is called after a stop.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        retry_on: RetryOn = is_transient_model_error,
        on_failure: OnFailure = "error",
        budget_of: BudgetOf | None = None,
        model_max_retries: Iterable[tuple[BaseChatModel, int]] = (),
        sleep: AsyncSleep = asyncio.sleep,
        sync_sleep: Callable[[float], None] = time.sleep,
        gate: bool = True,
    ) -> None:
        policy = policy or RetryPolicy()
        # The parent's delay attributes describe the same policy (base, cap, doubling, jitter),
        # but its ±25 % jitter is not used: `_next_delay` applies the policy's full jitter.
        super().__init__(
            max_retries=policy.max_retries,
            retry_on=retry_on,
            on_failure=on_failure,
            backoff_factor=2.0,
            initial_delay=policy.base_delay,
            max_delay=policy.max_delay,
            jitter=True,
        )
        self.policy = policy
        self.budget_of = budget_of
        self.gate = gate
        self._sleep = sleep
        self._sync_sleep = sync_sleep
        # By identity: ModelFallbackMiddleware passes its model instances in request.model.
        pairs = list(model_max_retries)
        self._models = [model for model, _ in pairs]  # keeps the ids below valid
        self._max_retries_by_model = {id(model): retries for model, retries in pairs}

    def max_retries_for(self, model: Any) -> int:
        return self._max_retries_by_model.get(id(model), self.max_retries)

    def _next_delay(self, exc: Exception, attempt: int, request: ModelRequest[Any]) -> float | None:
        """Seconds to wait before the next attempt, or None to give up (exc is retryable)."""
        model = _model_name(request.model)
        max_retries = self.max_retries_for(request.model)
        fields: dict[str, Any] = {"model": model, "attempt": attempt + 1, "error": type(exc).__name__}
        if attempt >= max_retries:
            log.warning("model call failed after %s; not retried", _attempts(attempt + 1), extra={"fw": fields})
            return None
        failure = classify_model_error(exc)
        delay = self.policy.delay(attempt, failure.retry_after)
        if delay is None:
            fields["retry_after_s"] = failure.retry_after
            log.warning(
                "model asked to retry after %.0f s, more than the %.0f s allowed; not retried",
                failure.retry_after or 0.0,
                self.policy.max_retry_after,
                extra={"fw": fields},
            )
            return None
        budget = self.budget_of(_context_of(request)) if self.budget_of is not None else None
        if budget is not None and not budget.try_spend():
            log.warning(
                "the run's retry budget of %d is used up; model call not retried", budget.limit, extra={"fw": fields}
            )
            return None
        fields["delay_s"] = round(delay, 3)
        log.info("retrying model call (%s) in %.2f s", failure.describe(), delay, extra={"fw": fields})
        return delay

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage:
        attempt = 0
        context = _context_of(request)
        while True:
            if self.gate:
                await _gate(context, "model")
            try:
                return await handler(request)
            except (GraphBubbleUp, RunStopped):
                raise
            except Exception as exc:
                if not _matches(exc, self.retry_on):
                    self._note(context, request, exc, attempt, "not retried: not a transient failure")
                    raise
                delay = self._next_delay(exc, attempt, request)
                if delay is None:
                    self._note(context, request, exc, attempt, "gave up")
                    return self._handle_failure(exc, attempt + 1)
                self._note(context, request, exc, attempt, f"retried after {delay:.2f} s")
            if self.gate:
                await _backoff(context, delay, self._sleep)
            elif delay > 0:
                await self._sleep(delay)
            attempt += 1

    @staticmethod
    def _note(context: Any, request: ModelRequest[Any], exc: Exception, attempt: int, then: str) -> None:
        failure = classify_model_error(exc)
        _note(
            context,
            call="model",
            model=_model_name(request.model),
            attempt=attempt + 1,
            failure=failure.kind.value,
            status=failure.status,
            error=type(exc).__name__,
            then=then,
        )

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage:
        # Same policy and budget on the sync path; the step gate is async and is skipped here.
        attempt = 0
        while True:
            try:
                return handler(request)
            except GraphBubbleUp:
                raise
            except Exception as exc:
                if not _matches(exc, self.retry_on):
                    raise
                delay = self._next_delay(exc, attempt, request)
                if delay is None:
                    return self._handle_failure(exc, attempt + 1)
            if delay > 0:
                self._sync_sleep(delay)
            attempt += 1


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def _matches(exc: Exception, retry_on: RetryOn) -> bool:
    return retry_on(exc) if callable(retry_on) else isinstance(exc, retry_on)


def _model_name(model: Any) -> str:
    return str(getattr(model, "model_name", None) or getattr(model, "model", None) or type(model).__name__)


class IdempotentToolRetryMiddleware(AgentMiddleware[Any, Any]):
    """Retries a tool call after a transient failure (timeout, connection error, 429, 5xx),
    only when repeating it is safe (`retry_unsafe_reason`), with the policy's backoff and the
    run's retry budget. Sees both error ToolMessages (HttpTool) and raised exceptions.

    Place it outside `ToolCredentialsMiddleware`: every attempt then gets a freshly minted
    token (the tool service refuses a token id it has seen) under the same Idempotency-Key.
    A refusal by the circuit breaker is not retried.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        specs: Iterable[ToolSpec] | None = None,
        budget_of: BudgetOf | None = None,
        sleep: AsyncSleep = asyncio.sleep,
        gate: bool = True,
    ) -> None:
        super().__init__()
        self.policy = policy or RetryPolicy()
        self.specs = {s.name: s for s in specs or []}
        self.budget_of = budget_of
        self.gate = gate
        self._sleep = sleep

    def _plan(self, failure: Failure, attempt: int, request: ToolCallRequest, unsafe: str | None) -> float | str:
        """The wait before the next attempt, or why there is none."""
        if not failure.transient:
            return "not a transient failure"
        if unsafe is not None:
            return f"not retried: {unsafe}"
        if attempt >= self.policy.max_retries:
            return f"gave up after {_attempts(attempt + 1)}"
        delay = self.policy.delay(attempt, failure.retry_after)
        if delay is None:
            return f"not retried: the tool asked to wait {failure.retry_after:.0f} s"
        budget = self.budget_of(_context_of(request)) if self.budget_of is not None else None
        if budget is not None and not budget.try_spend():
            return f"not retried: the run's retry budget of {budget.limit} is used up"
        return delay

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        name = request.tool_call["name"]
        unsafe = retry_unsafe_reason(request.tool, self.specs.get(name))
        context = _context_of(request)
        attempt = 0
        while True:
            try:
                result = await handler(request)
            except GraphBubbleUp:
                raise
            except Exception as exc:
                failure = classify_tool_error(exc)
                plan = self._plan(failure, attempt, request, unsafe)
                if isinstance(plan, str):
                    _note_tool(context, name, attempt, failure, plan)
                    if failure.transient:
                        self._log_gave_up(name, attempt, failure, plan)
                    raise
            else:
                failure = classify_tool_result(result)
                if failure is None:
                    return result if attempt == 0 else _annotate(result, attempt + 1, None)
                plan = self._plan(failure, attempt, request, unsafe)
                if isinstance(plan, str):
                    _note_tool(context, name, attempt, failure, plan)
                    if not failure.transient:
                        return result if attempt == 0 else _annotate(result, attempt + 1, None)
                    self._log_gave_up(name, attempt, failure, plan)
                    return _annotate(result, attempt + 1, plan)
            _note_tool(context, name, attempt, failure, f"retried after {plan:.2f} s")
            log.info(
                "retrying tool call %s (%s) in %.2f s",
                name,
                failure.describe(),
                plan,
                extra={"fw": {"tool": name, "attempt": attempt + 1, "delay_s": round(plan, 3)}},
            )
            if self.gate:
                await _backoff(context, plan, self._sleep)
            elif plan > 0:
                await self._sleep(plan)
            attempt += 1
            if self.gate:
                await _gate(context, f"tool:{name}")

    @staticmethod
    def _log_gave_up(tool: str, attempt: int, failure: Failure, why: str) -> None:
        log.warning(
            "tool call %s failed (%s): %s",
            tool,
            failure.describe(),
            why,
            extra={"fw": {"tool": tool, "attempts": attempt + 1, "failure": failure.kind.value}},
        )


def _note_tool(context: Any, tool: str, attempt: int, failure: Failure, then: str) -> None:
    _note(
        context,
        call="tool",
        tool=tool,
        attempt=attempt + 1,
        failure=failure.kind.value,
        status=failure.status,
        then=then,
    )


def _annotate(result: ToolMessage | Command[Any], attempts: int, note: str | None) -> ToolMessage | Command[Any]:
    """Record the attempts in the artifact; tell the model why a failure was not retried."""
    if not isinstance(result, ToolMessage):
        return result
    artifact = dict(result.artifact) if isinstance(result.artifact, dict) else {}
    artifact["attempts"] = attempts
    update: dict[str, Any] = {"artifact": artifact}
    if note is not None:
        artifact["retry"] = note
        if isinstance(result.content, str):
            update["content"] = f"{result.content} ({note})"
    return result.model_copy(update=update)


class ToolCircuitBreakerMiddleware(AgentMiddleware[Any, Any]):
    """Refuses calls to a tool whose circuit is open (an error ToolMessage the model reads,
    and `fleetward_tool_errors_total{reason="circuit_open"}`), and feeds every outcome to the
    tool's breaker. Place it right outside `ToolCredentialsMiddleware`, whose artifact it reads:
    a refused call then gets no token, no audit record and no HTTP request."""

    def __init__(self, breakers: ToolCircuitBreakers) -> None:
        super().__init__()
        self.breakers = breakers

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        call = request.tool_call
        breaker = self.breakers.get(call["name"])
        if breaker is None:
            return await handler(request)
        try:
            return await breaker.call(lambda: handler(request), outcome=classify_tool_result)
        except CircuitOpenError as refused:  # raised by the breaker before any call is made
            TOOL_ERRORS.labels(self.breakers.agent, call["name"], "circuit_open").inc()
            return ToolMessage(
                content=f"Tool call failed: {refused}",
                tool_call_id=call["id"],
                name=call["name"],
                status="error",
                artifact={
                    "ok": False,
                    "error": str(refused),
                    "circuit": refused.state.name.lower().replace("_", "-"),
                    "retryInSeconds": None if refused.retry_in is None else math.ceil(refused.retry_in),
                },
            )


def model_failure_middleware(
    primary: tuple[BaseChatModel, ModelEndpoint],
    fallbacks: Sequence[tuple[BaseChatModel, ModelEndpoint]] = (),
    *,
    budget_of: BudgetOf | None = None,
    policy: RetryPolicy | None = None,
    sleep: AsyncSleep = asyncio.sleep,
) -> list[AgentMiddleware[Any, Any]]:
    """Model failure handling, outermost first: LangChain's `ModelFallbackMiddleware` over
    the fallbacks (when there are any), then the retries, each model with its endpoint's
    `maxRetries`. Build the chat models with `max_retries=0`, or the openai SDK retries
    inside every attempt as well (unbudgeted, with its own backoff)."""
    retry = ResilientModelRetryMiddleware(
        policy,
        budget_of=budget_of,
        model_max_retries=[(model, endpoint.max_retries) for model, endpoint in [primary, *fallbacks]],
        sleep=sleep,
    )
    if not fallbacks:
        return [retry]
    return [ModelFallbackMiddleware(*(model for model, _ in fallbacks)), retry]


def tool_failure_middleware(
    agent: str,
    specs: Iterable[ToolSpec] | None,
    *,
    budget_of: BudgetOf | None = None,
    policy: RetryPolicy | None = None,
    clock: Clock = time.monotonic,
    sleep: AsyncSleep = asyncio.sleep,
) -> list[AgentMiddleware[Any, Any]]:
    """Tool failure handling, outermost first: retries, then the circuit breakers. Both go
    right before `ToolCredentialsMiddleware` (see the classes)."""
    specs = list(specs or [])
    return [
        IdempotentToolRetryMiddleware(policy, specs=specs, budget_of=budget_of, sleep=sleep),
        ToolCircuitBreakerMiddleware(ToolCircuitBreakers(agent, specs, clock=clock)),
    ]
