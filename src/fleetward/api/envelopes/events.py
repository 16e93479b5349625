"""Session events (topic `fleetward.events`, key = sessionId): one payload model per type."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import Field

from fleetward.api.envelopes.wire import (
    EVENT_SCHEMA,
    ID_CHARS,
    ROUTE_NAME,
    TEXT_MAX,
    AgentRef,
    CallId,
    Count,
    Identity,
    KillSwitchName,
    PayloadEnvelope,
    Reason,
    Rule,
    RunId,
    SessionId,
    StepName,
    Text,
    ToolName,
    TraceId,
    WireModel,
    now,
)

# --- Session event payloads -----------------------------------------------------------------


class MessageData(WireModel):
    """A chat message in the session (guardrails already applied)."""

    role: Literal["assistant", "user", "system"]
    """Who speaks."""
    text: Text
    """The message text."""


SessionState = Literal["Active", "WaitingForHuman", "Completed", "Failed", "TimedOut"]


class StatusData(WireModel):
    """The session's lifecycle state changed."""

    state: SessionState
    """The new state."""
    step: StepName | None = None
    """The graph step the run is in."""
    detail: Reason | None = None
    """Human-readable detail."""


class ToolCallData(WireModel):
    """The agent calls a tool."""

    tool: ToolName
    """Tool name, as in the Agent's tool list."""
    call_id: CallId
    """Identifies the call; the matching tool_result carries the same id."""
    arguments: dict[str, Any]
    """The call's arguments, already redacted by the guardrails."""


class ToolResultData(WireModel):
    """A tool call finished."""

    RULES = (Rule("ok", (False,), require=("error",)), Rule("ok", (True,), forbid=("error",)))

    tool: ToolName
    """Tool name."""
    call_id: CallId
    """The id of the tool_call this answers."""
    ok: bool
    """Whether the call succeeded."""
    result: Any = None
    """The (redacted) result, when there is one worth showing."""
    error: Reason | None = None
    """Why the call failed; required when ok is false."""
    duration_ms: Count | None = None
    """How long the call took."""


class ApprovalRequiredData(WireModel):
    """The run waits for a human decision (LangGraph interrupt)."""

    RULES = (
        Rule("kind", ("draft",), require=("draft",)),
        Rule("kind", ("tool",), require=("tool",)),
        Rule("kind", ("step",), require=("step",)),
    )

    kind: Literal["draft", "tool", "step"]
    """What needs approval: an answer draft, a tool call or a graph step."""
    review_id: Annotated[str, Field(min_length=1, max_length=128, pattern=ID_CHARS)] | None = None
    """Identifies the review, when the runtime tracks several."""
    draft: Text | None = None
    """The draft to approve; required when kind is draft."""
    tool: ToolName | None = None
    """The tool to approve; required when kind is tool."""
    arguments: dict[str, Any] | None = None
    """The tool call's arguments (redacted)."""
    step: StepName | None = None
    """The step to approve; required when kind is step."""
    reason: Reason
    """Why approval is needed (the policy that asked for it)."""
    timeout_seconds: Annotated[int, Field(ge=1, le=2_592_000)]
    """How long the run waits before the session times out."""


Decision = Literal["approve", "edit", "reject"]
EDIT_RULES = (
    Rule("decision", ("edit",), require=("edit",)),
    Rule("decision", ("approve", "reject"), forbid=("edit",)),
)


class ApprovalDecisionData(WireModel):
    """A reviewer decided on an approval request."""

    RULES = EDIT_RULES

    decision: Decision
    """approve, edit (with the edited text) or reject."""
    reviewer: Identity
    """The reviewer's verified identity."""
    edit: Text | None = None
    """The edited text; present exactly when decision is edit."""


class EscalatedData(WireModel):
    """The session was handed to a human queue."""

    queue: Annotated[str, Field(min_length=1, max_length=128, pattern=ROUTE_NAME)]
    """The human queue."""
    reason: Reason
    """Why it was escalated."""
    topic: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """The topic that could not be served, when known."""


