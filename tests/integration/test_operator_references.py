"""SOPs and Guardrails drive exactly the Agents that use them; missing references and
Secrets are conditions that clear on their own; deletion cleans up outside Kubernetes."""

from __future__ import annotations

import json
import time

from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from tests.support.agents import (
    GROUP,
    VERSION,
    agent,
    condition,
    custom,
    guardrail,
    model_secret,
    sop,
    wait_agent,
    wait_ready,
)
from tests.support.argocd import evaluate, health_script


def _apply(api, ns, *objs):
    for o in objs:
        apply_manifest(api, json.dumps(o), ns)


def _pods(core, ns, agent_name):
    return {
        p.metadata.uid
        for p in core.list_namespaced_pod(ns, label_selector=f"fleetward.dev/agent={agent_name}").items
        if p.metadata.deletion_timestamp is None
    }


def test_editing_an_sop_rolls_only_the_agents_that_select_it(api, core, fleetward, namespace):
    _apply(
        api,
        namespace,
        model_secret(namespace),
        sop(namespace, "refunds", {"domain": "billing"}),
        sop(namespace, "lockout", {"domain": "security"}),
        agent(namespace, "billing"),
        agent(namespace, "security", domain="security"),
    )
    billing, security = wait_ready(api, namespace, "billing"), wait_ready(api, namespace, "security")
    billing_pods, security_pods = _pods(core, namespace, "billing"), _pods(core, namespace, "security")
    refunds = custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, "sops", "refunds")
    wait_for(
        lambda: (
            (
                custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, "sops", "refunds").get("status")
                or {}
            ).get("usedBy")
            == ["billing"]
        ),
        60,
        "SOP refunds usedBy [billing]",
    )
    assert refunds["metadata"]["generation"] >= 1

    _apply(api, namespace, sop(namespace, "refunds", {"domain": "billing"}, version="1.1.0"))
    after = wait_agent(
        api,
        namespace,
        "billing",
        lambda a: (
            a["status"].get("resolvedSOPs") == ["refunds@1.1.0"]
            and a["status"]["configHash"] != billing["status"]["configHash"]
        ),
        60,
        "the new SOP version",
    )
    dep = client.AppsV1Api(api).read_namespaced_deployment("fw-billing", namespace)
    assert dep.spec.template.metadata.annotations["fleetward.dev/config-hash"] == after["status"]["configHash"]
    # billing's pods are replaced by ones on the new config ...
    wait_for(
        lambda: _pods(core, namespace, "billing") and not (_pods(core, namespace, "billing") & billing_pods),
        90,
        "billing's pods replaced",
    )
    wait_ready(api, namespace, "billing")
    # ... while security keeps its config and its very pods.
    assert (
        custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, "agents", "security")["status"][
            "configHash"
        ]
        == security["status"]["configHash"]
    )
    assert _pods(core, namespace, "security") == security_pods


