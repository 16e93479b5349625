"""Alerts (topic `fleetward.alerts`, key = the session, or the agent when there is none): what
on-call tooling is told when something needs a person. Runtimes produce `budget_threshold`
(a daily token budget threshold reached), gateways `verification_failed` (the after-runner's
check of a resolved session failed). One payload model per type, as for session events.
The topic also carries copies of `escalated` session events (`fleetward.event.v1`, Kafka header
`fleetward-alert-type: escalated`) for the human queue's tooling: consumers tell the two apart
by `schema` (`parse_envelope`).

Alert ids are derived from what the alert is about (the agent, day and threshold; the
`resolved` event), so a producer that repeats an alert repeats its id and consumers can
drop the copy.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fleetward.api.envelopes.wire import (
    AgentRef,
    Count,
    EnvelopeId,
    PayloadEnvelope,
    Reason,
    RunId,
    SessionId,
    TraceId,
    WireModel,
)

ALERT_SCHEMA = "fleetward.alert.v1"

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class BudgetThresholdData(WireModel):
    """An agent's daily token budget reached one of its `alertThresholds` (first time that UTC day)."""

    budget: Literal["dailyTokens"]
    """Which budget: the Agent's `spec.budget.dailyTokenBudget`."""
    day: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    """The UTC day (YYYY-MM-DD) the tokens were used on."""
    threshold: Fraction
    """The threshold reached, a fraction of the budget (e.g. 0.8)."""
    used: Count
    """Tokens used that day when the threshold was reached."""
    limit: Annotated[int, Field(ge=1)]
    """The daily token budget."""
    utilization: Annotated[float, Field(ge=0.0)]
    """used / limit (may pass 1 when a single call crossed the budget)."""


class VerificationFailedData(WireModel):
    """The after-runner's health check of a resolved session did not succeed: the fix did not hold."""

    url: str = Field(min_length=1, max_length=2048)
    """The health endpoint that was checked."""
    delay_seconds: Count
    """How long after the `resolved` event the check was due."""
    status: Annotated[int, Field(ge=100, le=599)] | None = None
    """The HTTP status it answered with (absent when it did not answer)."""
    error: Reason | None = None
    """Why there was no answer (connection refused, timed out, ...)."""
    resolved_event_id: EnvelopeId
    """The id of the `resolved` event that asked for the check."""


AlertType = Literal["budget_threshold", "verification_failed"]

ALERT_PAYLOADS: dict[str, type[WireModel]] = {
    "budget_threshold": BudgetThresholdData,
    "verification_failed": VerificationFailedData,
}
"""The payload model of each alert type."""

AlertData = BudgetThresholdData | VerificationFailedData


class Alert(PayloadEnvelope):
    """Something needs a person (topic `fleetward.alerts`)."""

    KIND = "alert"
    SCHEMA = ALERT_SCHEMA
    PAYLOADS = ALERT_PAYLOADS

    schema_version: Literal["fleetward.alert.v1"] = Field(alias="schema")
    """Always fleetward.alert.v1."""
    type: AlertType
    """What happened; decides the shape of `data`."""
    agent: AgentRef
    """The agent the alert is about, as namespace/name."""
    session_id: SessionId | None = None
    """The session concerned, when there is one."""
    run_id: RunId | None = None
    """The run concerned, when there is one."""
    trace_id: TraceId | None = None
    """The trace of the run or call that raised it, when there is one."""
    data: AlertData
    """The type-specific payload."""
