"""Agent commands (topic `fleetward.requests.<namespace>.<agent>`, key = sessionId)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import Field

from fleetward.api.envelopes.events import EDIT_RULES, Decision
from fleetward.api.envelopes.wire import (
    COMMAND_SCHEMA,
    ROUTE_NAME,
    AgentRef,
    Identity,
    PayloadEnvelope,
    Rule,
    RunId,
    SessionId,
    Text,
    TraceId,
    WireModel,
    now,
)

# --- Agent command payloads -----------------------------------------------------------------


class UserMessageData(WireModel):
    """A user's message to the agent."""

    text: Text
    """The message text."""


class QueryAnalysis(WireModel):
    """The router's classification of the request."""

    intent: Annotated[str, Field(min_length=1, max_length=256)]
    """What the user wants."""
    urgency: Literal["low", "medium", "high", "critical"]
    """How urgent it is."""
    tone: Annotated[str, Field(min_length=1, max_length=64)]
    """The user's tone."""
    topic: Annotated[str, Field(min_length=1, max_length=256)]
    """The topic the router recognised."""
    is_sensitive: bool
    """Whether the request touches sensitive data."""


class HandoffData(WireModel):
    """The router hands (part of) a request to a specialist."""

    from_agent: AgentRef
    """The router agent."""
    parent_run_id: RunId
    """The router's run."""
    text: Text
    """The (redacted) request text for the specialist."""
    topic: Annotated[str, Field(min_length=1, max_length=128, pattern=ROUTE_NAME)]
    """The route topic that selected the specialist."""
    analysis: QueryAnalysis
    """The router's analysis."""


class ResumeData(WireModel):
    """A reviewer's decision resumes an interrupted run."""

    RULES = EDIT_RULES

    run_id: RunId
    """The interrupted run."""
    decision: Decision
    """approve, edit (with the edited text) or reject."""
    edit: Text | None = None
    """The edited text; present exactly when decision is edit."""
    reviewer: Identity
    """The reviewer's identity, from the gateway's verified token."""


class ProvideSopData(WireModel):
    """A human provides the SOP a run asked for."""

    run_id: RunId
    """The run waiting for the SOP."""
    instructions: Text
    """The procedure to follow."""
    title: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """A title for the SOP."""


CommandType = Literal["user_message", "handoff", "resume", "provide_sop"]
COMMAND_PAYLOADS: dict[str, type[WireModel]] = {
    "user_message": UserMessageData,
    "handoff": HandoffData,
    "resume": ResumeData,
    "provide_sop": ProvideSopData,
}
CommandData = UserMessageData | HandoffData | ResumeData | ProvideSopData
Role = Literal["user", "reviewer", "operator"]


class CommandUser(WireModel):
    """The verified user on whose behalf a command is sent."""

    sub: Identity
    """The user, from the verified token's `sub`."""
    role: Role
    """The role from the verified token."""


class AgentCommand(PayloadEnvelope):
    """A request to an agent (topic `fleetward.requests.<namespace>.<agent>`, key = sessionId)."""

    KIND = "agent command"
    SCHEMA = COMMAND_SCHEMA
    PAYLOADS = COMMAND_PAYLOADS
    RULES = (
        Rule("type", ("user_message", "resume", "provide_sop"), require=("user",)),
        Rule("type", ("resume",), restrict={"user.role": ("reviewer", "operator")}),
    )

    schema_version: Literal["fleetward.command.v1"] = Field(alias="schema")
    """Always fleetward.command.v1."""
    type: CommandType
    """What is asked; decides the shape of `data`."""
    session_id: SessionId
    """The session (also the Kafka key)."""
    agent: AgentRef
    """The target agent, as namespace/name."""
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]
    """Deduplicates redeliveries: the same key is processed once."""
    trace_id: TraceId | None = None
    """W3C trace id of the request, when there is one."""
    user: CommandUser | None = None
    """The verified user; required except for handoff (agent to agent)."""
    data: CommandData
    """The type-specific payload."""

    @classmethod
    def new(
        cls,
        type: CommandType,
        *,
        session_id: str,
        agent: str,
        idempotency_key: str,
        data: WireModel | Mapping[str, Any],
        user: CommandUser | Mapping[str, Any] | None = None,
        trace_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> Self:
        """A validated command with a fresh id and the current time."""
        return cls._build(
            type=type,
            session_id=session_id,
            agent=agent,
            idempotency_key=idempotency_key,
            trace_id=trace_id,
            user=user,
            timestamp=timestamp or now(),
            data=data,
        )
