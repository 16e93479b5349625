"""Agent: the unit of deployment. One Agent = one Deployment of the agent runtime."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator

from fleetward.api.base import (
    AGE_COLUMN,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    READY_COLUMN,
    ApiModel,
    LabelKey,
    LabelSelector,
    LabelValue,
    PrinterColumn,
    Resource,
    ResourceKind,
    ResourceStatus,
    SecretKeyRef,
    cel,
    label_map,
    validations,
)

# OpenAI function names: what a model can be asked to call.
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
HTTP_URL_RULE = "isURL(self) && url(self).getScheme() in ['http', 'https']"

Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": r"^(\+|-)?"  # the API server's resource.Quantity syntax
            r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        }
    ),
]


class ModelPricing(ApiModel):
    """What a model costs, in USD per million tokens: the runtime's
    `fleetward_agent_cost_usd_total` is tokens x these prices."""

    input_per_million_tokens: float = Field(ge=0.0, le=1_000_000.0)
    """USD per million prompt (input) tokens, e.g. 0.15."""
    output_per_million_tokens: float = Field(ge=0.0, le=1_000_000.0)
    """USD per million completion (output) tokens, e.g. 0.6."""


class ModelEndpoint(ApiModel):
    """An OpenAI-compatible chat model."""

    provider: Literal["openai-compatible", "openai"] = "openai-compatible"
    """API dialect: any endpoint speaking the OpenAI Chat Completions protocol ("openai" is
    accepted as the same)."""
    name: str = Field(min_length=1, max_length=256)
    """Model name sent to the endpoint, e.g. gpt-4o-mini."""
    base_url: str = Field(
        alias="baseURL",
        max_length=2048,
        json_schema_extra=validations(cel(HTTP_URL_RULE, "baseURL must be an http(s) URL")),
    )
    """Base URL of the endpoint, e.g. https://api.openai.com/v1."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature, 0 to 2."""
    timeout_seconds: int = Field(default=60, ge=1, le=600)
    """Time limit for one model call."""
    max_retries: int = Field(default=2, ge=0, le=10)
    """Retries of a transient failure (timeouts, 429, 5xx) before moving to the next fallback."""
    credentials_secret_ref: SecretKeyRef | None = None
    """Secret key holding the API key. The operator projects a copy into a per-agent Secret."""
    pricing: ModelPricing | None = None
    """Price of this model for this Agent; overrides the installation's price table (operator
    setting `modelPrices`, by model name). A model priced in neither place has no cost recorded."""


class ModelSpec(ModelEndpoint):
    fallbacks: list[ModelEndpoint] | None = Field(default=None, max_length=8)
    """Further models tried in order when this one fails, each with its own credentials."""


class CircuitBreaker(ApiModel):
    """Per-tool circuit breaker: closed -> open after failures -> half-open probes."""

    failure_threshold: int = Field(default=5, ge=1, le=1000)
    """Consecutive failures that open the circuit."""
    reset_timeout_seconds: int = Field(default=30, ge=1, le=86400)
    """How long the circuit stays open before half-open probes are let through."""
    half_open_requests: int = Field(default=1, ge=1, le=100)
    """Probe calls allowed while half-open; all must succeed to close the circuit."""


class Tool(ApiModel):
    """A tool the agent may call. Only listed tools can ever be called: the runtime
    enforces the allow-list in code, not through the prompt."""

    name: str = Field(pattern=TOOL_NAME)
    """Function name shown to the model (letters, digits, '_' and '-', at most 64)."""
    description: str | None = Field(default=None, min_length=1, max_length=4096)
    """What the tool does, for the model (default: its name, which then has to say it)."""
    input_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        json_schema_extra={
            # Free-form JSON Schema, except that the arguments must be an object.
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {"type": {"type": "string", "enum": ["object"], "description": "Always object."}},
            "required": ["type"],
            "default": {"type": "object", "properties": {}},
        },
    )
    """JSON Schema of the arguments (type: object; default: an object without parameters)."""
    endpoint: str = Field(
        max_length=2048, json_schema_extra=validations(cel(HTTP_URL_RULE, "endpoint must be an http(s) URL"))
    )
    """HTTP URL the runtime POSTs the arguments to."""
    mutating: bool = False
    """Whether the tool changes state (mutating calls carry an idempotency key)."""
    requires_approval: bool = False
    """Whether every call waits for a human reviewer's approval."""
    timeout_seconds: int = Field(default=30, ge=1, le=600)
    """Time limit for one call."""
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker, json_schema_extra={"default": {}})
    """Circuit breaker settings for this tool."""


