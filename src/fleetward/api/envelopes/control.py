"""Kill-switch control messages (topic `fleetward.control`) and their acks
(topic `fleetward.control-acks`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import ConfigDict, Field

from fleetward.api.envelopes.wire import (
    CONTROL_ACK_SCHEMA,
    CONTROL_SCHEMA,
    ID_CHARS,
    AgentRef,
    Count,
    Envelope,
    KillSwitchName,
    Reason,
    RunId,
    SessionId,
    StepName,
    Timestamp,
    WireModel,
    now,
)
from fleetward.api.killswitch import DEFAULT_DRAIN_TIMEOUT_SECONDS, Scope

ControlType = Literal["halt", "resume", "rotate_keys"]


class ControlMessage(Envelope):
    """An order from the operator to every runtime and gateway (topic `fleetward.control`).

    Unlike the other envelopes, an order with a field this version does not know is obeyed
    (the field ignored), not refused: a halt from a newer operator must stop an older
    runtime or gateway, during an upgrade or for an Agent pinned to an older image. The
    fields it knows are checked as strictly as everywhere else."""

    model_config = ConfigDict(extra="ignore")
    KIND = "control message"
    SCHEMA = CONTROL_SCHEMA

    schema_version: Literal["fleetward.control.v1"] = Field(alias="schema")
    """Always fleetward.control.v1."""
    type: ControlType
    """halt, resume, or rotate_keys (reload the trust bundle and agent keys)."""
    kill_switch: KillSwitchName
    """The KillSwitch this order comes from."""
    generation: Count
    """The KillSwitch's metadata.generation; acks echo it, stale orders are ignored."""
    agents: Annotated[list[AgentRef], Field(max_length=100_000)] | None = None
    """The agents in scope as namespace/name; empty or absent means every agent the scope
    covers by namespace alone (see `covers`). The operator always lists them."""
    scope: Scope | None = None
    """The switch's `spec.scope` as written (the CRD's own model), for the people and tools
    reading the topic (an empty scope: every agent). Instances act on `agents`: the scope
    resolved against the Agents' labels, which only the operator watches; with no agents
    listed they apply its namespaces, never its selector."""
    mode: Literal["drain", "abort"] | None = None
    """Halt only: drain (finish the current step, then stop) or abort (stop at once).
    Absent: drain, the KillSwitch's default. The operator always sends it; SPEC §6 names
    only the switch, scope and generation, so a hand-written halt may leave it out."""
    drain_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] | None = None
    """Halt only: upper bound for draining. Absent: 30, the KillSwitch's default
    (`DEFAULT_DRAIN_TIMEOUT_SECONDS`)."""
    drain_deadline: Timestamp | None = None
    """Halt only: when the drain must be over, the engage's acceptance plus the drain
    timeout (SPEC §7: never more than drainTimeoutSeconds, counted from the engage, not
    from when an order reached an instance). Runtimes stop waiting early enough for their
    acks to arrive by then (`drain_wait`). Absent: the drain timeout from receipt."""
    reason: Reason | None = None
    """Why, for logs and the halted event."""
    close_sessions: bool | None = None
    """Halt only: whether gateways tell the covered agents' connected sessions (a `halted`
    frame) and close them, the KillSwitch's `actions.closeSessions` (absent: true). With
    false they stay connected; new sessions are refused either way."""

    @property
    def halt_mode(self) -> Literal["drain", "abort"]:
        """The halt's mode, the KillSwitch's default (drain) when the order leaves it out."""
        return self.mode or "drain"

    @property
    def drain_timeout(self) -> int:
        """The halt's drain bound in seconds, the KillSwitch's default when left out."""
        return self.drain_timeout_seconds or DEFAULT_DRAIN_TIMEOUT_SECONDS

    def drain_wait(self, now_epoch: float) -> float:
        """Seconds a runtime that got this halt at `now_epoch` waits for in-flight runs to
        park before forcing them: the drain timeout, cut so that its ack can still reach
        the operator by `drain_deadline` (a quarter of the timeout, at most 1 s, is kept
        for forcing the rest, recording them and acking)."""
        timeout = float(self.drain_timeout)
        if self.drain_deadline is None:
            return timeout
        margin = min(1.0, timeout / 4)
        return max(0.0, min(timeout, self.drain_deadline.timestamp() - now_epoch - margin))

    def covers(self, agent: str) -> bool:
        """Whether the order is for `agent` (namespace/name). The operator lists the agents it
        resolved; an empty list means every agent, but only as far as the scope says so
        without labels: a namespace scope is applied here, and an order that narrows by
        label without listing its agents covers none (an instance cannot see labels; a
        hand-written `{"agents": [], "scope": {"namespaces": ["a"]}}` halted every agent)."""
        if self.agents:
            return agent in self.agents
        if self.scope is None:
            return True
        if self.scope.agent_selector is not None:
            return False
        return not self.scope.namespaces or agent.split("/", 1)[0] in self.scope.namespaces

    @classmethod
    def new(
        cls,
        type: ControlType,
        *,
        kill_switch: str,
        generation: int,
        agents: list[str],
        scope: Mapping[str, Any] | None = None,
        mode: Literal["drain", "abort"] | None = None,
        drain_timeout_seconds: int | None = None,
        drain_deadline: datetime | None = None,
        reason: str | None = None,
        close_sessions: bool | None = None,
        timestamp: datetime | None = None,
    ) -> Self:
        """A validated control message with a fresh id and the current time."""
        return cls._build(
            type=type,
            kill_switch=kill_switch,
            generation=generation,
            agents=agents,
            scope=scope,
            mode=mode,
            drain_timeout_seconds=drain_timeout_seconds,
            drain_deadline=drain_deadline,
            reason=reason,
            close_sessions=close_sessions,
            timestamp=timestamp or now(),
        )


