"""What should exist for one Agent (SPEC §3): pure functions from the Agent, its resolved
references and the operator settings to manifests. No I/O here; golden tests pin the
output (tests/unit/test_operator_desired.py).

Object names: `fw-<agent>` for the Deployment, ServiceAccount, Service, PDB and HPA;
`fw-<agent>-config`, `fw-<agent>-credentials`, `fw-<agent>-model` for the ConfigMap
and Secrets; `fw-<agent>-state` for the PersistentVolumeClaim of a single-replica
runtime's SQLite state. The prefix keeps them apart from a team's own objects in the namespace;
Agent names are at most 52 characters, so every name stays a valid DNS label.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetward.operator.desired.common import cpu_autoscaler
from fleetward.operator.settings import OperatorSettings

from fleetward.api.agent import AgentSpec, ModelPricing
from fleetward.api.runtimeconfig import (
    AgentIdentity,
    Credentials,
    Installation,
    KafkaClient,
    ModelCredential,
    Persistence,
    ResolvedGuardrail,
    ResolvedSOP,
    RuntimeConfig,
    Server,
    Topics,
    TrustBundleRef,
)

CONFIG_HASH_ANNOTATION = "fleetward.dev/config-hash"
AGENT_LABEL = "fleetward.dev/agent"
CONFIG_DIR = "/etc/fleetward/config"
CREDENTIALS_DIR = "/etc/fleetward/credentials"
MODEL_DIR = "/etc/fleetward/model"
SIGNING_KEY = "signing-key.pem"
KEY_ID = "key-id"
KAFKA_USERNAME = "kafka-username"
KAFKA_PASSWORD = "kafka-password"
DATABASE_DSN_ENV = "FLEETWARD_DATABASE_DSN"
DATABASE_HASH_ANNOTATION = "fleetward.dev/database-hash"
MODEL_CREDENTIALS_HASH_ANNOTATION = "fleetward.dev/model-credentials-hash"
PII_HASH_KEY_HASH_ANNOTATION = "fleetward.dev/pii-hash-key-hash"
STATE_DIR = "/var/lib/fleetward"


def base_name(agent: str) -> str:
    return f"fw-{agent}"


def config_map_name(agent: str) -> str:
    return f"fw-{agent}-config"


def credentials_secret_name(agent: str) -> str:
    return f"fw-{agent}-credentials"


def model_secret_name(agent: str) -> str:
    return f"fw-{agent}-model"


def database_secret_name(agent: str) -> str:
    return f"fw-{agent}-database"


def state_claim_name(agent: str) -> str:
    return f"fw-{agent}-state"


def model_key_name(index: int) -> str:
    """Key of the model API key in the per-agent model Secret: 0 = primary, 1.. = fallbacks."""
    return f"api-key-{index}"


PII_HASH_KEY = "pii-hash-key"
"""Key of the installation's PII hash key in the per-agent model Secret."""


def kafka_principal(namespace: str, agent: str) -> str:
    """SCRAM username of an Agent (dots are legal in SCRAM names and cannot appear in
    Kubernetes names, so the pair stays unambiguous)."""
    return f"fleetward.{namespace}.{agent}"


def labels(agent: str, component: str = "runtime") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "fleetward-agent",
        "app.kubernetes.io/instance": agent,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "fleetward",
        "app.kubernetes.io/managed-by": "fleetward",
        AGENT_LABEL: agent,
    }


def selector_labels(agent: str) -> dict[str, str]:
    return {AGENT_LABEL: agent, "app.kubernetes.io/component": "runtime"}


@dataclass(frozen=True)
class AgentRef:
    """The Agent object's identity, as owner references need it."""

    namespace: str
    name: str
    uid: str
    generation: int | None = None

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": "fleetward.dev/v1alpha1",
            "kind": "Agent",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, component: str = "runtime") -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": labels(self.name, component),
            "ownerReferences": [self.owner_reference()],
        }


