"""The operator's desired gateway objects, from the settings the Helm chart renders."""

from __future__ import annotations

import pytest
from fleetward.operator.desired.gateway import desired_gateway
from fleetward.operator.settings import OperatorSettings
from pydantic import ValidationError


def _env(dep: dict) -> dict[str, str]:
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_gateway_follows_the_topic_names_and_auth_settings():
    settings = OperatorSettings.model_validate(
        {
            "namespace": "fw",
            "topics": {"events": "acme.events", "requestPrefix": "acme.requests"},
            "gateway": {"replicas": 3, "auth": {"hs256Secret": {"name": "gw-auth", "key": "hs256"}, "issuer": "acme"}},
            "kafka": {"bootstrapServers": "kafka:9092"},
        }
    )
    objects, absent = desired_gateway(settings)
    dep = next(o for o in objects if o["kind"] == "Deployment")
    env = _env(dep)
    assert dep["metadata"]["namespace"] == "fw" and dep["spec"]["replicas"] == 3
    assert env["FLEETWARD_GATEWAY_EVENTS_TOPIC"] == "acme.events"
    assert env["FLEETWARD_GATEWAY_REQUESTS_TOPIC_PREFIX"] == "acme.requests"
    assert env["FLEETWARD_GATEWAY_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["FLEETWARD_GATEWAY_JWT_ISSUER"] == "acme"
    assert env["FLEETWARD_GATEWAY_JWT_HS256_SECRET"] == {"secretKeyRef": {"name": "gw-auth", "key": "hs256"}}
    assert env["FLEETWARD_GATEWAY_ALLOW_QUERY_TOKEN"] == "false"
    assert absent == [("HorizontalPodAutoscaler", "fleetward-gateway")]
    assert any(o["kind"] == "Service" for o in objects)


def test_autoscaling_gives_the_replicas_to_an_hpa():
    settings = OperatorSettings.model_validate({"gateway": {"autoscaling": {"minReplicas": 2, "maxReplicas": 8}}})
    objects, absent = desired_gateway(settings)
    dep = next(o for o in objects if o["kind"] == "Deployment")
    hpa = next(o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    assert "replicas" not in dep["spec"] and hpa["spec"]["maxReplicas"] == 8 and not absent


def _pod(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def test_trust_bundle_is_on_by_default_and_names_the_configmap_and_service_account():
    settings = OperatorSettings.model_validate(
        {"namespace": "fw", "trustBundleName": "acme-bundle", "gateway": {"name": "acme-gateway"}}
    )
    assert settings.gateway.auth.trust_bundle is True
    dep = next(o for o in desired_gateway(settings)[0] if o["kind"] == "Deployment")
    env = _env(dep)
    assert env["FLEETWARD_GATEWAY_TRUST_BUNDLE_CONFIGMAP"] == "acme-bundle"
    assert env["FLEETWARD_GATEWAY_TRUST_BUNDLE_NAMESPACE"] == "fw"
    # The watch needs the pod's service-account token; the chart creates this account and its Role.
    assert _pod(dep)["serviceAccountName"] == "acme-gateway"
    assert _pod(dep)["automountServiceAccountToken"] is True


def test_trust_bundle_off_keeps_the_pod_without_api_credentials():
    settings = OperatorSettings.model_validate(
        {"gateway": {"auth": {"trustBundle": False, "hs256Secret": {"name": "gw-auth", "key": "hs256"}}}}
    )
    dep = next(o for o in desired_gateway(settings)[0] if o["kind"] == "Deployment")
    env = _env(dep)
    assert not any(k.startswith("FLEETWARD_GATEWAY_TRUST_BUNDLE") for k in env)
    assert _pod(dep)["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in _pod(dep)
    assert "FLEETWARD_GATEWAY_JWT_HS256_SECRET" in env


def test_a_jwks_url_replaces_the_hs256_secret():
    """The gateway takes one of HS256 and a JWKS (the trust bundle may join either): with both
    set, the JWKS URL is used, so a chart that always names the HS256 Secret still starts."""
    settings = OperatorSettings.model_validate(
        {
            "gateway": {
                "auth": {"jwksUrl": "https://idp.example/jwks", "hs256Secret": {"name": "gw-auth", "key": "hs256"}}
            }
        }
    )
    dep = next(o for o in desired_gateway(settings)[0] if o["kind"] == "Deployment")
    env = _env(dep)
    assert env["FLEETWARD_GATEWAY_JWKS_URL"] == "https://idp.example/jwks"
    assert "FLEETWARD_GATEWAY_JWT_HS256_SECRET" not in env
    assert "FLEETWARD_GATEWAY_TRUST_BUNDLE_CONFIGMAP" in env


def test_unknown_gateway_auth_setting_is_named():
    with pytest.raises(ValidationError, match="trustBundel"):
        OperatorSettings.model_validate({"gateway": {"auth": {"trustBundel": False}}})


def test_an_otlp_endpoint_reaches_the_gateway_pods():
    otlp = "http://otel-collector.observability:4318"
    dep = next(
        o
        for o in desired_gateway(OperatorSettings(namespace="fw", telemetry={"otlpEndpoint": otlp}))[0]
        if o["kind"] == "Deployment"
    )
    assert _env(dep)["OTEL_EXPORTER_OTLP_ENDPOINT"] == otlp
    dep = next(o for o in desired_gateway(OperatorSettings(namespace="fw"))[0] if o["kind"] == "Deployment")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in _env(dep)
