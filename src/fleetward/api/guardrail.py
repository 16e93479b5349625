"""Guardrail: input, output and tool-result protection, composed onto agents by reference."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from fleetward.api.base import (
    AGE_COLUMN,
    READY_COLUMN,
    ApiModel,
    PrinterColumn,
    Resource,
    ResourceKind,
    ResourceStatus,
    cel,
    validations,
)

PIIType = Literal["email", "credit_card", "ip", "phone", "us_ssn", "iban", "api_key", "jwt", "custom"]
PIIStrategy = Literal["redact", "mask", "hash", "block"]
ApplyTo = Literal["input", "output", "toolResults"]
Pattern = Annotated[str, Field(min_length=1, max_length=1024)]
Phrase = Annotated[str, Field(min_length=1, max_length=256)]

CUSTOM_LABEL = "custom"
"""The finding/placeholder type of a custom entity without a `name` ([REDACTED_CUSTOM])."""

REGEX_DIALECT = "a regular expression in Python `re` syntax"
"""What the regular-expression fields (`pii.entities[].detector`, `injection.patterns[]`)
accept, in words, for error messages."""


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The one definition of the regular-expression dialect of a Guardrail's patterns: the
    agent runtime's guardrail engine, its PII middleware and the operator's admission
    webhook all compile them here (Python `re`, no flags). Raises re.error."""
    return re.compile(pattern)


class PIIEntity(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.type != 'custom' || has(self.detector)",
                "a custom PII entity needs 'detector' (a regular expression)",
            )
        )
    )

    type: PIIType
    """Built-in detector (credit_card is Luhn-checked; ip covers v4 and v6) or custom."""
    strategy: PIIStrategy = "redact"
    """redact: replace with [REDACTED_TYPE]; mask: keep the last 4 characters; hash: stable
    hash; block: refuse the whole message."""
    name: str | None = Field(default=None, min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_]*$")
    """Optional label for a custom entity, used in findings, placeholders and metrics; without
    it the label is `custom` ([REDACTED_CUSTOM]). Entities with the same label share the
    strictest of their strategies."""
    detector: str | None = Field(default=None, min_length=1, max_length=1024)
    """Regular expression (Python `re` syntax); required for custom, replaces the built-in
    detector otherwise."""

    @property
    def label(self) -> str:
        """The type findings and placeholders carry: the built-in type, or for a custom
        entity its name (`custom` when it has none)."""
        if self.type == "custom":
            return self.name or CUSTOM_LABEL
        return self.type


class PIIConfig(ApiModel):
    entities: list[PIIEntity] = Field(min_length=1, max_length=32)
    apply_to: list[ApplyTo] = Field(
        default=["input", "output", "toolResults"],
        min_length=1,
        max_length=3,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Where detection runs. PII never reaches the model, logs or traces unredacted."""


def _mode_from_yaml_boolean(value: object) -> object:
    """`mode: off` unquoted is the boolean false to YAML 1.1 loaders (PyYAML, kubectl's): taken
    as "off". True (an unquoted on/yes/true) names no mode: refused with the values allowed."""
    if value is False:
        return "off"
    if value is True:
        raise PydanticCustomError(
            "literal_error",
            "Input should be 'enforce', 'observe' or 'off'; an unquoted on/yes/true is read by YAML as the "
            'boolean true: write the mode in quotes (mode: "enforce")',
        )
    return value


InjectionMode = Annotated[Literal["enforce", "observe", "off"], BeforeValidator(_mode_from_yaml_boolean)]


class InjectionConfig(ApiModel):
    mode: InjectionMode = "enforce"
    """enforce: act on detections; observe: only record them; off: disabled. An unquoted off,
    which YAML 1.1 (kubectl) reads as the boolean false, is stored as "off" by the operator's
    admission webhook; quoting it (mode: "off") works without one."""
    patterns: list[Pattern] | None = Field(default=None, max_length=64)
    """Extra regular expressions (Python `re` syntax), on top of the built-in detection of instruction
    override, role-play hijack, system-prompt extraction and tool coercion."""
    action: Literal["block", "escalate"] = "block"


class PolicyConfig(ApiModel):
    banned_phrases: list[Phrase] = Field(min_length=1, max_length=256)
    """Phrases that must not appear, e.g. bypass, circumvent, skip verification (whole words,
    any case and spacing)."""
    action: Literal["block", "escalate"] = "block"
    apply_to: list[ApplyTo] = Field(
        default=["input", "output"],
        min_length=1,
        max_length=3,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Where the phrases are looked for: the agent must not say them (output), and a request
    asking for them (input: "how do I bypass 2FA") is blocked or escalated to a person."""


class Limits(ApiModel):
    max_input_chars: int | None = Field(default=None, ge=1)
    max_output_chars: int | None = Field(default=None, ge=1)


class GuardrailSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.pii) || has(self.injection) || has(self.policy) || has(self.limits)",
                "a Guardrail needs at least one of pii, injection, policy or limits",
            )
        )
    )

    pii: PIIConfig | None = None
    injection: InjectionConfig | None = None
    policy: PolicyConfig | None = None
    limits: Limits | None = None


class GuardrailStatus(ResourceStatus):
    used_by: list[str] | None = None
    """Agents that reference this Guardrail."""


class Guardrail(Resource):
    KIND: ClassVar[ResourceKind] = ResourceKind(
        kind="Guardrail",
        plural="guardrails",
        scope="Namespaced",
        short_names=("grd", "fwguard"),
        description="PII, injection, policy and size protection applied to agents that reference it.",
        columns=(
            PrinterColumn("Injection", ".spec.injection.mode"),
            PrinterColumn("Policy", ".spec.policy.action"),
            READY_COLUMN,
            AGE_COLUMN,
        ),
    )

    kind: Literal["Guardrail"] = "Guardrail"
    spec: GuardrailSpec
    status: GuardrailStatus | None = None