@dataclass
class AgentInputs:
    """Everything the desired state depends on. Same inputs, same output."""

    ref: AgentRef
    spec: AgentSpec
    settings: OperatorSettings
    sops: list[ResolvedSOP] = field(default_factory=list)
    guardrails: list[ResolvedGuardrail] = field(default_factory=list)
    key_id: str = ""
    kafka_username: str | None = None
    model_keys: dict[int, bytes] = field(default_factory=dict)
    """Model API keys by index (0 primary, 1.. fallbacks), copied from the referenced Secrets."""
    halted: bool = False
    """A kill switch covers the agent: scale to zero, like paused."""
    database_dsn: bytes | None = None
    """The installation's PostgreSQL DSN (settings runtime.databaseSource), to copy into the
    Agent's namespace; None without one."""
    pii_hash_key: bytes | None = None
    """The installation's PII hash key (settings runtime.piiHashKeySource), copied into the
    model Secret; None without one."""

    @property
    def scaled_down(self) -> bool:
        return self.spec.paused or self.halted


def request_topic(inputs: AgentInputs) -> str:
    return inputs.settings.topics.request_topic(inputs.ref.namespace, inputs.ref.name)


def model_prices(spec: AgentSpec, table: Mapping[str, ModelPricing]) -> dict[str, ModelPricing]:
    """The price of each of the Agent's models (primary, then fallbacks), by name: its own
    `pricing`, else the installation's table; unpriced models are left out. When two
    endpoints share a name, the first one's price counts (metrics are labelled by name)."""
    prices: dict[str, ModelPricing] = {}
    for endpoint in [spec.model, *(spec.model.fallbacks or [])]:
        price = endpoint.pricing or table.get(endpoint.name)
        if price is not None and endpoint.name not in prices:
            prices[endpoint.name] = price
    return prices


def runtime_config(inputs: AgentInputs) -> RuntimeConfig:
    s, ref, spec = inputs.settings, inputs.ref, inputs.spec
    topics = s.topics
    routes = {topic: topics.request_topic(ref.namespace, agent) for topic, agent in (spec.routes or {}).items()}
    if spec.fallback and spec.fallback.agent:
        routes["*"] = topics.request_topic(ref.namespace, spec.fallback.agent)
    kafka = KafkaClient(
        bootstrap_servers=s.kafka.bootstrap_servers,
        security_protocol=s.kafka.security_protocol,
        consumer_group=f"fleetward.{ref.namespace}.{ref.name}",
    )
    if s.kafka.principals_managed:
        kafka.sasl_mechanism = s.kafka.agent_sasl_mechanism
        kafka.username = inputs.kafka_username
        kafka.password_file = f"{CREDENTIALS_DIR}/{KAFKA_PASSWORD}"
    n_models = 1 + len(spec.model.fallbacks or [])
    config = RuntimeConfig(
        installation=Installation(
            id=s.installation_id,
            namespace=s.namespace,
            trust_bundle=TrustBundleRef(namespace=s.namespace, name=s.trust_bundle_name),
        ),
        agent=AgentIdentity(namespace=ref.namespace, name=ref.name),
        spec=spec,
        sops=inputs.sops,
        guardrails=inputs.guardrails,
        topics=Topics(
            request=request_topic(inputs),
            events=topics.events,
            control=topics.control,
            control_acks=topics.control_acks,
            alerts=topics.alerts,
            dlq=topics.dlq,
            audit=topics.audit,
            routes=routes,
        ),
        kafka=kafka,
        credentials=Credentials(
            signing_key_file=f"{CREDENTIALS_DIR}/{SIGNING_KEY}",
            key_id=inputs.key_id,
            models=[
                ModelCredential(
                    index=i, api_key_file=f"{MODEL_DIR}/{model_key_name(i)}" if i in inputs.model_keys else None
                )
                for i in range(n_models)
            ],
            pii_hash_key_file=f"{MODEL_DIR}/{PII_HASH_KEY}" if inputs.pii_hash_key else None,
        ),
        persistence=Persistence(dsn_env=DATABASE_DSN_ENV if s.runtime.uses_database else None),
        server=Server(port=s.runtime.port),
        model_prices=model_prices(spec, s.model_prices),
    )
    return config.with_hash()


def single_writer(spec: AgentSpec) -> bool:
    """At most one runtime pod at a time: no autoscaling and at most one replica (0 and
    paused included, so that pausing keeps the state)."""
    return spec.autoscaling is None and (spec.replicas is None or spec.replicas <= 1)


