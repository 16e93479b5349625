"""The operator installed by `helm install` reconciles an Agent with SOPs, a Guardrail
and model credentials into a running, credentialed runtime (issue: operator)."""

from __future__ import annotations

import base64
import json
import subprocess

from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from tests.support.agents import agent, condition, guardrail, model_secret, sop, wait_ready

OWNED = [
    ("ServiceAccount", "fw-billing"),
    ("ConfigMap", "fw-billing-config"),
    ("Secret", "fw-billing-credentials"),
    ("Secret", "fw-billing-model"),
    ("Service", "fw-billing"),
    ("PodDisruptionBudget", "fw-billing"),
    ("Deployment", "fw-billing"),
]


def _read(api: client.ApiClient, kind: str, ns: str, name: str):
    core, apps, policy = client.CoreV1Api(api), client.AppsV1Api(api), client.PolicyV1Api(api)
    return {
        "ServiceAccount": core.read_namespaced_service_account,
        "ConfigMap": core.read_namespaced_config_map,
        "Secret": core.read_namespaced_secret,
        "Service": core.read_namespaced_service,
        "PodDisruptionBudget": policy.read_namespaced_pod_disruption_budget,
        "Deployment": apps.read_namespaced_deployment,
    }[kind](name, ns)


def test_agent_becomes_ready_with_every_object(api, core, kafka, fleetward, namespace, kubectl):
    apply_manifest(api, json.dumps(model_secret(namespace)), namespace)
    apply_manifest(api, json.dumps(sop(namespace, "refunds", {"domain": "billing"})), namespace)
    apply_manifest(api, json.dumps(sop(namespace, "other", {"domain": "security"})), namespace)
    apply_manifest(api, json.dumps(guardrail(namespace, "pii")), namespace)
    apply_manifest(api, json.dumps(agent(namespace, "billing", guardrails=("pii",))), namespace)

    obj = wait_ready(api, namespace, "billing")
    st = obj["status"]
    assert st["phase"] == "Ready"
    for t in ("Ready", "ConfigResolved", "CredentialsIssued", "Available"):
        c = condition(obj, t)
        assert c and c["status"] == "True" and c["reason"] and c["message"], (t, c)
    assert st["resolvedSOPs"] == ["refunds@1.0.0"]
    assert st["resolvedGuardrails"] == ["pii"]
    assert st["requestTopic"] == f"fleetward.requests.{namespace}.billing"
    assert st["readyReplicas"] == 1

    uid = obj["metadata"]["uid"]
    for kind, name in OWNED:
        o = _read(api, kind, namespace, name)
        owners = [(r.kind, r.name, r.uid, r.controller) for r in o.metadata.owner_references or []]
        assert owners == [("Agent", "billing", uid, True)], (kind, owners)
        assert o.metadata.labels["fleetward.dev/agent"] == "billing"
        managers = {(m.manager, m.operation) for m in o.metadata.managed_fields or []}
        assert ("fleetward", "Apply") in managers or (kind == "Secret" and name.endswith("credentials")), (
            kind,
            managers,
        )
    assert _read(api, "ServiceAccount", namespace, "fw-billing").automount_service_account_token is False

    # The runtime runs on the podlet with its config hash on the pod template.
    dep = _read(api, "Deployment", namespace, "fw-billing")
    assert dep.spec.template.metadata.annotations["fleetward.dev/config-hash"] == st["configHash"]
    pods = core.list_namespaced_pod(namespace, label_selector="fleetward.dev/agent=billing").items
    assert pods and all(p.spec.node_name == "podlet" and p.status.pod_ip.startswith("127.") for p in pods)

    # The rendered config carries the resolved SOP text and guardrail.
    config = json.loads(_read(api, "ConfigMap", namespace, "fw-billing-config").data["config.json"])
    assert [s["name"] for s in config["sops"]] == ["refunds"]
    assert config["sops"][0]["spec"]["instructions"].startswith("Verify the transaction")
    assert config["guardrails"][0]["name"] == "pii"

    # The agent's public key is in the trust bundle under the kid its Secret names.
    creds = _read(api, "Secret", namespace, "fw-billing-credentials")
    kid = base64.b64decode(creds.data["key-id"]).decode()
    bundle = json.loads(core.read_namespaced_config_map("fleetward-trust-bundle", fleetward).data["jwks.json"])
    mine = [k for k in bundle["keys"] if k["agent"] == f"{namespace}/billing"]
    assert [k["kid"] for k in mine] == [kid] and mine[0]["kty"] == "OKP" and mine[0]["crv"] == "Ed25519"

    # The request topic exists in Kafka.
    assert st["requestTopic"] in kafka.admin().list_topics(timeout=10).topics

    # Printer columns as a person sees them.
    out = kubectl("get", "agents", "-n", namespace, "billing").stdout.split()
    assert out[:7] == ["NAME", "ROLE", "MODEL", "PHASE", "READY", "REPLICAS", "AGE"]
    assert out[7:12] == ["billing", "specialist", "scripted", "Ready", "True"]
    describe = kubectl("describe", "agent", "-n", namespace, "billing").stdout
    assert "CredentialsIssued" in describe and "Resolved 1 SOP(s) (refunds@1.0.0)" in describe
    events = subprocess.run  # noqa: F841 -- events are checked in test_operator_faults
