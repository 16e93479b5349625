"""Kafka unreachable: the operator reports it on the Agent with a clear reason, keeps
running (no crash, no restart) and deploys what does not need Kafka."""

from __future__ import annotations

import json

from kubernetes import client

from fleetward.devcluster.install import helm_install, helm_uninstall, local_values, wait_operator_ready
from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import free_port
from tests.support.agents import agent, condition, model_secret, wait_agent

RELEASE, SYSTEM, WATCHED = "fw-nokafka", "scoped-nokafka-system", "scoped-nokafka"


def test_unreachable_kafka_is_a_condition_not_a_crash(cluster, api, core, fleetward):
    for ns in (SYSTEM, WATCHED):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    values = local_values(dead, watchNamespaces=[WATCHED], kafka={"timeoutSeconds": 3})
    try:
        helm_install(cluster.bins.helm, cluster.kubeconfig, values, release=RELEASE, namespace=SYSTEM)
        wait_operator_ready(api, release=RELEASE, namespace=SYSTEM, log_dir=cluster.state / "podlet" / "logs")
        apply_manifest(api, json.dumps(model_secret(WATCHED)), WATCHED)
        apply_manifest(api, json.dumps(agent(WATCHED, "billing")), WATCHED)
        obj = wait_agent(
            api,
            WATCHED,
            "billing",
            lambda a: (condition(a, "TopicReady") or {}).get("status") == "False",
            90,
            "TopicReady False",
        )
        topic = condition(obj, "TopicReady")
        assert topic["reason"] == "KafkaUnavailable" and "fleetward.requests.scoped-nokafka.billing" in topic["message"]
        assert condition(obj, "CredentialsIssued")["status"] == "True"  # keys and Secrets need no Kafka
        assert condition(obj, "Ready")["status"] == "False" and obj["status"]["phase"] in ("Pending", "Degraded")
        client.AppsV1Api(api).read_namespaced_deployment("fw-billing", WATCHED)  # deployed all the same
        # Retried with backoff, and the operator never restarted meanwhile.
        pods = core.list_namespaced_pod(SYSTEM, label_selector="app.kubernetes.io/component=operator").items
        assert [p.status.container_statuses[0].restart_count for p in pods] == [0]
    finally:
        helm_uninstall(cluster.bins.helm, cluster.kubeconfig, release=RELEASE, namespace=SYSTEM)
        for ns in (WATCHED, SYSTEM):
            core.delete_namespace(ns)
