"""The rendered runtime config: what the operator hands one Agent's runtime pods.

The operator renders it into the Agent's config ConfigMap (`config.json`); `fleetward
runtime run` loads and validates it with this model, so operator and runtime share one
contract (SPEC §3). Its JSON Schema is generated from this model like the CRDs
(`schemas/runtime-config.schema.json`).

Secrets are never inlined: the config names files (mounted Secret volumes) and
environment variables where the runtime finds them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from fleetward.api.agent import AgentSpec, ModelPricing
from fleetward.api.base import ApiModel
from fleetward.api.guardrail import GuardrailSpec
from fleetward.api.sop import SOPSpec

SCHEMA = "fleetward.runtime-config.v1"


class AgentIdentity(ApiModel):
    namespace: str
    name: str
    uid: str | None = None
    generation: int | None = None

    @property
    def ref(self) -> str:
        """`namespace/name`, as in events, tokens and the trust bundle."""
        return f"{self.namespace}/{self.name}"


class ResolvedSOP(ApiModel):
    name: str
    version: str
    spec: SOPSpec


class ResolvedGuardrail(ApiModel):
    name: str
    spec: GuardrailSpec


class Topics(ApiModel):
    """Kafka topic names (SPEC §6)."""

    request: str
    """This agent's request topic."""
    events: str = "fleetward.events"
    control: str = "fleetward.control"
    control_acks: str = "fleetward.control-acks"
    alerts: str = "fleetward.alerts"
    dlq: str = "fleetward.dlq"
    audit: str = "fleetward.audit"
    routes: dict[str, str] = Field(default_factory=dict)
    """Router only: classification topic -> the specialist's request topic."""


class KafkaClient(ApiModel):
    """How the runtime reaches Kafka. The SASL password, when there is one, is read from
    `passwordFile` (the agent's credentials Secret)."""

    bootstrap_servers: str = Field(min_length=1)
    security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = None
    username: str | None = None
    password_file: str | None = None
    consumer_group: str
    """Consumer group of this agent's replicas on its request topic."""


class ModelCredential(ApiModel):
    """Where the API key of the primary model (index 0) or a fallback (1..n) is mounted."""

    index: int = Field(ge=0)
    api_key_file: str | None = None
    """None: the model needs no key."""


class Credentials(ApiModel):
    signing_key_file: str
    """PEM Ed25519 private key that signs tool tokens."""
    key_id: str
    """The key's `kid` in the trust bundle; a new key rolls the pods."""
    models: list[ModelCredential] = Field(default_factory=list)
    pii_hash_key_file: str | None = None
    """The installation's key for the Guardrails' `hash` strategy (HMAC-SHA256, trailing
    newline ignored, as `fleetward guardrail scan --hash-key-file` reads it). None: plain
    SHA-256, which anyone can recompute for guessable values (a runtime run by hand)."""


class TrustBundleRef(ApiModel):
    namespace: str
    name: str = "fleetward-trust-bundle"
    key: str = "jwks.json"


class Installation(ApiModel):
    id: str = Field(default="fleetward", min_length=1, max_length=253)
    """Issuer (`iss`) of the tool tokens this installation's runtimes mint."""
    namespace: str
    """Namespace the operator, trust bundle and gateway live in."""
    trust_bundle: TrustBundleRef


class Persistence(ApiModel):
    """Checkpoints and ledgers: PostgreSQL when `dsnEnv` is set in the pod, else SQLite."""

    dsn_env: str | None = None
    """Environment variable holding the PostgreSQL DSN (from a Secret), if any."""
    sqlite_path: str = "/var/lib/fleetward/state.db"
    """Embedded default for a single replica."""


class Server(ApiModel):
    port: int = Field(default=8080, ge=1, le=65535)
    """Port of /healthz, /readyz and /metrics, on the pod IP."""


class RuntimeConfig(ApiModel):
    schema_: Literal["fleetward.runtime-config.v1"] = Field(default=SCHEMA, alias="schema")
    installation: Installation
    agent: AgentIdentity
    spec: AgentSpec
    sops: list[ResolvedSOP] = Field(default_factory=list)
    guardrails: list[ResolvedGuardrail] = Field(default_factory=list)
    topics: Topics
    kafka: KafkaClient
    credentials: Credentials
    persistence: Persistence = Field(default_factory=Persistence)
    server: Server = Field(default_factory=Server)
    model_prices: dict[str, ModelPricing] = Field(default_factory=dict)
    """USD per million tokens of each of this Agent's models (primary and fallbacks), by model
    name, as the operator resolved them: the Agent's `model.pricing`, else the installation's
    price table. Only this Agent's models, so a price change elsewhere does not roll its pods.
    A model missing here has no cost recorded."""
    config_hash: str = ""
    """Hash of everything above; the pod template carries it, so a change rolls the pods."""

    def content_hash(self) -> str:
        """A stable hash of the config without its own hash field."""
        body = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"config_hash"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_hash(self) -> RuntimeConfig:
        return self.model_copy(update={"config_hash": self.content_hash()})

    def to_json(self) -> str:
        return json.dumps(self.to_wire(), sort_keys=True, indent=1)


def load(text: str) -> RuntimeConfig:
    """Parse config.json; a pydantic ValidationError names the offending field."""
    return RuntimeConfig.model_validate_json(text)
