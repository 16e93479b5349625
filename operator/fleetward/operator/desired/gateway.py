"""The gateway of one installation (SPEC §3, §5): a Deployment of `fleetward-gateway`, its
Service and, with autoscaling, an HPA, in the installation namespace, configured from the
operator settings (Helm values) and kept in step with the topic names and the trust bundle.
Pure functions.

With `gateway.auth.trustBundle` (the default) the gateway also accepts tokens signed by agent
keys and watches the trust-bundle ConfigMap through the Kubernetes API to refuse removed keys
at once (SPEC §7). Its pods then run as the ServiceAccount named like the gateway, with its
token mounted; the Helm chart creates that ServiceAccount and a Role allowing only
get/list/watch of the trust-bundle ConfigMap (the operator itself creates no RBAC objects:
it would need the `bind`/`escalate` verbs for that)."""

from __future__ import annotations

from typing import Any

from fleetward.operator.desired.common import cpu_autoscaler
from fleetward.operator.settings import OperatorSettings

COMPONENT = "gateway"


def labels(settings: OperatorSettings) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "fleetward-gateway",
        "app.kubernetes.io/instance": settings.gateway.name,
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/part-of": "fleetward",
        "app.kubernetes.io/managed-by": "fleetward",
    }


def selector(settings: OperatorSettings) -> dict[str, str]:
    return {"app.kubernetes.io/instance": settings.gateway.name, "app.kubernetes.io/component": COMPONENT}


def _meta(settings: OperatorSettings) -> dict[str, Any]:
    return {"name": settings.gateway.name, "namespace": settings.namespace, "labels": labels(settings)}


def _env(settings: OperatorSettings) -> list[dict[str, Any]]:
    gw, kafka, topics = settings.gateway, settings.kafka, settings.topics
    plain = {
        "FLEETWARD_GATEWAY_LISTEN": f"$(POD_IP):{gw.port}",
        "FLEETWARD_GATEWAY_KAFKA_BOOTSTRAP": kafka.bootstrap_servers,
        "FLEETWARD_GATEWAY_KAFKA_SECURITY_PROTOCOL": kafka.security_protocol,
        "FLEETWARD_GATEWAY_EVENTS_TOPIC": topics.events,
        "FLEETWARD_GATEWAY_CONTROL_TOPIC": topics.control,
        "FLEETWARD_GATEWAY_CONTROL_ACKS_TOPIC": topics.control_acks,
        "FLEETWARD_GATEWAY_ALERTS_TOPIC": topics.alerts,
        "FLEETWARD_GATEWAY_REQUESTS_TOPIC_PREFIX": topics.request_prefix,
        "FLEETWARD_GATEWAY_JWT_AUDIENCE": gw.auth.audience,
        "FLEETWARD_GATEWAY_JWT_ISSUER": gw.auth.issuer,
        "FLEETWARD_GATEWAY_JWT_LEEWAY_SECONDS": str(gw.auth.leeway_seconds),
        "FLEETWARD_GATEWAY_ALLOW_QUERY_TOKEN": "true" if gw.auth.allow_query_token else "false",
        "FLEETWARD_GATEWAY_MAX_CONNECTIONS": str(gw.max_connections),
        "FLEETWARD_GATEWAY_LOG_FORMAT": "json",
    }
    if kafka.sasl_mechanism:
        plain["FLEETWARD_GATEWAY_KAFKA_SASL_MECHANISM"] = kafka.sasl_mechanism
    if gw.auth.jwks_url:
        plain["FLEETWARD_GATEWAY_JWKS_URL"] = gw.auth.jwks_url
    if settings.telemetry.otlp_endpoint:
        plain["OTEL_EXPORTER_OTLP_ENDPOINT"] = settings.telemetry.otlp_endpoint
    if gw.auth.trust_bundle:
        plain["FLEETWARD_GATEWAY_TRUST_BUNDLE_CONFIGMAP"] = settings.trust_bundle_name
        plain["FLEETWARD_GATEWAY_TRUST_BUNDLE_NAMESPACE"] = settings.namespace
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        *({"name": k, "value": v} for k, v in plain.items()),
    ]
    # The gateway takes one of HS256 and a JWKS URL (beside the trust bundle): a JWKS URL wins.
    if gw.auth.hs256_secret and not gw.auth.jwks_url:
        env.append(
            {
                "name": "FLEETWARD_GATEWAY_JWT_HS256_SECRET",
                "valueFrom": {"secretKeyRef": {"name": gw.auth.hs256_secret.name, "key": gw.auth.hs256_secret.key}},
            }
        )
    if gw.kafka_credentials:
        ref = gw.kafka_credentials
        env += [
            {
                "name": "FLEETWARD_GATEWAY_KAFKA_SASL_USERNAME",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": "username"}},
            },
            {
                "name": "FLEETWARD_GATEWAY_KAFKA_SASL_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": "password"}},
            },
        ]
    return env


def _identity(settings: OperatorSettings) -> dict[str, Any]:
    """The pod's API identity: none without the trust bundle, else the gateway's
    ServiceAccount with its token mounted (the only API access it has is reading the bundle)."""
    if not settings.gateway.auth.trust_bundle:
        return {"automountServiceAccountToken": False}
    return {"serviceAccountName": service_account_name(settings), "automountServiceAccountToken": True}


def service_account_name(settings: OperatorSettings) -> str:
    """The gateway pods' ServiceAccount (created by the Helm chart with its Role)."""
    return settings.gateway.name


def deployment(settings: OperatorSettings) -> dict[str, Any]:
    gw = settings.gateway
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 2}
    container = {
        "name": "gateway",
        "image": gw.image,
        "imagePullPolicy": gw.image_pull_policy,
        "command": gw.command,
        "env": _env(settings),
        "ports": [{"name": "http", "containerPort": gw.port, "protocol": "TCP"}],
        "readinessProbe": probe,
        "livenessProbe": {
            **probe,
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": gw.resources,
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector(settings)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {
                "labels": labels(settings),
                "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(gw.port)},
            },
            "spec": {
                **_identity(settings),
                # Closing every WebSocket with 1001 takes up to the gateway's own grace.
                "terminationGracePeriodSeconds": 30,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [container],
            },
        },
    }
    if gw.autoscaling is None:
        spec["replicas"] = gw.replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(settings), "spec": spec}


def service(settings: OperatorSettings) -> dict[str, Any]:
    port = settings.gateway.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(settings),
        "spec": {
            "selector": selector(settings),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def horizontal_pod_autoscaler(settings: OperatorSettings) -> dict[str, Any] | None:
    scaling = settings.gateway.autoscaling
    if scaling is None:
        return None
    return cpu_autoscaler(
        _meta(settings),
        settings.gateway.name,
        scaling.min_replicas,
        scaling.max_replicas,
        scaling.target_cpu_utilization_percentage,
    )


def desired_gateway(settings: OperatorSettings) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(objects to apply, (kind, name) that must not exist)."""
    objects = [service(settings), deployment(settings)]
    hpa = horizontal_pod_autoscaler(settings)
    if hpa is None:
        return objects, [("HorizontalPodAutoscaler", settings.gateway.name)]
    return [*objects, hpa], []
