"""SOP: a standard operating procedure, the agent's handbook, enforced in code."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema

from fleetward.api.agent import TOOL_NAME
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

STEP_ID = r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$"
StepId = Annotated[str, Field(pattern=STEP_ID, max_length=63)]


VERSION_PATTERN = r"^v?[0-9]+(\.[0-9]+){0,2}([-+][0-9A-Za-z.-]+)?$"


def _version_text(value: object) -> object:
    """`version: 2` in YAML is an integer: taken as "2" (a float such as 1.0 is not: YAML
    would have made 1.10 into 1.1)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


SopVersion = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=VERSION_PATTERN),
    BeforeValidator(_version_text),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "maxLength": 64,
            "pattern": VERSION_PATTERN,
            "description": 'Version of the procedure, e.g. "1.2" or 3; shown as name@version.',
        }
    ),
]


class Triggers(ApiModel):
    """What makes this SOP relevant to a request (used with semantic retrieval)."""

    intents: list[str] | None = Field(default=None, max_length=64)
    keywords: list[str] | None = Field(default=None, max_length=128)
    topics: list[str] | None = Field(default=None, max_length=64)


class Step(ApiModel):
    id: StepId
    """Unique id of the step within the SOP."""
    instruction: str = Field(min_length=1, max_length=8192)
    """What to do in this step."""
    tool: str | None = Field(default=None, pattern=TOOL_NAME)
    """The tool this step calls, if any. Calls to it are refused until `requires` succeeded."""
    requires: list[StepId] | None = Field(default=None, max_length=16)
    """Ids of steps that must have succeeded earlier in the same run."""
    approval: Literal["none", "human"] = "none"
    """Whether a human must approve this step before it runs."""


class SOPSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                # two-variable comprehension: i is the step's position, j the required one's
                "!has(self.steps) || self.steps.all(i, s, !has(s.requires) || "
                "s.requires.all(r, self.steps.exists(j, p, j < i && p.id == r)))",
                "steps[].requires may only name steps defined earlier in the list",
                field_path=".steps",
            ),
        )
    )

    domain: str = Field(min_length=1, max_length=128)
    """Support domain, e.g. billing."""
    title: str = Field(min_length=1, max_length=256)
    version: SopVersion
    """Version of the procedure, e.g. 1.2.0; recorded with every run that used it."""
    triggers: Triggers | None = None
    instructions: str = Field(min_length=1, max_length=65536)
    """The procedure text given to the model."""
    steps: list[Step] | None = Field(
        default=None,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["id"]},
    )
    """Ordered steps; tool prerequisites are enforced by the runtime."""
    on_failure: Literal["escalate", "reject"] = "escalate"
    """What happens when the procedure cannot be completed."""
    escalation_queue: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    """Human queue for escalations (default: the installation's human queue)."""


class SOPStatus(ResourceStatus):
    used_by: list[str] | None = None
    """Agents whose sopSelector matches this SOP."""


class SOP(Resource):
    KIND: ClassVar[ResourceKind] = ResourceKind(
        kind="SOP",
        plural="sops",
        scope="Namespaced",
        short_names=("fwsop",),
        description="A standard operating procedure that agents follow; tool prerequisites are enforced in code.",
        columns=(
            PrinterColumn("Domain", ".spec.domain"),
            PrinterColumn("Version", ".spec.version"),
            PrinterColumn("Title", ".spec.title", priority=1),
            READY_COLUMN,
            AGE_COLUMN,
        ),
    )

    kind: Literal["SOP"] = "SOP"
    spec: SOPSpec
    status: SOPStatus | None = None
