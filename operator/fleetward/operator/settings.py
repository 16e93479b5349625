"""Operator settings: one typed document, rendered by the Helm chart from its values
(ConfigMap `fleetward-operator`, key `settings.yaml`) and read at start-up.

    fleetward operator run --settings /etc/fleetward/settings.yaml

Every field has a default that works on the local cluster; a bad file stops the
operator at start with the field named.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from fleetward.api.agent import ModelPricing


class Settings(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class KafkaSettings(Settings):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = None
    admin_username: str | None = None
    admin_password_env: str = "FLEETWARD_KAFKA_ADMIN_PASSWORD"
    """Environment variable holding the admin password (from a Secret)."""
    manage_principals: bool | None = None
    """Create a SCRAM user and ACLs per Agent. Default: on when SASL/SCRAM is configured."""
    agent_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = "SCRAM-SHA-512"
    request_topic_partitions: int = Field(default=3, ge=1, le=1000)
    shared_topic_partitions: int = Field(default=3, ge=1, le=1000)
    replication_factor: int = Field(default=1, ge=1, le=10)
    delete_topics_with_agent: bool = True
    """Remove an Agent's request topic when the Agent is deleted (false keeps it, e.g. for audits)."""
    audit_topic_retention_ms: int = Field(default=-1, ge=-1)
    """retention.ms of the audit topic when the operator creates it (-1: kept for good, the
    mirrored chains are the audit log's second copy)."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @property
    def scram(self) -> bool:
        return bool(self.sasl_mechanism and self.sasl_mechanism.startswith("SCRAM"))

    @property
    def principals_managed(self) -> bool:
        return self.scram if self.manage_principals is None else self.manage_principals

    def admin_config(self) -> dict[str, Any]:
        """librdkafka settings for the operator's admin client."""
        cfg: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            password = os.environ.get(self.admin_password_env)
            if not (self.admin_username and password):
                raise ValueError(
                    f"kafka.saslMechanism is {self.sasl_mechanism}: set kafka.adminUsername and the "
                    f"environment variable {self.admin_password_env}"
                )
            cfg.update(
                {"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.admin_username, "sasl.password": password}
            )
        return cfg


class TopicSettings(Settings):
    """Kafka topic names (SPEC §6)."""

    events: str = "fleetward.events"
    control: str = "fleetward.control"
    control_acks: str = "fleetward.control-acks"
    alerts: str = "fleetward.alerts"
    dlq: str = "fleetward.dlq"
    audit: str = "fleetward.audit"
    request_prefix: str = "fleetward.requests"

    def request_topic(self, namespace: str, agent: str) -> str:
        return f"{self.request_prefix}.{namespace}.{agent}"

    def shared(self) -> list[str]:
        return [self.events, self.control, self.control_acks, self.alerts, self.dlq, self.audit]


QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"


class StateVolumeSettings(Settings):
    """A PersistentVolumeClaim for the runtime's SQLite file (checkpoints and the request
    dedupe ledger), so that the state of a single-replica Agent outlives its pod: a kill
    switch's scale to zero and the roll for a fresh key after its release, a node drain.
    Used only in SQLite mode (no `databaseSecret`) and only by Agents with one replica and
    no autoscaling; others keep a per-pod emptyDir (SQLite has one writer)."""

    enabled: bool = True
    size: str = Field(default="1Gi", pattern=QUANTITY)
    """Requested storage, a Kubernetes quantity. Applies when a claim is created; an
    existing claim keeps its size (a claim's spec is fixed after creation)."""
    storage_class_name: str | None = None
    """StorageClass of the claims; None or empty: the cluster's default class."""


class SecretRef(Settings):
    name: str
    key: str = "secret"


class RuntimeSettings(Settings):
    """How agent runtime pods are built."""

    image: str = "ghcr.io/fleetward/fleetward:0.1.0"
    command: list[str] = Field(default_factory=lambda: ["fleetward", "runtime", "run"])
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    port: int = Field(default=8080, ge=1, le=65535)
    resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    )
    """Default requests/limits when an Agent sets none."""
    database_secret: str | None = None
    """Secret (in the Agent's namespace) with key `dsn`: PostgreSQL for checkpoints and ledgers.
    None: each pod uses embedded SQLite (fine for one replica)."""
    database_source: SecretRef | None = None
    """The installation's own PostgreSQL (chart `postgresql.enabled`): a Secret in the
    installation namespace whose `key` holds the DSN. The operator copies it into each
    Agent's namespace (Secret fw-<agent>-database, owned by the Agent), since a pod can only
    read Secrets of its own namespace. `database_secret` wins when both are set."""
    pii_hash_key_source: SecretRef | None = None
    """The installation's key for the Guardrails' `hash` strategy (chart: a generated Secret):
    a Secret in the installation namespace whose `key` holds it. The operator copies it into
    each Agent's model Secret; runtimes then hash PII with HMAC-SHA256 under it, so a hashed
    SSN or email cannot be recomputed by whoever sees the hash (the model included). None:
    plain SHA-256."""
    state_volume: StateVolumeSettings = Field(default_factory=StateVolumeSettings)
    run_as_user: int = 65532

    @property
    def uses_database(self) -> bool:
        """The runtimes keep their state in PostgreSQL, not in per-pod SQLite."""
        return bool(self.database_secret or self.database_source)