class VerifySpec(WireModel):
    """How the gateway checks after a while that a fix held."""

    url: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^https?://")] | None = None
    """Health endpoint to probe."""
    delay_seconds: Annotated[int, Field(ge=0, le=86_400)] | None = None
    """How long to wait before probing."""


class ResolvedData(WireModel):
    """The run resolved the request."""

    summary: Text
    """What was done."""
    verify: VerifySpec | None = None
    """After-run verification, when the fix can be checked."""


class FailedData(WireModel):
    """The run failed."""

    reason: Reason
    """What failed, for people."""
    error: Annotated[str, Field(min_length=1, max_length=8192)] | None = None
    """Technical error detail (redacted)."""


class BudgetExceededData(WireModel):
    """The run hit a budget cap and stopped gracefully."""

    budget: Literal["tokens", "toolCalls", "steps", "dailyTokens"]
    """Which budget ran out."""
    limit: Count
    """The cap."""
    used: Count
    """What was used when the run stopped."""
    partial: Annotated[str, Field(max_length=TEXT_MAX)] | None = None
    """The partial result given to the user."""


class HaltedData(WireModel):
    """A kill switch halted the run."""

    kill_switch: KillSwitchName
    """The KillSwitch that halted it."""
    reason: Reason | None = None
    """The switch's reason."""
    step: StepName | None = None
    """The step the run stopped after."""


class ResumedData(WireModel):
    """A halted run resumed."""

    kill_switch: KillSwitchName | None = None
    """The KillSwitch whose release resumed it."""


EventType = Literal[
    "message",
    "status",
    "tool_call",
    "tool_result",
    "approval_required",
    "approval_decision",
    "escalated",
    "resolved",
    "failed",
    "budget_exceeded",
    "halted",
    "resumed",
]
EVENT_PAYLOADS: dict[str, type[WireModel]] = {
    "message": MessageData,
    "status": StatusData,
    "tool_call": ToolCallData,
    "tool_result": ToolResultData,
    "approval_required": ApprovalRequiredData,
    "approval_decision": ApprovalDecisionData,
    "escalated": EscalatedData,
    "resolved": ResolvedData,
    "failed": FailedData,
    "budget_exceeded": BudgetExceededData,
    "halted": HaltedData,
    "resumed": ResumedData,
}
EventData = (
    MessageData
    | StatusData
    | ToolCallData
    | ToolResultData
    | ApprovalRequiredData
    | ApprovalDecisionData
    | EscalatedData
    | ResolvedData
    | FailedData
    | BudgetExceededData
    | HaltedData
    | ResumedData
)


class SessionEvent(PayloadEnvelope):
    """Something happened in a session (topic `fleetward.events`, key = sessionId)."""

    KIND = "session event"
    SCHEMA = EVENT_SCHEMA
    PAYLOADS = EVENT_PAYLOADS

    schema_version: Literal["fleetward.event.v1"] = Field(alias="schema")
    """Always fleetward.event.v1."""
    type: EventType
    """What happened; decides the shape of `data`."""
    session_id: SessionId
    """The session (also the Kafka key)."""
    agent: AgentRef
    """The agent that emitted the event, as namespace/name."""
    run_id: RunId
    """The agent run the event belongs to."""
    trace_id: TraceId
    """W3C trace id (32 lowercase hex digits)."""
    sequence: Count
    """Position in the session's event stream, increasing."""
    data: EventData
    """The type-specific payload."""

    @classmethod
    def new(
        cls,
        type: EventType,
        *,
        session_id: str,
        agent: str,
        run_id: str,
        trace_id: str,
        sequence: int,
        data: WireModel | Mapping[str, Any],
        timestamp: datetime | None = None,
    ) -> Self:
        """A validated event with a fresh id and the current time."""
        return cls._build(
            type=type,
            session_id=session_id,
            agent=agent,
            run_id=run_id,
            trace_id=trace_id,
            timestamp=timestamp or now(),
            sequence=sequence,
            data=data,
        )
