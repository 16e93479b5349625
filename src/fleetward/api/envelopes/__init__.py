"""The wire contract between runtimes, gateways and the operator (SPEC §6): session
events, agent commands, control messages and their acks, as JSON envelopes; the alerts
for on-call tooling; and the audit records mirrored to the audit topic (SPEC §8).

These models are the single source of truth: `schemas/envelopes.schema.json` is generated
from them (`fleetward schemas generate`) and the Rust gateway checks itself against the
same fixtures in `schemas/fixtures/`.

Conventions (beyond `ApiModel`'s camelCase and unknown-field rejection):
- Validation is strict: `"5"` is not an integer and `"true"` is not a boolean, exactly as
  in JSON Schema, so Python and Rust accept the same documents.
- Every envelope has a `type`; events and commands carry a payload in `data` whose shape
  depends on that type (`EVENT_PAYLOADS`, `COMMAND_PAYLOADS`).
- Rules that tie one field to another (`Rule`) are checked here and emitted into the
  JSON Schema from the same declaration, so the two cannot drift apart.
- `to_json()` writes compact camelCase JSON without nulls; the `parse_*` helpers raise
  `EnvelopeError` (a ValueError) naming every offending field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fleetward.api.envelopes.alerts import (
    ALERT_PAYLOADS,
    ALERT_SCHEMA,
    Alert,
    AlertData,
    AlertType,
    BudgetThresholdData,
    VerificationFailedData,
)
from fleetward.api.envelopes.audit import (
    AUDIT_SCHEMA,
    GENESIS_HASH,
    AuditAction,
    AuditRecord,
    canonical_json,
    record_hash,
)
from fleetward.api.envelopes.commands import (
    COMMAND_PAYLOADS,
    AgentCommand,
    CommandData,
    CommandType,
    CommandUser,
    HandoffData,
    ProvideSopData,
    QueryAnalysis,
    ResumeData,
    Role,
    UserMessageData,
)
from fleetward.api.envelopes.control import AckRun, AckType, Component, ControlAck, ControlMessage, ControlType
from fleetward.api.envelopes.events import (
    EVENT_PAYLOADS,
    ApprovalDecisionData,
    ApprovalRequiredData,
    BudgetExceededData,
    Decision,
    EscalatedData,
    EventData,
    EventType,
    FailedData,
    HaltedData,
    MessageData,
    ResolvedData,
    ResumedData,
    SessionEvent,
    SessionState,
    StatusData,
    ToolCallData,
    ToolResultData,
    VerifySpec,
)
from fleetward.api.envelopes.wire import (
    AGENT_REF,
    COMMAND_SCHEMA,
    CONTROL_ACK_SCHEMA,
    CONTROL_SCHEMA,
    EVENT_SCHEMA,
    ID_CHARS,
    RFC3339,
    TOOL_NAME,
    TRACE_ID,
    Envelope,
    EnvelopeError,
    PayloadEnvelope,
    Rule,
    WireModel,
)

ENVELOPES: dict[str, type[Envelope]] = {
    EVENT_SCHEMA: SessionEvent,
    COMMAND_SCHEMA: AgentCommand,
    CONTROL_SCHEMA: ControlMessage,
    CONTROL_ACK_SCHEMA: ControlAck,
    ALERT_SCHEMA: Alert,
    AUDIT_SCHEMA: AuditRecord,
}
"""Envelope model by its `schema` value."""


def parse_event(raw: bytes | str | Mapping[str, Any]) -> SessionEvent:
    """Parse and validate a session event."""
    return SessionEvent.parse(raw)


def parse_command(raw: bytes | str | Mapping[str, Any]) -> AgentCommand:
    """Parse and validate an agent command."""
    return AgentCommand.parse(raw)


def parse_control(raw: bytes | str | Mapping[str, Any]) -> ControlMessage:
    """Parse and validate a control message."""
    return ControlMessage.parse(raw)


def parse_ack(raw: bytes | str | Mapping[str, Any]) -> ControlAck:
    """Parse and validate a control ack."""
    return ControlAck.parse(raw)


def parse_alert(raw: bytes | str | Mapping[str, Any]) -> Alert:
    """Parse and validate an alert."""
    return Alert.parse(raw)


def parse_audit_record(raw: bytes | str | Mapping[str, Any]) -> AuditRecord:
    """Parse and validate an audit record (its hash is not checked here: see `expected_hash`)."""
    return AuditRecord.parse(raw)


def parse_envelope(raw: bytes | str | Mapping[str, Any]) -> Envelope:
    """Parse any envelope, choosing the model by its `schema` field."""
    if isinstance(raw, Mapping):
        doc: Any = raw
    else:
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise EnvelopeError("envelope", f"not JSON: {e}") from None
    version = doc.get("schema") if isinstance(doc, dict) else None
    model = ENVELOPES.get(version) if isinstance(version, str) else None
    if model is None:
        known = ", ".join(ENVELOPES)
        raise EnvelopeError("envelope", f"schema: must be one of {known} (got {json.dumps(version)})")
    return model.parse(doc)


__all__ = [
    "AGENT_REF",
    "ALERT_PAYLOADS",
    "ALERT_SCHEMA",
    "AUDIT_SCHEMA",
    "COMMAND_PAYLOADS",
    "COMMAND_SCHEMA",
    "CONTROL_ACK_SCHEMA",
    "CONTROL_SCHEMA",
    "ENVELOPES",
    "EVENT_PAYLOADS",
    "EVENT_SCHEMA",
    "GENESIS_HASH",
    "ID_CHARS",
    "RFC3339",
    "TOOL_NAME",
    "TRACE_ID",
    "AckRun",
    "AckType",
    "AgentCommand",
    "Alert",
    "AlertData",
    "AlertType",
    "ApprovalDecisionData",
    "ApprovalRequiredData",
    "AuditAction",
    "AuditRecord",
    "BudgetExceededData",
    "BudgetThresholdData",
    "CommandData",
    "CommandType",
    "CommandUser",
    "Component",
    "ControlAck",
    "ControlMessage",
    "ControlType",
    "Decision",
    "Envelope",
    "EnvelopeError",
    "EscalatedData",
    "EventData",
    "EventType",
    "FailedData",
    "HaltedData",
    "HandoffData",
    "MessageData",
    "PayloadEnvelope",
    "ProvideSopData",
    "QueryAnalysis",
    "ResolvedData",
    "ResumeData",
    "ResumedData",
    "Role",
    "Rule",
    "SessionEvent",
    "SessionState",
    "StatusData",
    "ToolCallData",
    "ToolResultData",
    "UserMessageData",
    "VerificationFailedData",
    "VerifySpec",
    "WireModel",
    "canonical_json",
    "parse_ack",
    "parse_alert",
    "parse_audit_record",
    "parse_command",
    "parse_control",
    "parse_envelope",
    "parse_event",
    "record_hash",
]
