"""KillSwitch (cluster-scoped): the emergency stop for a whole fleet or part of it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field

from fleetward.api.base import (
    AGE_COLUMN,
    DNS_LABEL,
    READY_COLUMN,
    ApiModel,
    LabelSelector,
    PrinterColumn,
    Resource,
    ResourceKind,
    ResourceStatus,
    cel,
    validations,
)


class Scope(ApiModel):
    """Which agents the switch covers. An empty scope covers every agent in the cluster."""

    namespaces: list[Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]] | None = Field(
        default=None, max_length=256, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Only agents in these namespaces."""
    agent_selector: LabelSelector | None = None
    """Only agents whose labels match."""


class Actions(ApiModel):
    """What engaging does. All on by default."""

    revoke_credentials: bool = True
    """Remove agent keys from the trust bundle, delete Kafka users/ACLs and credential Secrets."""
    drain_queues: bool = True
    """Runtimes finish their current step, checkpoint and stop taking work."""
    close_sessions: bool = True
    """Gateways send a halted event and close the affected sessions."""
    scale_to_zero: bool = True
    """Scale the agents' Deployments to zero."""


class Approval(ApiModel):
    """One approval of a release. Stamped by the admission webhook from the API server's
    authentication (userInfo); a user-typed identity is rejected."""

    user: str = Field(min_length=1, max_length=253)
    """Authenticated username of the approver."""
    groups: list[str] | None = Field(default=None, max_length=64)
    approved_at: datetime | None = None
    comment: str | None = Field(default=None, max_length=1024)


DEFAULT_DRAIN_TIMEOUT_SECONDS = 30
"""`spec.drainTimeoutSeconds` when not given (SPEC §2), also for a halt order without one."""


class KillSwitchSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!self.engaged || (has(self.reason) && size(self.reason.trim()) > 0)",
                "reason is required when engaged: say why the fleet is being stopped",
                field_path=".reason",
                reason="FieldValueRequired",
            ),
        )
    )

    engaged: bool
    """true stops the covered agents; false releases them (needs two approvals)."""
    reason: str | None = Field(default=None, max_length=1024)
    """Why the switch is engaged; required when engaged."""
    scope: Scope = Field(default_factory=Scope, json_schema_extra={"default": {}})
    actions: Actions = Field(default_factory=Actions, json_schema_extra={"default": {}})
    drain_timeout_seconds: int = Field(default=DEFAULT_DRAIN_TIMEOUT_SECONDS, ge=1, le=3600)
    """Upper bound for draining; runtimes that have not acked by then are stopped by force."""
    mode: Literal["drain", "abort"] = "drain"
    """drain: in-flight runs finish their current step, are checkpointed and park (the
    default). abort: in-flight model and tool calls are cancelled at once by closing their
    connections and runs stay at their last checkpoint (for a runaway agent)."""
    approvals: list[Approval] | None = Field(
        default=None,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["user"]},
    )
    """Release approvals from at least two distinct users, none of them the engager."""


KillSwitchPhase = Literal["Engaging", "Engaged", "Drained", "Released"]


class RunResult(ApiModel):
    """One run that was in flight when the switch engaged."""

    session_id: str
    run_id: str
    step: str | None = None
    """The graph step the run stopped at (or after)."""
    outcome: Literal["drained", "aborted", "forced"]
    """drained: finished its step and parked; aborted: cancelled mid-step (abort mode);
    forced: its runtime did not ack within drainTimeoutSeconds and was stopped by force."""
    instance: str | None = None
    """The runtime pod that reported it."""


class AgentResult(ApiModel):
    namespace: str
    name: str
    credentials_revoked: bool | None = None
    drained: bool | None = None
    scaled_to_zero: bool | None = None
    runs: list[RunResult] | None = Field(default=None, max_length=1000)
    """In-flight runs and what happened to each."""
    forced_instances: list[str] | None = Field(default=None, max_length=1000)
    """Runtime pods that did not ack the drain in time and were stopped by force."""
    message: str | None = None


class KillSwitchStatus(ResourceStatus):
    phase: KillSwitchPhase | None = None
    engaged_by: str | None = None
    """Authenticated user who engaged the switch."""
    engaged_at: datetime | None = None
    credentials_revoked_at: datetime | None = None
    drained_at: datetime | None = None
    released_by: list[str] | None = None
    released_at: datetime | None = None
    revocation_seconds: float | None = None
    """Seconds from the engage being accepted until every credential was refused."""
    drain_seconds: float | None = None
    affected_agents: int | None = None
    agents: list[AgentResult] | None = None
    """Per-agent results."""


# The release rule needs old and new object together, so it sits at the root.
# It is a backstop: the admission webhook also checks that approvals carry the
# identities the API server authenticated.
RELEASE_RULE = cel(
    "!(oldSelf.spec.engaged && !self.spec.engaged) || ("
    "has(self.spec.approvals) && size(self.spec.approvals) >= 2 && "
    "(!has(self.status) || !has(self.status.engagedBy) || "
    "self.spec.approvals.all(a, a.user != self.status.engagedBy)))",
    "releasing needs spec.approvals from at least two distinct users, none of them the user who engaged it",
    field_path=".spec.approvals",
    reason="FieldValueForbidden",
)


# Narrowing the scope or turning an action off while engaged would release agents without
# the two approvals (the operator reconciles to the new scope). The webhook refuses it with
# a fuller message; this is its backstop.
ENGAGED_SCOPE_RULE = cel(
    "!(oldSelf.spec.engaged && self.spec.engaged) || "
    "(self.spec.scope == oldSelf.spec.scope && self.spec.actions == oldSelf.spec.actions)",
    "spec.scope and spec.actions cannot change while the switch is engaged: release it first "
    "(two approvals), or engage another KillSwitch to cover more agents",
    field_path=".spec.scope",
    reason="FieldValueForbidden",
)


class KillSwitch(Resource):
    KIND: ClassVar[ResourceKind] = ResourceKind(
        kind="KillSwitch",
        plural="killswitches",
        scope="Cluster",
        short_names=("ks", "fwkill"),
        description="Emergency stop: revokes agent credentials, drains queues and scales agents to zero.",
        columns=(
            PrinterColumn("Engaged", ".spec.engaged", type="boolean"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Affected", ".status.affectedAgents", type="integer"),
            READY_COLUMN,
            PrinterColumn("Reason", ".spec.reason", priority=1),
            AGE_COLUMN,
        ),
        object_rules=(RELEASE_RULE, ENGAGED_SCOPE_RULE),
    )

    kind: Literal["KillSwitch"] = "KillSwitch"
    spec: KillSwitchSpec
    status: KillSwitchStatus | None = None
