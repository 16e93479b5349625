"""What the graph's nodes and middleware get for one run: ids, the event publisher, the
services of the process and the step gate (halt/stop). Passed as LangGraph's runtime
context (`context=`), so it is never checkpointed: it is rebuilt for every run segment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleetward.api.envelopes import EventType, WireModel
from fleetward.api.runtimeconfig import RuntimeConfig

if TYPE_CHECKING:
    from fleetward.runtime.audit import RuntimeAudit
    from fleetward.runtime.config import ModelPrice, SigningKey
    from fleetward.runtime.events import EventPublisher
    from fleetward.runtime.guardrails.engine import GuardrailEngine
    from fleetward.runtime.persistence import Ledger
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

    @property
    def agent(self) -> str:
        return self.config.agent.ref


@dataclass
class StepGate:
    """Checked at the start of every graph step (node, model call, tool call).

    `halted` set: the step waits (the run is parked at a step boundary, everything before
    it checkpointed) until resume or stop. `stop` set: the step raises `RunStopped`.
    """

    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.resumed.set()


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
    current_step: str = "start"
    parked: bool = False
    parked_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Any] | None = None
    """The task executing the run (control cancels it in abort mode)."""

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
