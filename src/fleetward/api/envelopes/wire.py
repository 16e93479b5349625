"""Building blocks of every envelope: identifier rules, strict models with cross-field
`Rule`s, the `Envelope` base (ids, timestamps, JSON in and out) and `EnvelopeError`."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AwareDatetime,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from fleetward.api.base import ApiModel

EVENT_SCHEMA = "fleetward.event.v1"
COMMAND_SCHEMA = "fleetward.command.v1"
CONTROL_SCHEMA = "fleetward.control.v1"
CONTROL_ACK_SCHEMA = "fleetward.control-ack.v1"

# --- Identifiers --------------------------------------------------------------------------
# Every pattern is plain enough for Python `re`, Rust `regex` and ECMA-262 alike.

ID_CHARS = r"^[A-Za-z0-9._:-]+$"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# "<namespace>/<name>": a DNS-1123 label, then an Agent name (DNS-1035, at most 52 characters).
AGENT_REF = r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z](?:[-a-z0-9]{0,50}[a-z0-9])?$"
TRACE_ID = r"^[0-9a-f]{32}$"
# The same rule as `fleetward.api.agent.TOOL_NAME` (kept local: this module imports only base).
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
ROUTE_NAME = r"^[a-z0-9][a-z0-9_.-]*$"
KILL_SWITCH_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# RFC 3339 date-time with a mandatory offset. JSON Schema's `format` is only an annotation
# by default in draft 2020-12, so the pattern is what makes validators enforce it.
RFC3339 = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
_RFC3339_RE = re.compile(RFC3339)
INT64_MAX = 2**63 - 1
TEXT_MAX = 100_000  # a chat message or a draft; well under Kafka's default 1 MiB record

SessionId = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_CHARS)]
RunId = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_CHARS)]
AgentRef = Annotated[str, Field(min_length=3, max_length=116, pattern=AGENT_REF)]
TraceId = Annotated[str, Field(min_length=32, max_length=32, pattern=TRACE_ID)]
EnvelopeId = Annotated[str, Field(min_length=36, max_length=36, pattern=UUID_PATTERN)]
ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=TOOL_NAME)]
CallId = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_CHARS)]
StepName = Annotated[str, Field(min_length=1, max_length=128)]
KillSwitchName = Annotated[str, Field(min_length=1, max_length=253, pattern=KILL_SWITCH_NAME)]
Identity = Annotated[str, Field(min_length=1, max_length=256)]
Reason = Annotated[str, Field(min_length=1, max_length=4096)]
Text = Annotated[str, Field(min_length=1, max_length=TEXT_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]


def _rfc3339(value: Any) -> Any:
    # Pydantic alone would also take "2024-01-01 10:00", unix numbers and other ISO 8601
    # forms; the contract (and the JSON Schema pattern) is RFC 3339 with an offset.
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("rfc3339", "must be an RFC 3339 date-time string, e.g. 2025-01-31T12:00:00Z")
    if not _RFC3339_RE.match(value):
        raise PydanticCustomError(
            "rfc3339",
            "must be an RFC 3339 date-time with a timezone offset, e.g. 2025-01-31T12:00:00Z "
            "or 2025-01-31T13:00:00+01:00",
        )
    return datetime.fromisoformat(value)


Timestamp = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339}),
]


def now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


# --- Cross-field rules --------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """When field `when` holds one of `values`: the `require`d fields must be present, the
    `forbid`den ones absent, and each dotted path in `restrict` must hold one of its values.
    Field names are Python attribute names; the schema generator translates them."""

    when: str
    values: tuple[Any, ...]
    require: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    restrict: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def describe(self, wire_name: str) -> str:
        """The condition in wire terms, e.g. `when decision is "edit"`."""
        shown = ", ".join(json.dumps(v) for v in self.values)
        return f"when {wire_name} is {shown}" if len(self.values) == 1 else f"when {wire_name} is one of {shown}"


def wire_name(model: type[ApiModel], attr: str) -> str:
    """The JSON name of a model field."""
    return model.model_fields[attr].alias or attr


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


WIRE_NAMES: dict[str, bool] = {"wire_names": True}
"""Validation context of `Envelope.parse`: payloads are held to wire names too."""


class WireModel(ApiModel):
    """Base of every envelope and payload: strict JSON types plus declared `RULES`."""

    model_config = ConfigDict(strict=True)
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        cls = type(self)
        errors: list[InitErrorDetails] = []

        def fail(path: str, message: str, value: Any) -> None:
            loc = tuple(wire_name(cls, p) if i == 0 else p for i, p in enumerate(path.split(".")))
            errors.append(InitErrorDetails(type=PydanticCustomError("rule", message), loc=loc, input=value))

        for rule in cls.RULES:
            if getattr(self, rule.when) not in rule.values:
                continue
            when = rule.describe(wire_name(cls, rule.when))
            for name in rule.require:
                if getattr(self, name) is None:
                    fail(name, f"is required {when}", None)
            for name in rule.forbid:
                if getattr(self, name) is not None:
                    fail(name, f"is not allowed {when}", getattr(self, name))
            for path, allowed in rule.restrict.items():
                value = _dig(self, path)
                if value is not None and value not in allowed:
                    fail(path, f"must be one of {', '.join(map(json.dumps, allowed))} {when}", value)
        if errors:
            # Raised as a ValidationError so the error carries the field's location.
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return self


# --- Envelopes ------------------------------------------------------------------------------


class Envelope(WireModel):
    """Fields every envelope has."""

    KIND: ClassVar[str] = "envelope"
    SCHEMA: ClassVar[str]

    schema_version: str = Field(alias="schema")
    """Envelope kind and version; consumers reject versions they do not know."""
    id: EnvelopeId
    """Unique id of this envelope (a UUID)."""
    timestamp: Timestamp
    """When the envelope was created (RFC 3339 with an offset)."""

    def to_json(self) -> str:
        """Compact camelCase JSON; optional fields without a value are left out."""
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def parse(cls, raw: bytes | str | Mapping[str, Any]) -> Self:
        """Validate one envelope; raises `EnvelopeError` naming every bad field."""
        # Wire names only (camelCase), as the schema and the gateway read them: the models'
        # Python names (session_id) are for code that builds envelopes, not for the wire.
        try:
            if isinstance(raw, Mapping):
                return cls.model_validate(raw, by_alias=True, by_name=False, context=WIRE_NAMES)
            return cls.model_validate_json(raw, by_alias=True, by_name=False, context=WIRE_NAMES)
        except ValidationError as e:
            raise EnvelopeError(cls.KIND, e) from None

    @classmethod
    def _build(cls, **fields: Any) -> Self:
        """Validate fields given by Python name (used by the `new` constructors)."""
        try:
            return cls.model_validate({"schema": cls.SCHEMA, "id": _new_id(), **fields})
        except ValidationError as e:
            raise EnvelopeError(cls.KIND, e) from None


class PayloadEnvelope(Envelope):
    """An envelope whose `data` shape is chosen by its `type`."""

    PAYLOADS: ClassVar[dict[str, type[WireModel]]]

    @field_validator("data", mode="before", check_fields=False)
    @classmethod
    def _payload_for_type(cls, value: Any, info: ValidationInfo) -> Any:
        # A union alone would accept any payload that happens to fit; the type decides.
        kind = info.data.get("type")
        if kind is None:
            raise PydanticCustomError("payload", "not checked because 'type' is missing or invalid")
        payload = cls.PAYLOADS[kind]
        if isinstance(value, WireModel) and not isinstance(value, payload):
            raise PydanticCustomError(
                "payload",
                'a {got} does not fit type "{kind}" (expected {want})',
                {"got": type(value).__name__, "kind": kind, "want": payload.__name__},
            )
        if info.context is WIRE_NAMES:
            return payload.model_validate(value, by_alias=True, by_name=False, context=WIRE_NAMES)
        return payload.model_validate(value)


# --- Parsing --------------------------------------------------------------------------------


class EnvelopeError(ValueError):
    """An envelope failed validation. `problems` lists (field path, message) pairs."""

    def __init__(self, kind: str, error: ValidationError | str) -> None:
        if isinstance(error, str):
            self.problems = [("", error)]
        else:
            self.problems = [(_path(e["loc"]), _message(e)) for e in error.errors(include_url=False)]
        listed = "; ".join(f"{path}: {msg}" if path else msg for path, msg in self.problems)
        super().__init__(f"invalid {kind}: {listed}")


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("missing", "rule") or error["type"].startswith("json"):
        return msg
    shown = json.dumps(error.get("input"), default=str)
    return f"{msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
