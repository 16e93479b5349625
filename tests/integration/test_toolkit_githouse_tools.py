"""examples/githouse/50-tools.yaml on the local cluster: the Deployment really runs the
GitHouse tool service, its ServiceAccount can watch only the trust-bundle ConfigMap (in-
cluster config, Role with resourceNames), and removing an agent key from the ConfigMap
makes the running service refuse that agent's tokens within a second."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from fleetward.toolkit import jwks_document, mint_tool_token, public_jwk
from fleetward.toolkit.bundle import DEFAULT_CONFIGMAP, JWKS_KEY

MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "githouse" / "50-tools.yaml"
BILLING, ACCOUNT = "githouse/billing", "githouse/account-security"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest_for(namespace: str, port: int) -> str:
    """The example, moved into the test namespace (both the tools' and the trust bundle's)
    and onto a free port, so it cannot clash with a demo running on this machine."""
    text = MANIFEST.read_text().replace("18080", str(port))
    docs = []
    for doc in yaml.safe_load_all(text):
        if not doc or doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
        if doc["kind"] == "Deployment":
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            args[:] = [a.replace("=fleetward-system", f"={namespace}") for a in args]
        docs.append(doc)
    return yaml.safe_dump_all(docs)


def call(port: int, tool: str, args: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/tools/{tool}", data=json.dumps(args).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def pod_ready(core: client.CoreV1Api, namespace: str) -> bool:
    pods = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/name=githouse-tools").items
    return any(c.type == "Ready" and c.status == "True" for p in pods for c in (p.status.conditions or []))


def test_the_deployed_tool_service_refuses_a_revoked_agent_within_a_second(api, core, namespace):
    keys = {BILLING: Ed25519PrivateKey.generate(), ACCOUNT: Ed25519PrivateKey.generate()}
    kids = {BILLING: f"billing-{uuid.uuid4().hex[:8]}", ACCOUNT: f"account-{uuid.uuid4().hex[:8]}"}

    def jwks(*agents: str) -> str:
        return jwks_document([public_jwk(keys[a].public_key(), kids[a], a) for a in agents])

    def token(agent: str, tool: str) -> str:
        return mint_tool_token(keys[agent], kids[agent], agent, tool, "run-1", uuid.uuid4().hex)

    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=DEFAULT_CONFIGMAP), data={JWKS_KEY: jwks(BILLING, ACCOUNT)}
        ),
    )
    # Something the service account must NOT be able to read (the Role names one ConfigMap).
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="other-config"), data={"x": "y"})
    )
    port = free_port()
    applied = apply_manifest(api, manifest_for(namespace, port))
    assert {"Deployment/githouse-tools", "Role/githouse-tools-trust-bundle"} <= set(applied)

    wait_for(lambda: pod_ready(core, namespace), 120, "githouse-tools pod Ready (trust bundle loaded)")

    # RBAC: exactly the trust bundle, nothing else.
    sa = f"system:serviceaccount:{namespace}:githouse-tools"
    authz = client.AuthorizationV1Api(api)

    def allowed(verb: str, name: str | None) -> bool:
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=sa,
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, verb=verb, resource="configmaps", name=name
                ),
            )
        )
        return authz.create_subject_access_review(review).status.allowed

    assert allowed("watch", DEFAULT_CONFIGMAP) and allowed("get", DEFAULT_CONFIGMAP)
    assert not allowed("get", "other-config") and not allowed("list", None) and not allowed("update", DEFAULT_CONFIGMAP)

    status, body = call(
        port,
        "verify_transaction",
        {"account": "jdoe", "transaction_id": "txn_1002"},
        token(BILLING, "verify_transaction"),
    )
    assert (status, body["verified"]) == (200, True), body
    assert call(port, "verify_transaction", {"account": "jdoe", "transaction_id": "txn_1002"}, None)[0] == 401

    unexpired = token(BILLING, "platform_status")
    core.patch_namespaced_config_map(DEFAULT_CONFIGMAP, namespace, {"data": {JWKS_KEY: jwks(ACCOUNT)}})
    written = time.monotonic()
    latency = None
    while time.monotonic() - written < 1.0:
        status, body = call(port, "platform_status", {}, token(BILLING, "platform_status"))
        if status == 401:
            latency = time.monotonic() - written
            break
        time.sleep(0.002)
    assert latency is not None, "the deployed service still accepted the revoked key 1 s after the write"
    print(f"\nrevocation seen by the deployed service {latency * 1000:.1f} ms after the API write")
    assert body["reason"] == "revoked"
    assert call(port, "platform_status", {}, unexpired) == (
        401,
        {
            "error": "unauthorized",
            "reason": "revoked",
            "message": f"key {kids[BILLING]!r} was removed from the trust bundle",
        },
    )
    assert call(port, "platform_status", {}, token(ACCOUNT, "platform_status"))[0] == 200

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'githouse_tool_token_refusals_total{reason="revoked",tool="platform_status"}' in metrics