# A router's classification topic (a key of spec.routes), e.g. billing.
ROUTE_TOPIC = r"^[a-z0-9][a-z0-9_.-]*$"
RouteTopic = Annotated[str, Field(min_length=1, max_length=128, pattern=ROUTE_TOPIC)]
# The specialist Agent (same namespace) a topic goes to.
RouteAgent = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]


class RouteFallback(ApiModel):
    """Where requests go when no route matches or the specialist is missing."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.agent) != has(self.humanQueue)", "fallback needs exactly one of 'agent' or 'humanQueue'")
        )
    )

    agent: str | None = Field(default=None, min_length=1, max_length=63, pattern=DNS_LABEL)
    """A catch-all specialist Agent."""
    human_queue: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    """A human support queue, e.g. human-support."""


class SopRetrieval(ApiModel):
    """How a specialist picks the SOP for a request."""

    similarity_threshold: float = Field(default=0.30, ge=0.0, le=1.0)
    """Cosine similarity (0 to 1) between the request and an SOP (embedding model
    all-MiniLM-L6-v2) at or above which the best SOP is chosen; below it, the SOP's trigger
    keywords decide, and with none matching a human is asked for the procedure."""


class GuardrailRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_LABEL)
    """Name of a Guardrail in the Agent's namespace."""


class Budget(ApiModel):
    """Hard limits; a run that hits one stops gracefully with a partial result."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.alertThresholds) || self.alertThresholds.all(t, t > 0.0 && t <= 1.0)",
                "alertThresholds must be fractions in (0, 1]",
                field_path=".alertThresholds",
            ),
        )
    )

    max_tokens_per_run: int | None = Field(default=None, ge=1)
    """Model tokens (prompt + completion) one run may use."""
    max_tool_calls_per_run: int | None = Field(default=None, ge=1)
    """Tool calls one run may make."""
    max_steps_per_run: int | None = Field(default=None, ge=1)
    """Graph steps one run may take."""
    daily_token_budget: int | None = Field(default=None, ge=1)
    """Tokens per UTC day for the whole agent, shared by all replicas."""
    alert_thresholds: list[float] = Field(default=[0.5, 0.8, 0.95], min_length=1, max_length=10)
    """Fractions of a budget at which an alert is raised."""


class HumanReview(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.draftApproval) || self.draftApproval != 'riskAbove' || has(self.riskThreshold)",
                "draftApproval 'riskAbove' needs riskThreshold (0-100)",
                field_path=".riskThreshold",
            )
        )
    )

    draft_approval: Literal["always", "riskAbove", "never"] = "never"
    """Which drafts a human must approve before they are sent."""
    risk_threshold: int | None = Field(default=None, ge=0, le=100)
    """With riskAbove: drafts scored above this risk (0-100) need approval."""
    review_timeout_seconds: int = Field(default=3600, ge=1, le=7 * 86400)
    """How long a draft waits for a reviewer."""
    on_timeout: Literal["reject", "escalate"] = "escalate"
    """What happens to a draft nobody reviewed in time."""


class Autoscaling(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.minReplicas <= self.maxReplicas",
                "minReplicas must not exceed maxReplicas",
                field_path=".minReplicas",
            )
        )
    )

    min_replicas: int = Field(default=1, ge=1, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    target_cpu_utilization_percentage: int = Field(default=80, ge=1, le=100, alias="targetCPUUtilizationPercentage")


class ResourceRequirements(ApiModel):
    """Compute resources of the runtime container, as in a Pod spec."""

    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


class Toleration(ApiModel):
    """A pod toleration, as in a Pod spec."""

    key: str | None = Field(default=None, max_length=317)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Empty matches every effect."""
    toleration_seconds: int | None = Field(default=None, ge=0)


