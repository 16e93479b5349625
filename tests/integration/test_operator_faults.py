"""The operator under faults: SIGKILLed in the middle of a burst of applies it converges
without duplicates; with two replicas exactly one acts (Kopf peering)."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client

from fleetward.devcluster.install import NAMESPACE, helm_install, local_values, wait_operator_ready
from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from tests.support.agents import agent, model_secret, wait_ready

OPERATOR = "app.kubernetes.io/instance=fleetward,app.kubernetes.io/component=operator"


def _operator_pods(core) -> list:
    return [
        p
        for p in core.list_namespaced_pod(NAMESPACE, label_selector=OPERATOR).items
        if p.metadata.deletion_timestamp is None
    ]


def _pid(pod) -> int:
    cid = pod.status.container_statuses[0].container_id
    assert cid.startswith("podlet://"), cid
    return int(cid.removeprefix("podlet://"))


def _bundle(core) -> dict[str, str]:
    keys = json.loads(core.read_namespaced_config_map("fleetward-trust-bundle", NAMESPACE).data["jwks.json"])["keys"]
    return {k["agent"]: k["kid"] for k in keys}


def test_operator_killed_mid_burst_converges_without_duplicates(api, core, fleetward, namespace):
    apply_manifest(api, json.dumps(model_secret(namespace)), namespace)
    names = [f"burst-{i:02d}" for i in range(16)]
    (pod,) = _operator_pods(core)
    restarts = pod.status.container_statuses[0].restart_count

    def apply(name: str) -> None:
        apply_manifest(api, json.dumps(agent(namespace, name)), namespace)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(apply, n) for n in names]
        # Kill the operator once it has started on the burst, while applies are still coming.
        wait_for(
            lambda: any(
                base64.b64decode(s.data.get("key-id", ""))
                for s in core.list_namespaced_secret(namespace).items
                if s.metadata.name.endswith("-credentials")
            ),
            30,
            "the operator working on the burst",
            interval=0.05,
        )
        os.kill(_pid(pod), signal.SIGKILL)
        for f in futures:
            f.result()

    wait_for(
        lambda: (p := _operator_pods(core)) and p[0].status.container_statuses[0].restart_count > restarts,
        60,
        "the operator container restarted",
    )
    for name in names:
        wait_ready(api, namespace, name, timeout=180)

    # Nothing duplicated: one key per agent, the one its Secret holds, and one rollout each.
    bundle = _bundle(core)
    apps = client.AppsV1Api(api)
    for name in names:
        secret = core.read_namespaced_secret(f"fw-{name}-credentials", namespace)
        assert bundle[f"{namespace}/{name}"] == base64.b64decode(secret.data["key-id"]).decode()
        replica_sets = apps.list_namespaced_replica_set(namespace, label_selector=f"fleetward.dev/agent={name}").items
        assert len(replica_sets) == 1, (name, [r.metadata.name for r in replica_sets])
    assert len([a for a in bundle if a.startswith(f"{namespace}/")]) == len(names)
    creds = [s for s in core.list_namespaced_secret(namespace).items if s.metadata.name.endswith("-credentials")]
    assert len(creds) == len(names)


def test_two_replicas_only_one_reconciles(cluster, api, core, kafka, fleetward, namespace):
    values = local_values(kafka.bootstrap, excludeNamespaces=["scoped-*"])
    helm_install(cluster.bins.helm, cluster.kubeconfig, {**values, "operator": {**values["operator"], "replicas": 2}})
    try:
        wait_operator_ready(api, timeout=120)
        wait_for(lambda: len(_operator_pods(core)) == 2, 60, "two operator pods")
        time.sleep(2)  # both have exchanged keep-alives; the lower priority one has paused
        apply_manifest(api, json.dumps(model_secret(namespace)), namespace)
        names = [f"pair-{i}" for i in range(4)]
        for name in names:
            apply_manifest(api, json.dumps(agent(namespace, name)), namespace)
        for name in names:
            wait_ready(api, namespace, name)
        logs = cluster.state / "podlet" / "logs"

        def log_of(pod: str) -> str:
            return "".join(p.read_text(errors="replace") for p in logs.glob(f"{NAMESPACE}_{pod}_*/operator/*.log"))

        pods = [pod.metadata.name for pod in _operator_pods(core)]
        acting = [pod for pod in pods if f"reconciled Agent {namespace}/" in log_of(pod)]
        assert len(acting) == 1, f"pods that reconciled this test's Agents: {acting}"
        (standby,) = [pod for pod in pods if pod not in acting]

        # The background loops (housekeeping, the gateway apply) follow the same decision:
        # the standby's latest word is that it stands by, the acting one's that it acts.
        def last_decision(pod: str) -> str | None:
            text = log_of(pod)
            at = {word: text.rfind(word) for word in ("this replica acts (", "standing by (")}
            word, where = max(at.items(), key=lambda kv: kv[1])
            return word if where >= 0 else None

        # (a replica notices at its loops' next round: housekeeping's is at most 60 s)
        wait_for(lambda: last_decision(standby) == "standing by (", 90, "the standby's loops standing by")
        wait_for(lambda: last_decision(acting[0]) == "this replica acts (", 90, "the acting replica's loops acting")
    finally:
        helm_install(cluster.bins.helm, cluster.kubeconfig, values)
        wait_for(lambda: len(_operator_pods(core)) == 1, 120, "back to one operator pod")
        wait_operator_ready(api, timeout=120)
