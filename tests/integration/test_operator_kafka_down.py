"""Kafka unreachable: the operator reports it on the Agent with a clear reason, keeps
running (no crash, no restart) and deploys what does not need Kafka; a kill switch engaged
meanwhile still revokes the credentials that need no Kafka and says the drain waits."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from fleetward.devcluster.install import helm_install, helm_uninstall, local_values, wait_operator_ready
from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import free_port, wait_for
from tests.integration.test_killswitch import GROUP, VERSION, engage_as_admin, fleetward_cli, switch
from tests.support.agents import agent, condition, model_secret, wait_agent

RELEASE, SYSTEM, WATCHED = "fw-nokafka", "scoped-nokafka-system", "scoped-nokafka"


KILL_SWITCH = "nokafka-stop"


def _drain_waiting(ks: dict) -> dict | None:
    drained = next((c for c in (ks.get("status") or {}).get("conditions") or [] if c["type"] == "Drained"), None)
    ok = ks.get("status", {}).get("phase") == "Engaged" and drained and drained["reason"] == "KafkaUnavailable"
    return ks if ok else None


def _release_and_delete(objs: client.CustomObjectsApi, user_kubeconfigs) -> None:
    """Release the switch the way people must (two approvers), then delete it. The
    release's resume order cannot reach a dead Kafka, so it is not waited for."""
    try:
        switch(objs, KILL_SWITCH)
    except client.exceptions.ApiException:
        return
    fleetward_cli(user_kubeconfigs["bob"], "approve", KILL_SWITCH)
    fleetward_cli(user_kubeconfigs["carol"], "approve", KILL_SWITCH)
    fleetward_cli(user_kubeconfigs["bob"], "release", KILL_SWITCH)
    objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", KILL_SWITCH)


def test_unreachable_kafka_is_a_condition_not_a_crash(cluster, api, core, fleetward, user_kubeconfigs):
    for ns in (SYSTEM, WATCHED):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    objs = client.CustomObjectsApi(api)
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

        # A kill switch while Kafka is down: the trust bundle and the Secrets need no Kafka,
        # so the credentials are revoked all the same; the status says the drain waits.
        def bundle_agents() -> set[str]:
            doc = core.read_namespaced_config_map("fleetward-trust-bundle", SYSTEM).data["jwks.json"]
            return {k["agent"] for k in json.loads(doc)["keys"]}

        assert f"{WATCHED}/billing" in bundle_agents()
        engage_as_admin(objs, KILL_SWITCH, WATCHED, "kafka down drill")
        wait_for(
            lambda: _drain_waiting(switch(objs, KILL_SWITCH)), 60, "the switch Engaged with its drain waiting for Kafka"
        )
        engaged = switch(objs, KILL_SWITCH)
        assert engaged["status"]["revocationSeconds"] is not None and engaged["status"]["affectedAgents"] == 1
        assert f"{WATCHED}/billing" not in bundle_agents()
        with pytest.raises(client.exceptions.ApiException) as gone:
            core.read_namespaced_secret("fw-billing-credentials", WATCHED)
        assert gone.value.status == 404
        wait_agent(api, WATCHED, "billing", lambda a: a["status"].get("phase") == "Halted", 60, "phase Halted")
    finally:
        _release_and_delete(objs, user_kubeconfigs)
        helm_uninstall(cluster.bins.helm, cluster.kubeconfig, release=RELEASE, namespace=SYSTEM)
        for ns in (WATCHED, SYSTEM):
            core.delete_namespace(ns)
