"""The operator's desired gateway objects, from the settings the Helm chart renders."""

from __future__ import annotations

from fleetward.operator.desired.gateway import desired_gateway
from fleetward.operator.settings import OperatorSettings


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
