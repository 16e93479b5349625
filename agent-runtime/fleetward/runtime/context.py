"""What the graph's nodes and middleware get for one run: ids, the event publisher, the
services of the process and the step gate (halt/stop). Passed as LangGraph's runtime
context (`context=`), so it is never checkpointed: it is rebuilt for every run segment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleetward.api.envelopes import EventType, WireModel
from fleetward.api.runtimeconfig import RuntimeConfig

if TYPE_CHECKING:
    from fleetward.runtime.alerts import AlertPublisher
    from fleetward.runtime.audit import RuntimeAudit
    from fleetward.runtime.budget import DailyTokenLedger
    from fleetward.runtime.config import ModelPrice, SigningKey
    from fleetward.runtime.events import EventPublisher
    from fleetward.runtime.guardrails.engine import GuardrailEngine
    from fleetward.runtime.memory import LongTermMemory
    from fleetward.runtime.persistence import Ledger
    from fleetward.runtime.resilience import RetryBudgets
    from fleetward.runtime.retrieval import SopRetriever

DEFAULT_HUMAN_QUEUE = "human-support"


class RunStopped(Exception):
    """The run must stop at a step boundary without finishing (SIGTERM, lost partition,
    kill switch in abort mode); its checkpoint stays and its request stays uncommitted."""


@dataclass
class Services:
    """Process-wide collaborators, built once at start."""

    config: RuntimeConfig
    events: EventPublisher
    ledger: Ledger
    signing_key: SigningKey
    guardrails: GuardrailEngine | None
    retriever: SopRetriever
    prices: Mapping[str, ModelPrice]
    audit: RuntimeAudit | None = None
    """The audit log (SPEC §8); None only where none is configured (unit tests)."""
    retry_budgets: RetryBudgets | None = None
    """The per-run retry budgets of model and tool calls (resilience.py); None: no per-run
    budget, only the per-call limits."""
    token_ledger: DailyTokenLedger | None = None
    """The Agent's daily token ledger (budget.py; shared by replicas on PostgreSQL); None when
    the Agent sets no `dailyTokenBudget`."""
    alerts: AlertPublisher | None = None
    """Publishes alerts (daily budget thresholds) on the alerts topic; None: not published."""
    memory: LongTermMemory | None = None
    """Users' earlier run outcomes (memory.py); None: no long-term memory (unit tests)."""
    pii_hash_key: bytes | None = None
    """HMAC key of the Guardrails' `hash` strategy (config.load_pii_hash_key); None: SHA-256."""

    @property
    def agent(self) -> str:
        return self.config.agent.ref


@dataclass
class StepGate:
    """Checked at the start of every graph step (node, model call, tool call).

    `halted` set (and `resumed` clear): the step waits (the run is parked at a step
    boundary, everything before it checkpointed) until resume or stop. `stop` set: the step
    raises `RunStopped`. `halted` is the inverse of `resumed`, kept so that a wait that is
    not a step (a retry's backoff, `RunContext.backoff`) can end the moment a halt comes;
    change both through `halt()` and `resume()`.
    """

    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    halted: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.resumed.set()

    def halt(self) -> None:
        self.resumed.clear()
        self.halted.set()

    def resume(self) -> None:
        self.halted.clear()
        self.resumed.set()


MAX_FAILURE_TRAIL = 50
"""Failed model and tool attempts kept per run segment for the dead-letter record."""


@dataclass
class RunContext:
    run_id: str
    session_id: str
    trace_id: str
    services: Services
    gate: StepGate
    traceparent: str | None = None
    """Of the run's span: tool calls and events carry it."""
    user: str | None = None
    """The verified user of the command, for the record."""
    partition: int | None = None
    """The request topic partition the run's command came from."""
    halted_by: str | None = None
    """The kill switch's halt this run was left in (persistence.halt_mark), when this
    process continues it after the release: it sends the `resumed` event first."""
    current_step: str = "start"
    parked: bool = False
    parked_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Any] | None = None
    """The task executing the run (control cancels it in abort mode)."""
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Failed model and tool attempts of this segment, oldest first (resilience.py notes
    them: kind, status, what happened next; never response text). A run that fails for good
    sends them to the dead-letter topic as part of its history."""

    def note_failure(self, entry: Mapping[str, Any]) -> None:
        if len(self.failures) < MAX_FAILURE_TRAIL:
            self.failures.append(dict(entry))

    async def before_step(self, step: str) -> None:
        """Wait here while halted; raise RunStopped when the run must stop."""
        if self.gate.stop.is_set():
            raise RunStopped(f"stopped before {step}")
        if not self.gate.resumed.is_set():
            self.parked = True
            self.parked_event.set()
            waiter = asyncio.ensure_future(self.gate.resumed.wait())
            stopper = asyncio.ensure_future(self.gate.stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
                self.parked = False
                self.parked_event.clear()
            if self.gate.stop.is_set():
                raise RunStopped(f"stopped while halted before {step}")
        self.current_step = step

    async def backoff(self, seconds: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Wait `seconds` before retrying a failed model or tool call, but never hold up a
        halt or a stop with it.

        A backoff wait sits between two attempts of one model or tool call: nothing of the
        call is in the state yet, and the next attempt passes the step gate anyway. So a halt
        that comes during the wait ends the wait at once and the run parks right there, as
        it would before the next step (`before_step`): a drain is delayed by no more than
        the step in flight, never by the backoff. A stop ends it with `RunStopped`; an abort
        cancels it like any await. After a resume the run waits out what is left of the
        backoff (so a server's Retry-After still holds) and then retries; if the halt lasted
        longer, it retries at once.

        `sleep` is the timer (tests inject one); the halt and stop events cut it short.
        """
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        remaining = seconds
        while True:
            if self.gate.stop.is_set() or not self.gate.resumed.is_set():
                await self.before_step(self.current_step)  # parks while halted; raises on stop
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
            timer = asyncio.ensure_future(sleep(remaining))
            halted = asyncio.ensure_future(self.gate.halted.wait())
            stopped = asyncio.ensure_future(self.gate.stop.wait())
            try:
                await asyncio.wait({timer, halted, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in (halted, stopped):
                    f.cancel()
                if not timer.done():
                    timer.cancel()
            if timer.done() and not timer.cancelled():
                timer.result()  # the wait is over (a failing timer raises here)
                if self.gate.stop.is_set():
                    raise RunStopped(f"stopped while waiting to retry {self.current_step}")
                return

    async def emit(self, key: str, type: EventType, data: WireModel | Mapping[str, Any]) -> None:
        """Publish the run's event `key` (once; see events.py)."""
        await self.services.events.emit(
            f"{self.run_id}/{key}",
            type,
            session_id=self.session_id,
            run_id=self.run_id,
            trace_id=self.trace_id,
            data=data,
            traceparent=self.traceparent,
        )