def state_volume_managed(settings: OperatorSettings) -> bool:
    """The installation keeps runtimes' SQLite state on claims: the setting is on and no
    PostgreSQL DSN is configured (with PostgreSQL the pods keep nothing worth keeping)."""
    return settings.runtime.state_volume.enabled and not settings.runtime.uses_database


def uses_state_claim(inputs: AgentInputs) -> bool:
    """The Agent's state lives on its claim `fw-<agent>-state`. Only for a single writer:
    SQLite is one-replica only, and a ReadWriteOnce claim shared by several pods would
    have them open one database file at once. Several replicas each keep an emptyDir."""
    return state_volume_managed(inputs.settings) and single_writer(inputs.spec)


def state_claim(inputs: AgentInputs) -> dict[str, Any]:
    """The runtime's state volume. ReadWriteOnce: one node mounts it, and with the
    Deployment's Recreate strategy one pod at a time. No storageClassName when the
    setting is empty, so the cluster's default class is filled in at creation."""
    volume = inputs.settings.runtime.state_volume
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": volume.size}},
    }
    if volume.storage_class_name:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": inputs.ref.metadata(state_claim_name(inputs.ref.name)),
        "spec": spec,
    }


def _state_volume(inputs: AgentInputs) -> dict[str, Any]:
    if uses_state_claim(inputs):
        return {"name": "state", "persistentVolumeClaim": {"claimName": state_claim_name(inputs.ref.name)}}
    return {"name": "state", "emptyDir": {}}


def _strategy(inputs: AgentInputs) -> dict[str, Any]:
    """Recreate with a state claim: the old pod is gone before the new one starts, so two
    SQLite writers never overlap and the ReadWriteOnce volume is never wanted twice.
    Otherwise a surge pod first, so the agent stays available through a roll."""
    if uses_state_claim(inputs):
        return {"type": "Recreate"}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def service_account(inputs: AgentInputs) -> dict[str, Any]:
    # The runtime needs no Kubernetes API access: no token in its pods.
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": inputs.ref.metadata(base_name(inputs.ref.name)),
        "automountServiceAccountToken": False,
    }


def config_map(inputs: AgentInputs, config: RuntimeConfig) -> dict[str, Any]:
    meta = inputs.ref.metadata(config_map_name(inputs.ref.name))
    meta["annotations"] = {CONFIG_HASH_ANNOTATION: config.config_hash}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"config.json": config.to_json()}}


def model_secret(inputs: AgentInputs) -> dict[str, Any]:
    """The per-agent copy of the referenced model credentials, and of the installation's PII
    hash key (revoked with them by a kill switch: nothing runs that would use it)."""
    data = {model_key_name(i): base64.b64encode(v).decode() for i, v in sorted(inputs.model_keys.items())}
    if inputs.pii_hash_key:
        data[PII_HASH_KEY] = base64.b64encode(inputs.pii_hash_key).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": inputs.ref.metadata(model_secret_name(inputs.ref.name), "credentials"),
        "data": data,
    }


def copies_database(settings: OperatorSettings) -> bool:
    """The installation's PostgreSQL is copied into each Agent's namespace
    (runtime.databaseSource, and no per-namespace databaseSecret of the team's own)."""
    return settings.runtime.database_source is not None and not settings.runtime.database_secret


def _digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()[:16]


def _model_keys_digest(keys: dict[int, bytes]) -> str:
    return _digest(b"".join(b"%d:%d:%s" % (i, len(v), v) for i, v in sorted(keys.items())))