class GatewayAuthSettings(Settings):
    audience: str = "fleetward-gateway"
    issuer: str = "fleetward"
    leeway_seconds: int = Field(default=5, ge=0, le=30)
    hs256_secret: SecretRef | None = None
    """Secret (installation namespace) holding the HS256 key users' tokens are signed with."""
    jwks_url: str | None = None
    """JWKS of an identity provider (RS256/ES256/EdDSA), instead of HS256."""
    allow_query_token: bool = False
    trust_bundle: bool = True
    """Also accept tokens signed by agents' keys, watched in the trust-bundle ConfigMap through
    the Kubernetes API, so that a key the kill switch removes is refused (and its connections
    closed) within a second. The gateway pods then run as the ServiceAccount named like the
    gateway, which may only get/list/watch that one ConfigMap (created by the Helm chart)."""


class GatewayAutoscaling(Settings):
    min_replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=10, ge=1)
    target_cpu_utilization_percentage: int = Field(default=70, ge=1, le=100, alias="targetCPUUtilizationPercentage")


class GatewaySettings(Settings):
    """The WebSocket gateway the operator runs in the installation namespace (SPEC §5)."""

    enabled: bool = True
    name: str = "fleetward-gateway"
    image: str = "ghcr.io/fleetward/fleetward-gateway:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    command: list[str] = Field(default_factory=lambda: ["fleetward-gateway"])
    port: int = Field(default=8080, ge=1, le=65535)
    replicas: int = Field(default=2, ge=0, le=1000)
    autoscaling: GatewayAutoscaling | None = None
    resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}
    )
    max_connections: int = Field(default=10000, ge=1)
    auth: GatewayAuthSettings = Field(default_factory=GatewayAuthSettings)
    kafka_credentials: SecretRef | None = None
    """Secret with `username` and `password` for the gateway's Kafka principal (SASL)."""


class WebhookSettings(Settings):
    """The admission webhook the operator serves (KillSwitch identities, SPEC §2). The
    chart creates its certificate and the webhook configurations with their caBundle."""

    enabled: bool = False
    listen_address: str = "0.0.0.0"
    """Where to listen; the local cluster (no Service networking) uses 127.0.0.1."""
    port: int = Field(default=9443, ge=1, le=65535)
    cert_file: str = "/var/run/fleetward/webhook/tls.crt"
    key_file: str = "/var/run/fleetward/webhook/tls.key"