def test_missing_references_are_conditions_that_clear_on_their_own(api, core, fleetward, namespace):
    _apply(
        api,
        namespace,
        sop(namespace, "refunds", {"domain": "billing"}),
        agent(namespace, "billing", guardrails=("pii",), secret="later"),
    )
    obj = wait_agent(
        api,
        namespace,
        "billing",
        lambda a: (
            (condition(a, "ConfigResolved") or {}).get("status") == "False"
            and (condition(a, "CredentialsIssued") or {}).get("status") == "False"
        ),
        60,
        "both blocked",
    )
    cfg, creds, ready = condition(obj, "ConfigResolved"), condition(obj, "CredentialsIssued"), condition(obj, "Ready")
    assert cfg["reason"] == "GuardrailNotFound" and "pii" in cfg["message"]
    assert creds["reason"] == "SecretNotFound" and "later" in creds["message"]
    assert ready["status"] == "False" and obj["status"]["phase"] == "Degraded"
    # Argo CD (argocd/ health checks, run as Argo CD runs them) shows it Degraded, naming why.
    health, _ = evaluate(health_script("Agent"), obj)
    assert health["status"] == "Degraded" and "GuardrailNotFound" in health["message"], health
    try:
        client.AppsV1Api(api).read_namespaced_deployment("fw-billing", namespace)
        raise AssertionError("a runtime was deployed without its Guardrail and credentials")
    except client.exceptions.ApiException as e:
        assert e.status == 404

    # A Secret without the named key: a different, precise reason.
    _apply(api, namespace, model_secret(namespace, "later", key="wrong-key"))
    obj = wait_agent(
        api,
        namespace,
        "billing",
        lambda a: (condition(a, "CredentialsIssued") or {}).get("reason") == "SecretKeyNotFound",
        60,
        "SecretKeyNotFound",
    )
    assert "api-key" in condition(obj, "CredentialsIssued")["message"]

    # Creating what was missing is all it takes.
    _apply(api, namespace, guardrail(namespace, "pii"), model_secret(namespace, "later"))
    obj = wait_ready(api, namespace, "billing", timeout=120)
    assert obj["status"]["resolvedGuardrails"] == ["pii"]
    assert evaluate(health_script("Agent"), obj)[0]["status"] == "Healthy"
    sop_obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "fleetward.dev", "v1alpha1", namespace, "sops", "refunds"
    )
    assert evaluate(health_script("SOP"), sop_obj)[0]["status"] == "Healthy"
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=billing").items
    reasons = {(e.type, e.reason) for e in events if e.involved_object.kind == "Agent"}
    assert ("Normal", "Ready") in reasons, reasons
    assert any(t == "Warning" for t, _ in reasons), reasons


def test_deleting_an_agent_removes_everything_it_had(api, core, kafka, fleetward, namespace):
    _apply(api, namespace, model_secret(namespace), agent(namespace, "billing"))
    obj = wait_ready(api, namespace, "billing")
    topic = obj["status"]["requestTopic"]
    assert topic in kafka.admin().list_topics(timeout=10).topics

    def bundle_agents() -> set[str]:
        cm = core.read_namespaced_config_map("fleetward-trust-bundle", fleetward)
        return {k["agent"] for k in json.loads(cm.data["jwks.json"])["keys"]}

    assert f"{namespace}/billing" in bundle_agents()
    custom(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, "agents", "billing")
    wait_for(lambda: f"{namespace}/billing" not in bundle_agents(), 30, "the key leaves the trust bundle")
    wait_for(lambda: topic not in kafka.admin().list_topics(timeout=10).topics, 30, "the request topic is deleted")

    def gone() -> bool:
        apps = client.AppsV1Api(api)
        left = [d.metadata.name for d in apps.list_namespaced_deployment(namespace).items]
        left += [
            s.metadata.name for s in core.list_namespaced_secret(namespace).items if s.metadata.name.startswith("fw-")
        ]
        left += [
            c.metadata.name
            for c in core.list_namespaced_config_map(namespace).items
            if c.metadata.name.startswith("fw-")
        ]
        left += [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
        return not left

    wait_for(gone, 60, "the Agent's objects garbage-collected")
    start = time.monotonic()
    wait_for(lambda: _agent_gone(api, namespace), 30, "the Agent itself gone (finalizer released)")
    assert time.monotonic() - start < 30


def _agent_gone(api, ns) -> bool:
    try:
        custom(api).get_namespaced_custom_object(GROUP, VERSION, ns, "agents", "billing")
        return False
    except client.exceptions.ApiException as e:
        return e.status == 404


def test_paused_scales_to_zero_and_says_so(api, core, fleetward, namespace):
    _apply(api, namespace, model_secret(namespace), agent(namespace, "billing"))
    wait_ready(api, namespace, "billing")
    _apply(api, namespace, agent(namespace, "billing", paused=True))
    obj = wait_agent(
        api,
        namespace,
        "billing",
        lambda a: a["status"].get("phase") == "Paused" and a["status"].get("readyReplicas") == 0,
        60,
        "Paused",
    )
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Paused" and "scaled to zero" in ready["message"]
    assert evaluate(health_script("Agent"), obj)[0]["status"] == "Suspended"
    assert client.AppsV1Api(api).read_namespaced_deployment("fw-billing", namespace).spec.replicas == 0
    wait_for(lambda: not _pods(core, namespace, "billing"), 60, "the runtime pods gone")
    _apply(api, namespace, agent(namespace, "billing", paused=False))
    wait_ready(api, namespace, "billing")
