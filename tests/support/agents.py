"""Helpers for tests that drive the operator: manifests and waits on conditions."""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client

GROUP, VERSION = "fleetward.dev", "v1alpha1"


def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def model_secret(namespace: str, name: str = "llm", key: str = "api-key") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": {key: "sk-test-not-a-real-key"},
    }


def sop(namespace: str, name: str, labels: dict[str, str], version: str = "1.0.0") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SOP",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "domain": "billing",
            "title": f"Procedure {name}",
            "version": version,
            "instructions": "Verify the transaction before any refund.",
            "steps": [
                {"id": "verify", "instruction": "Verify the transaction.", "tool": "verify_transaction"},
                {"id": "refund", "instruction": "Refund it.", "tool": "issue_refund", "requires": ["verify"]},
            ],
        },
    }


def guardrail(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Guardrail",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "pii": {"entities": [{"type": "email", "strategy": "redact"}]},
            "policy": {"bannedPhrases": ["bypass"], "action": "block"},
        },
    }


def agent(
    namespace: str,
    name: str,
    *,
    domain: str = "billing",
    guardrails: tuple[str, ...] = (),
    secret: str = "llm",
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "role": "specialist",
        "model": {
            "name": "scripted",
            "baseURL": "http://127.0.0.1:18000/v1",
            "credentialsSecretRef": {"name": secret, "key": "api-key"},
        },
        "tools": [
            {
                "name": "verify_transaction",
                "description": "Verify a transaction.",
                "inputSchema": {"type": "object", "properties": {"id": {"type": "string"}}},
                "endpoint": "http://127.0.0.1:18080/tools/verify_transaction",
            }
        ],
        "sopSelector": {"matchLabels": {"domain": domain}},
    }
    if guardrails:
        body["guardrailRefs"] = [{"name": g} for g in guardrails]
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def get_agent(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, "agents", name)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def wait_agent(
    api: client.ApiClient, namespace: str, name: str, predicate, timeout: float = 90, what: str = "the expected state"
) -> dict[str, Any]:
    """Poll the Agent until predicate(agent) holds; the error shows its last status."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = get_agent(api, namespace, name)
            if predicate(last):
                return last
        except client.exceptions.ApiException as e:
            if e.status != 404:
                raise
        time.sleep(0.25)
    raise AssertionError(
        f"Agent {namespace}/{name} did not reach {what} within {timeout:.0f} s; status: {last.get('status')}"
    )


def is_ready(obj: dict[str, Any]) -> bool:
    cond = condition(obj, "Ready")
    return (
        cond is not None
        and cond["status"] == "True"
        and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
    )


def wait_ready(api: client.ApiClient, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    return wait_agent(api, namespace, name, is_ready, timeout, "Ready")


def approve_as(user_kubeconfigs: dict[str, Any], switch: str, *users: str) -> None:
    """Each user adds their own approval to a KillSwitch's release, with their own
    credentials (the admission webhook refuses an approval written for someone else)."""
    from kubernetes import config

    for user in users:
        as_user = custom(config.new_client_from_config(str(user_kubeconfigs[user])))
        current = as_user.get_cluster_custom_object(GROUP, VERSION, "killswitches", switch)
        approvals = [*(current["spec"].get("approvals") or []), {"user": user}]
        as_user.patch_cluster_custom_object(GROUP, VERSION, "killswitches", switch, {"spec": {"approvals": approvals}})