class TelemetrySettings(Settings):
    """Where the runtimes and the gateway export their traces (SPEC §8)."""

    otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://\S+$", max_length=2048)
    """OTLP/HTTP endpoint (e.g. http://otel-collector.observability:4318), set as
    OTEL_EXPORTER_OTLP_ENDPOINT in every runtime and gateway pod; unset: no export. An
    Agent's own `spec.deployment.env` can override it for that Agent."""


class AuditSettings(Settings):
    """Where the operator's audit records go (SPEC §8)."""

    dsn_env: str = "FLEETWARD_AUDIT_DSN"
    """Environment variable with the DSN (postgresql://...), set from a Secret by the chart."""
    sqlite_path: str = "/var/tmp/fleetward-audit.db"
    """Embedded default when no DSN is set: kept only as long as the operator pod."""


class OperatorSettings(Settings):
    installation_id: str = Field(default="fleetward", min_length=1, max_length=253)
    """Names this installation: the `iss` of tool tokens, the field manager's peers."""
    namespace: str = Field(
        default_factory=lambda: os.environ.get("POD_NAMESPACE", "fleetward-system"),
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
    )
    """Installation namespace: trust bundle, gateway, peering."""
    watch_namespaces: list[str] = Field(default_factory=list)
    """Namespaces whose Agents, SOPs and Guardrails are reconciled; empty = the whole cluster."""
    exclude_namespaces: list[str] = Field(default_factory=list)
    """Glob patterns of namespaces this installation leaves alone (e.g. ones another
    Fleetward installation owns), applied on top of watchNamespaces."""
    trust_bundle_name: str = "fleetward-trust-bundle"
    resync_seconds: float = Field(default=60.0, ge=5)
    """How often every Agent is re-checked for drift, whatever happened."""
    max_concurrent_reconciles: int = Field(default=64, ge=1, le=1024)
    """Agents reconciled at once; reconciles mostly wait on I/O, so this is cheap."""
    api_connections: int = Field(default=64, ge=4, le=512)
    """Connections the operator keeps to the API server for its own requests (Kopf gets as
    many again, plus one per watch stream). Each is a TLS session that costs ~300 KiB of
    the operator's memory and a handshake on the API server; requests beyond this wait
    their turn. Measured at 1000 Agents (docs/bench/operator.md): 64 kept the time of
    128, 32 made reconciles wait for connections."""
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    peering: str | None = "fleetward"
    """Kopf peering name: replicas coordinate so that only one acts. None: standalone."""
    model_prices: dict[Annotated[str, Field(min_length=1, max_length=256)], ModelPricing] = Field(default_factory=dict)
    """Installation-wide price table, by model name (`spec.model.name`), USD per million
    tokens; an Agent's `model.pricing` overrides it. Rendered into each Agent's runtime config
    for its own models only."""

    @property
    def clusterwide(self) -> bool:
        return not self.watch_namespaces

    @property
    def kopf_prefix(self) -> str:
        """Where Kopf keeps its handler progress and diff-base on the objects, and the
        finalizer's domain. Unique per installation (its namespace), because the
        cluster-scoped KillSwitches are handled by every installation: with one shared
        prefix, the first installation to handle a change marked it handled for all of
        them, and the others never ran their handlers for it."""
        return f"{self.namespace}.kopf.fleetward.dev"

    @property
    def finalizer(self) -> str:
        return f"{self.namespace}.fleetward.dev/cleanup"

    def owns_namespace(self, namespace: str | None) -> bool:
        return namespace is None or not any(fnmatch.fnmatchcase(namespace, p) for p in self.exclude_namespaces)


class SettingsError(ValueError):
    pass


def load(path: Path | None) -> OperatorSettings:
    """Settings from a YAML file (None: defaults). Errors name the field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SettingsError(f"cannot read settings file {path}: {e}") from e
        if not isinstance(data, dict):
            raise SettingsError(f"settings file {path}: expected a mapping at the top level")
    try:
        return OperatorSettings.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise SettingsError(f"settings file {path}: {problems}") from e