class EnvVar(ApiModel):
    """An extra environment variable for the runtime container, as in a Pod spec."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            # As in a Pod spec: a name alone sets the variable to the empty string.
            cel("!(has(self.value) && has(self.valueFrom))", "an env entry takes 'value' or 'valueFrom', not both"),
            cel(
                "!self.name.startsWith('FLEETWARD_') && "
                "!(self.name in ['POD_IP', 'POD_NAME', 'POD_NAMESPACE', 'TMPDIR'])",
                "env names FLEETWARD_* and POD_IP, POD_NAME, POD_NAMESPACE, TMPDIR are set by Fleetward "
                "and cannot be overridden",
                field_path=".name",
            ),
        )
    )

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = Field(default=None, max_length=32768)
    value_from: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef)."""


RESERVED_LABEL_RULE = "self.all(k, !k.startsWith('fleetward.dev/') && !k.startsWith('app.kubernetes.io/'))"


class DeploymentOptions(ApiModel):
    """Pod placement and decoration of the runtime Deployment, passed through to its pod template."""

    node_selector: dict[LabelKey, LabelValue] | None = label_map("nodeSelector")
    """Nodes the runtime pods may run on (by label)."""
    tolerations: list[Toleration] | None = Field(default=None, max_length=32)
    """Taints the runtime pods tolerate."""
    affinity: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """A Kubernetes Affinity (nodeAffinity, podAffinity, podAntiAffinity), passed through unchanged."""
    priority_class_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN)
    """PriorityClass of the runtime pods."""
    pod_labels: dict[LabelKey, LabelValue] | None = label_map(
        "podLabels",
        64,
        cel(
            RESERVED_LABEL_RULE,
            "podLabels may not set fleetward.dev/* or app.kubernetes.io/* keys (Fleetward sets them)",
        ),
    )
    """Extra labels on the runtime pods."""
    pod_annotations: dict[str, str] | None = Field(
        default=None,
        json_schema_extra=validations(
            cel(
                "self.all(k, !k.startsWith('fleetward.dev/'))",
                "podAnnotations may not set fleetward.dev/* keys (Fleetward sets them)",
            )
        ),
    )
    """Extra annotations on the runtime pods."""
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Extra environment variables of the runtime container."""
    termination_grace_period_seconds: int = Field(default=30, ge=1, le=3600)
    """Time the runtime gets to finish its current step after SIGTERM."""


class AgentSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!(has(self.replicas) && has(self.autoscaling))", "set either replicas or autoscaling, not both"),
            cel(
                "self.role != 'router' || (has(self.routes) && size(self.routes) > 0) || has(self.fallback)",
                "a router needs routes or a fallback",
                field_path=".routes",
            ),
            cel(
                "self.role == 'router' || (!has(self.routes) && !has(self.fallback))",
                "only a router takes routes and fallback",
                field_path=".routes",
            ),
        )
    )

    role: Literal["router", "specialist"]
    """router: classifies requests and hands them to specialists; specialist: answers under SOPs."""
    model: ModelSpec
    """The chat model and its fallback chain."""
    routes: dict[RouteTopic, RouteAgent] | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=validations(
            cel(
                "self.all(t, size(t) <= 128 && t.matches('" + ROUTE_TOPIC + "'))",
                "routes: each key is a classification topic: lowercase letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, at most 128 characters (e.g. billing)",
            )
        ),
    )
    """Router only: classification topic -> the specialist Agent (same namespace) that handles it,
    e.g. {billing: billing, account: account-security}."""
    fallback: RouteFallback | None = None
    """Router only: target for unknown topics or missing specialists."""
    tools: list[Tool] | None = Field(
        default=None,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """The tool allow-list. Names are unique."""
    sop_selector: LabelSelector | None = None
    """Selects the SOPs (in this namespace) the agent works under."""
    sop_retrieval: SopRetrieval = Field(default_factory=SopRetrieval, json_schema_extra={"default": {}})
    """How the SOP for a request is chosen among the selected ones."""
    guardrail_refs: list[GuardrailRef] | None = Field(
        default=None,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Guardrails applied to input, output and tool results."""
    budget: Budget = Field(default_factory=Budget, json_schema_extra={"default": {}})
    """Token, tool-call and step limits."""
    human_review: HumanReview = Field(default_factory=HumanReview, json_schema_extra={"default": {}})
    """When drafts need a human's approval."""
    replicas: int | None = Field(default=None, ge=0, le=1000)
    """Fixed number of runtime pods (default 1). Exclusive with autoscaling."""
    autoscaling: Autoscaling | None = None
    """Horizontal autoscaling on CPU. Exclusive with replicas."""
    resources: ResourceRequirements | None = None
    """Requests and limits of the runtime container."""
    image: str | None = Field(default=None, min_length=1, max_length=512)
    """Runtime image override (default: the operator's runtime image)."""
    paused: bool = False
    """Scale the runtime to zero, keeping everything else (config, credentials, topics)."""
    deployment: DeploymentOptions | None = None
    """Pod placement and decoration: node selector, tolerations, affinity, priority class, extra pod
    labels/annotations and env."""

    @field_validator("routes", mode="before")
    @classmethod
    def _routes_from_list(cls, value: Any) -> Any:
        # Until 2026-12-07 routes were a list of {topic, agent}; Agents stored in that form
        # are still read (the API server takes only the mapping now).
        if isinstance(value, list) and all(isinstance(r, dict) and set(r) == {"topic", "agent"} for r in value):
            return {r["topic"]: r["agent"] for r in value}
        return value


