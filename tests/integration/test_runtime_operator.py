"""The runtime as the operator deploys it (helm-installed operator, an Agent applied into a
namespace, the Deployment running on the podlet): a request produced to the Agent's topic
is served end to end, and a SIGKILL of the runtime process in the middle of a mutating
tool call loses and doubles nothing (SQLite state on the pod's volume survives the
container restart)."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from pathlib import Path

from fleetward.runtime.guardrails.engine import render
from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.llmstandin import StandinServer
from tests.support.agents import model_secret, wait_agent, wait_ready
from tests.support.runtime import (
    PII_GUARDRAIL,
    REFUND_SOP,
    EventReader,
    GitHouseTools,
    HoldingProxy,
    billing_tools,
    ensure_topics,
    produce,
    user_message,
)

SSN = "123-45-6789"
SCRIPT = [
    {"name": "reply", "match": {"toolResultFor": "issue_refund"}, "respond": {"content": "Refunded."}},
    {
        "name": "refund-1002",
        "match": {"toolResultFor": "verify_transaction", "lastUser": "txn_1002"},
        "respond": {
            "toolCalls": [{"name": "issue_refund", "arguments": {"transaction_id": "txn_1002", "amount_cents": 2100}}]
        },
    },
    {
        "name": "refund-1001",
        "match": {"toolResultFor": "verify_transaction", "lastUser": "txn_1001"},
        "respond": {
            "toolCalls": [{"name": "issue_refund", "arguments": {"transaction_id": "txn_1001", "amount_cents": 4900}}]
        },
    },
    {
        "name": "verify-1002",
        "match": {"lastRole": "user", "lastUser": "txn_1002"},
        "respond": {
            "toolCalls": [
                {"name": "verify_transaction", "arguments": {"account": "jdoe", "transaction_id": "txn_1002"}}
            ]
        },
    },
    {
        "name": "verify-1001",
        "match": {"lastRole": "user", "lastUser": "txn_1001"},
        "respond": {
            "toolCalls": [
                {"name": "verify_transaction", "arguments": {"account": "octo-admin", "transaction_id": "txn_1001"}}
            ]
        },
    },
]


def manifests(namespace: str, llm_url: str, tools_port: int) -> list[dict]:
    group = "fleetward.dev/v1alpha1"
    return [
        model_secret(namespace),
        {
            "apiVersion": group,
            "kind": "SOP",
            "metadata": {"name": "refunds", "namespace": namespace, "labels": {"domain": "billing"}},
            "spec": REFUND_SOP,
        },
        {
            "apiVersion": group,
            "kind": "Guardrail",
            "metadata": {"name": "pii", "namespace": namespace},
            "spec": {
                **PII_GUARDRAIL,
                "pii": {
                    **PII_GUARDRAIL["pii"],
                    "entities": [*PII_GUARDRAIL["pii"]["entities"], {"type": "us_ssn", "strategy": "hash"}],
                },
            },
        },
        {
            "apiVersion": group,
            "kind": "Agent",
            "metadata": {"name": "billing", "namespace": namespace},
            "spec": {
                "role": "specialist",
                "model": {
                    "name": "scripted",
                    "baseURL": llm_url,
                    "timeoutSeconds": 30,
                    "maxRetries": 0,
                    "credentialsSecretRef": {"name": "llm", "key": "api-key"},
                },
                "tools": billing_tools(tools_port),
                "sopSelector": {"matchLabels": {"domain": "billing"}},
                "guardrailRefs": [{"name": "pii"}],
            },
        },
    ]


def runtime_pod(core: client.CoreV1Api, namespace: str):
    pods = [
        p
        for p in core.list_namespaced_pod(namespace, label_selector="fleetward.dev/agent=billing").items
        if p.metadata.deletion_timestamp is None
    ]
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def test_the_operator_deployed_runtime_serves_a_request_and_survives_sigkill_mid_tool_call(
    api, core, kafka, fleetward, namespace, tmp_path: Path
):
    ensure_topics(kafka.bootstrap, ["fleetward.events"])
    events = EventReader(kafka.bootstrap)
    tools = GitHouseTools(tmp_path / "jwks.json")
    proxy = HoldingProxy(tools.port, hold_path="/tools/issue_refund")
    with StandinServer(SCRIPT) as llm, proxy.start():
        for doc in manifests(namespace, llm.url, proxy.port):
            apply_manifest(api, json.dumps(doc), namespace)
        agent = wait_ready(api, namespace, "billing", timeout=180)
        topic = agent["status"]["requestTopic"]
        # The tool service trusts what the operator published in the trust bundle.
        bundle = core.read_namespaced_config_map("fleetward-trust-bundle", fleetward).data["jwks.json"]
        (tmp_path / "jwks.json").write_text(bundle)
        ref = f"{namespace}/billing"
        with tools:
            try:
                # 1. The happy path, end to end.
                first = f"s-{uuid.uuid4().hex[:12]}"
                produce(
                    kafka.bootstrap,
                    topic,
                    user_message(ref, first, f"I was charged twice: refund txn_1002 (SSN {SSN})").to_json(),
                    first,
                )
                stream = events.wait_for(first, "resolved", 120)
                assert [e.type for e in stream] == [
                    "status",
                    "status",
                    "tool_call",
                    "tool_result",
                    "tool_call",
                    "tool_result",
                    "message",
                    "resolved",
                ]
                assert [e.sequence for e in stream] == list(range(8)) and {e.agent for e in stream} == {ref}
                assert [e.data.tool for e in stream if e.type == "tool_call"] == ["verify_transaction", "issue_refund"]
                effects = [e for e in tools.effects() if e["runId"] == stream[0].run_id]
                assert [(e["tool"], e["agent"]) for e in effects] == [("issue_refund", ref)]
                assert tools.metric("githouse_tool_token_refusals_total") == 0
                # The SSN reached the model as an HMAC under the installation's key (from the
                # chart's generated Secret, copied by the operator), not as a plain SHA-256
                # anyone could recompute from a guessed number.
                key = base64.b64decode(
                    core.read_namespaced_secret("fleetward-pii-hash-key", fleetward).data["hash-key"]
                )
                seen = json.dumps(llm.requests(rule="verify-1002")[0]["body"])
                assert SSN not in seen
                assert render("us_ssn", SSN, "hash", key) in seen, seen
                assert render("us_ssn", SSN, "hash") not in seen

                # 2. SIGKILL while the refund is applied but its answer has not reached the runtime.
                pod = runtime_pod(core, namespace)
                restarts = pod.status.container_statuses[0].restart_count
                pid = int(pod.status.container_statuses[0].container_id.removeprefix("podlet://"))
                proxy.hold.set()
                second = f"s-{uuid.uuid4().hex[:12]}"
                produce(kafka.bootstrap, topic, user_message(ref, second, "refund txn_1001 please").to_json(), second)
                assert proxy.held.wait(120), "the refund call never reached the tool service"
                deadline = time.monotonic() + 10
                while not [e for e in tools.effects() if e["arguments"]["transaction_id"] == "txn_1001"]:
                    assert time.monotonic() < deadline, "the refund was not applied"
                    time.sleep(0.02)
                os.kill(pid, signal.SIGKILL)
                proxy.hold.clear()
                proxy.release.set()
                wait_agent(
                    api,
                    namespace,
                    "billing",
                    lambda _: runtime_pod(core, namespace).status.container_statuses[0].restart_count > restarts,
                    60,
                    "a container restart",
                )
                stream = events.wait_for(second, "resolved", 180)
                run_id = stream[0].run_id
                assert {e.run_id for e in stream} == {run_id}
                applied = [e for e in tools.effects() if e["runId"] == run_id]
                assert [e["tool"] for e in applied] == ["issue_refund"]
                assert [e.sequence for e in stream] == list(range(len(stream)))
                assert len({e.id for e in stream}) == len(stream)
                calls = [e.data.call_id for e in stream if e.type == "tool_call"]
                assert len(calls) == len(set(calls)) == 2
                assert len(llm.requests(rule="verify-1001")) == 1 and len(llm.requests(rule="refund-1001")) == 1
            finally:
                events.close()