def database_secret(inputs: AgentInputs) -> dict[str, Any]:
    """The per-agent copy of the installation's PostgreSQL DSN. Not revoked by a kill switch
    (unlike the key and model Secrets): it is no identity of the agent, and a runtime that
    restarts under a halt needs its checkpoints to start halted and to resume later."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": inputs.ref.metadata(database_secret_name(inputs.ref.name), "credentials"),
        "data": {"dsn": base64.b64encode(inputs.database_dsn or b"").decode()},
    }


def _resources(inputs: AgentInputs) -> dict[str, Any]:
    if inputs.spec.resources is not None:
        return inputs.spec.resources.to_wire()
    return inputs.settings.runtime.resources


def _env(inputs: AgentInputs) -> list[dict[str, Any]]:
    def field_ref(path: str) -> dict[str, Any]:
        return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [
        {"name": "POD_IP", **field_ref("status.podIP")},
        {"name": "POD_NAME", **field_ref("metadata.name")},
        {"name": "POD_NAMESPACE", **field_ref("metadata.namespace")},
        {"name": "FLEETWARD_CONFIG", "value": f"{CONFIG_DIR}/config.json"},
        {"name": "TMPDIR", "value": "/var/tmp"},
    ]
    rt = inputs.settings.runtime
    if rt.uses_database:
        name = rt.database_secret or database_secret_name(inputs.ref.name)
        env.append({"name": DATABASE_DSN_ENV, "valueFrom": {"secretKeyRef": {"name": name, "key": "dsn"}}})
    if inputs.settings.telemetry.otlp_endpoint:
        env.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": inputs.settings.telemetry.otlp_endpoint})
    options = inputs.spec.deployment
    own = [e.to_wire() for e in (options.env if options and options.env else [])]
    # The Agent's own entries win. One entry per name: server-side apply keys `env` by
    # name and refuses an apply that names a variable twice.
    mine = {e["name"] for e in own}
    return [e for e in env if e["name"] not in mine] + own


def deployment(inputs: AgentInputs, config: RuntimeConfig) -> dict[str, Any]:
    ref, spec, rt = inputs.ref, inputs.spec, inputs.settings.runtime
    options = spec.deployment
    pod_labels = {**labels(ref.name), **(options.pod_labels if options and options.pod_labels else {})}
    pod_annotations = {
        **(options.pod_annotations if options and options.pod_annotations else {}),
        CONFIG_HASH_ANNOTATION: config.config_hash,
        # The DSN reaches the pod as an environment variable, read once at start: a changed
        # one (a rotated password) rolls the pods.
        **({DATABASE_HASH_ANNOTATION: _digest(inputs.database_dsn)} if inputs.database_dsn else {}),
        # Likewise the model API keys: the runtime builds its model clients once, at start,
        # so a rotated key in the referenced Secret (copied at the next reconcile) rolls them.
        **({MODEL_CREDENTIALS_HASH_ANNOTATION: _model_keys_digest(inputs.model_keys)} if inputs.model_keys else {}),
        # And the PII hash key, read once at start: a rotated one rolls them too.
        **({PII_HASH_KEY_HASH_ANNOTATION: _digest(inputs.pii_hash_key)} if inputs.pii_hash_key else {}),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(rt.port),
        "prometheus.io/path": "/metrics",
    }
    probe = {
        "httpGet": {"path": "/readyz", "port": "http"},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }
    container = {
        "name": "runtime",
        "image": spec.image or rt.image,
        "imagePullPolicy": rt.image_pull_policy,
        "command": list(rt.command),  # SPEC §3: `fleetward runtime run`; the config is $FLEETWARD_CONFIG
        "env": _env(inputs),
        "ports": [{"name": "http", "containerPort": rt.port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {
            **probe,
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "initialDelaySeconds": 5,
        },
        "resources": _resources(inputs),
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True},
            {"name": "model", "mountPath": MODEL_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE_DIR},
            # Writable temp space on a read-only root: /var/tmp, named by TMPDIR. (Not /tmp: on
            # the local cluster's podlet a volume there would hide a checkout living in /tmp.)
            {"name": "tmp", "mountPath": "/var/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": base_name(ref.name),
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": options.termination_grace_period_seconds if options else 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": rt.run_as_user,
            "runAsGroup": rt.run_as_user,
            "fsGroup": rt.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(ref.name)}},
            {"name": "credentials", "secret": {"secretName": credentials_secret_name(ref.name), "defaultMode": 0o440}},
            {"name": "model", "secret": {"secretName": model_secret_name(ref.name), "defaultMode": 0o440}},
            _state_volume(inputs),
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        ],
    }
    if options:
        if options.node_selector:
            pod_spec["nodeSelector"] = options.node_selector
        if options.tolerations:
            pod_spec["tolerations"] = [t.to_wire() for t in options.tolerations]
        if options.affinity:
            pod_spec["affinity"] = options.affinity
        if options.priority_class_name:
            pod_spec["priorityClassName"] = options.priority_class_name
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(ref.name)},
        "revisionHistoryLimit": 3,
        "strategy": _strategy(inputs),
        "template": {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec},
    }
    # With autoscaling the HPA owns .spec.replicas; applying it here would fight the HPA.
    if inputs.scaled_down:
        dep_spec["replicas"] = 0
    elif spec.autoscaling is None:
        dep_spec["replicas"] = 1 if spec.replicas is None else spec.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ref.metadata(base_name(ref.name)),
        "spec": dep_spec,
    }


def service(inputs: AgentInputs) -> dict[str, Any]:
    # Headless: the Service exists so that Prometheus finds every runtime pod through its
    # endpoints and scrapes each one; a virtual IP would spread scrapes across replicas,
    # and allocating one is the slowest write of a new Agent (measured: ~9 s per Service
    # with 1000 Agents applied at once, while every other object took ~0.1 s).
    port = inputs.settings.runtime.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": inputs.ref.metadata(base_name(inputs.ref.name)),
        "spec": {
            "clusterIP": "None",
            # A runtime that is not ready (Kafka down, a bad key) is the one whose metrics
            # matter most, so it is listed from the moment its pod has an IP.
            "publishNotReadyAddresses": True,
            "selector": selector_labels(inputs.ref.name),
            "ports": [{"name": "http-metrics", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(inputs: AgentInputs) -> dict[str, Any]:
    # maxUnavailable 1: a voluntary disruption takes at most one runtime pod at a time,
    # and a single-replica agent never blocks a node drain.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": inputs.ref.metadata(base_name(inputs.ref.name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(inputs.ref.name)}},
    }


def horizontal_pod_autoscaler(inputs: AgentInputs) -> dict[str, Any] | None:
    scaling = inputs.spec.autoscaling
    if scaling is None or inputs.scaled_down:
        return None
    name = base_name(inputs.ref.name)
    return cpu_autoscaler(
        inputs.ref.metadata(name),
        name,
        scaling.min_replicas,
        scaling.max_replicas,
        scaling.target_cpu_utilization_percentage,
    )


@dataclass
class DesiredAgent:
    config: RuntimeConfig
    objects: list[dict[str, Any]]
    """Objects to server-side apply, in order (the Deployment last: what it mounts exists first)."""
    absent: list[tuple[str, str]]
    """(kind, name) of optional objects that must not exist (e.g. the HPA when autoscaling is off)."""


def state_claim_absent(inputs: AgentInputs) -> bool:
    """The claim must not exist: the installation manages state claims but this Agent runs
    several pods (its old single-writer state would be mounted by none of them). When the
    installation does not manage claims at all (PostgreSQL, or the setting off), a claim
    left from before is not touched: it holds the only copy of that state, and goes with
    the Agent (owner reference)."""
    return state_volume_managed(inputs.settings) and not uses_state_claim(inputs)


def desired_agent(inputs: AgentInputs) -> DesiredAgent:
    config = runtime_config(inputs)
    objects = [
        service_account(inputs),
        config_map(inputs, config),
        model_secret(inputs),
        *([database_secret(inputs)] if copies_database(inputs.settings) else []),
        service(inputs),
        pod_disruption_budget(inputs),
    ]
    absent: list[tuple[str, str]] = []
    if uses_state_claim(inputs):
        objects.append(state_claim(inputs))
    elif state_claim_absent(inputs):
        absent.append(("PersistentVolumeClaim", state_claim_name(inputs.ref.name)))
    hpa = horizontal_pod_autoscaler(inputs)
    if hpa is None:
        absent.append(("HorizontalPodAutoscaler", base_name(inputs.ref.name)))
    objects.append(deployment(inputs, config))
    if hpa is not None:
        objects.append(hpa)
    return DesiredAgent(config=config, objects=objects, absent=absent)