AgentPhase = Literal["Pending", "Ready", "Degraded", "Paused", "Halted"]


class AgentStatus(ResourceStatus):
    phase: AgentPhase | None = None
    """Pending, Ready, Degraded, Paused or Halted (a kill switch covers the agent)."""
    replicas: int | None = None
    ready_replicas: int | None = None
    config_hash: str | None = None
    """Hash of the rendered runtime config; the pod template carries it."""
    resolved_sops: list[str] | None = Field(default=None, alias="resolvedSOPs")
    """SOPs the selector matched, as name@version."""
    resolved_guardrails: list[str] | None = None
    request_topic: str | None = None
    """Kafka topic the agent consumes."""


class Agent(Resource):
    KIND: ClassVar[ResourceKind] = ResourceKind(
        kind="Agent",
        plural="agents",
        scope="Namespaced",
        short_names=("agt", "fwagent"),
        description="An LLM agent deployed as a runtime Deployment under SOPs, guardrails and budgets.",
        columns=(
            PrinterColumn("Role", ".spec.role"),
            PrinterColumn("Model", ".spec.model.name"),
            PrinterColumn("Phase", ".status.phase"),
            READY_COLUMN,
            PrinterColumn("Replicas", ".status.readyReplicas", type="integer", description="Ready runtime pods"),
            PrinterColumn("Topic", ".status.requestTopic", priority=1),
            AGE_COLUMN,
        ),
        object_rules=(
            cel(
                "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 52",
                "metadata.name: an Agent's name becomes Deployment, Service and topic names; "
                "use at most 52 lowercase letters, digits and '-', starting with a letter",
            ),
        ),
    )

    kind: Literal["Agent"] = "Agent"
    spec: AgentSpec
    status: AgentStatus | None = None