class AckRun(WireModel):
    """What happened to one in-flight run."""

    session_id: SessionId
    """The run's session."""
    run_id: RunId
    """The run."""
    step: StepName
    """The step the run stopped at (or after)."""
    outcome: Literal["drained", "aborted", "forced"]
    """drained: finished its step; aborted: stopped mid-step (abort mode); forced: the drain timed out."""


AckType = Literal["drained", "halted", "resumed"]
Component = Literal["runtime", "gateway"]
CounterName = Annotated[str, Field(pattern=r"^[a-z][A-Za-z0-9]{0,63}$")]


class ControlAck(Envelope):
    """An instance reports how it carried out a control message (topic `fleetward.control-acks`)."""

    KIND = "control ack"
    SCHEMA = CONTROL_ACK_SCHEMA

    schema_version: Literal["fleetward.control-ack.v1"] = Field(alias="schema")
    """Always fleetward.control-ack.v1."""
    type: AckType
    """What the instance reports."""
    kill_switch: KillSwitchName
    """The KillSwitch of the control message."""
    generation: Count
    """The generation of the control message."""
    instance: Annotated[str, Field(min_length=1, max_length=253, pattern=ID_CHARS, alias="instanceId")]
    """Id of the reporting instance: the runtime's pod name, the gateway's --instance-id."""
    component: Component
    """What kind of instance reports."""
    agents: list[AgentRef] = Field(max_length=100_000)
    """The agents this instance serves that the order covered."""
    counts: dict[CounterName, Count] = Field(max_length=64)
    """Named counters, e.g. runsDrained, runsAborted, sessionsClosed."""
    runs: list[AckRun] = Field(max_length=100_000)
    """The in-flight runs and what happened to each."""

    @classmethod
    def new(
        cls,
        type: AckType,
        *,
        kill_switch: str,
        generation: int,
        instance: str,
        component: Component,
        agents: list[str],
        counts: Mapping[str, int] | None = None,
        runs: Sequence[AckRun | Mapping[str, Any]] = (),
        timestamp: datetime | None = None,
    ) -> Self:
        """A validated ack with a fresh id and the current time."""
        return cls._build(
            type=type,
            kill_switch=kill_switch,
            generation=generation,
            instance=instance,
            component=component,
            agents=agents,
            counts=dict(counts or {}),
            runs=list(runs),
            timestamp=timestamp or now(),
        )
