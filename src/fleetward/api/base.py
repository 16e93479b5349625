"""Building blocks shared by every Fleetward resource: model config, conditions,
references, selectors, and the resource descriptor the CRD generator reads.

Conventions:
- Python attributes are snake_case; the wire format (CRDs, manifests) is camelCase.
- Attribute docstrings become the schema descriptions shown by `kubectl explain`.
- CEL rules are attached with `cel(...)`; they go verbatim into the CRD as
  `x-kubernetes-validations`, so the API server enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "fleetward.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Names of things that end up as Kubernetes object names (DNS-1123 labels/subdomains).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Label keys and values, as the API server checks them on the objects they end up on: a
# selector or label with another spelling would match nothing or fail later, at apply.
# The key's name part is at most 63 characters; its optional DNS-subdomain prefix is checked
# for form only (the whole key at most 317 characters, as the prefix's 253 + '/' + 63). No
# backslashes: the pattern also goes into CEL string literals, where `\.` is not an escape.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?([.][a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
LABEL_KEY_HELP = (
    "a label key is a name of at most 63 characters (letters, digits, '-', '_', '.'; starting and ending "
    "with a letter or digit), optionally prefixed by a DNS subdomain and '/', e.g. tier or example.com/tier"
)
LABEL_VALUE_HELP = (
    "a label value is empty or at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit"
)
# A condition reason: CamelCase, as in the Kubernetes API conventions.
REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


def cel(rule: str, message: str, *, field_path: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """One `x-kubernetes-validations` entry. `field_path` points the error at a field."""
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base for every spec/status model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SecretKeyRef(ApiModel):
    """A key in a Secret in the resource's own namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key within the Secret."""


def label_map(what: str, max_items: int = 64, *extra_rules: dict[str, Any]) -> Any:
    """`dict[str, str]` of labels, keys and values checked as the API server checks labels."""
    return Field(
        default=None,
        max_length=max_items,
        json_schema_extra=validations(
            cel(f"self.all(k, size(k) <= 317 && k.matches('{LABEL_KEY}'))", f"{what}: {LABEL_KEY_HELP}"),
            *extra_rules,
        ),
    )


# Only the pattern: a length on a key would put `propertyNames` into the schemas, which not every
# validator reads; the CRD's CEL rule bounds the key's length.
LabelKey = Annotated[str, Field(pattern=LABEL_KEY)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


class LabelSelectorRequirement(ApiModel):
    key: str = Field(min_length=1, max_length=317, pattern=LABEL_KEY)
    """The label key the selector applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: list[LabelValue] | None = Field(default=None, max_length=64)
    """Values for In/NotIn; must be empty for Exists/DoesNotExist."""


class LabelSelector(ApiModel):
    """A Kubernetes label selector. An empty selector matches everything."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.matchExpressions) || self.matchExpressions.all(e, "
                "(e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))",
                "matchExpressions: operators In and NotIn need a non-empty 'values'; "
                "Exists and DoesNotExist take no values",
            )
        )
    )

    match_labels: dict[LabelKey, LabelValue] | None = label_map("matchLabels")
    """Labels that must all be present with these values."""
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, max_length=32)
    """Set-based requirements, all of which must hold."""


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A Kubernetes-style condition: the latest observation of one aspect of the object."""

    type: str = Field(min_length=1, max_length=316)
    """Kind of condition, e.g. Ready."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(min_length=1, max_length=1024, pattern=REASON)
    """Stable, machine-readable CamelCase reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    """Human-readable explanation, written for `kubectl describe`."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation the condition was computed from."""


class ResourceStatus(ApiModel):
    """Status fields every Fleetward resource has."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation the operator last acted on."""
    conditions: list[Condition] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Current state; `Ready` summarises the others."""


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


READY_COLUMN = PrinterColumn(
    "Ready", '.status.conditions[?(@.type=="Ready")].status', description="Summary Ready condition"
)
AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", type="date")


@dataclass(frozen=True)
class ResourceKind:
    """What the CRD generator needs to know about a kind beyond its spec/status models."""

    kind: str
    plural: str
    scope: Literal["Namespaced", "Cluster"]
    short_names: tuple[str, ...]
    columns: tuple[PrinterColumn, ...]
    description: str
    categories: tuple[str, ...] = ("fleetward",)
    # Rules on the whole object (they can see metadata, spec and oldSelf).
    object_rules: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


class Resource(BaseModel):
    """A whole Fleetward object (apiVersion, kind, metadata, spec, status)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    KIND: ClassVar[ResourceKind]

    api_version: Literal["fleetward.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: str
    metadata: dict[str, Any] = Field(default_factory=dict)
