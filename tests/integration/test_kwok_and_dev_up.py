"""Simulated kwok nodes for scale tests, and `fleetward dev up` as a whole."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kubernetes import client

from fleetward.devcluster.layout import REPO
from fleetward.devcluster.services import KWOK_TAINT, wait_for


def test_kwok_nodes_take_only_pods_that_tolerate_them(cluster, api, core, namespace):
    nodes = cluster.add_kwok_nodes(3)
    for name in nodes:
        node = core.read_node(name)
        assert node.spec.taints[0].key == KWOK_TAINT["key"] and node.spec.taints[0].effect == "NoSchedule"

    apps = client.AppsV1Api(api)

    def deployment(name: str, replicas: int, on_kwok: bool) -> dict:
        spec: dict = {"containers": [{"name": "c", "image": "none", "command": ["sleep", "300"]}],
                      "terminationGracePeriodSeconds": 1}
        if on_kwok:
            spec["tolerations"] = [{"key": KWOK_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}]
            spec["nodeSelector"] = {"type": "kwok"}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}}

    apps.create_namespaced_deployment(namespace, deployment("simulated", 30, on_kwok=True))
    apps.create_namespaced_deployment(namespace, deployment("real", 1, on_kwok=False))

    def ready(name: str, count: int) -> bool:
        d = apps.read_namespaced_deployment(name, namespace)
        return (d.status.ready_replicas or 0) == count

    wait_for(lambda: ready("simulated", 30), 90, "30 simulated pods Ready on kwok nodes")
    wait_for(lambda: ready("real", 1), 60, "the untolerating pod Ready on the podlet")
    simulated = core.list_namespaced_pod(namespace, label_selector="app=simulated").items
    assert {p.spec.node_name for p in simulated} <= set(nodes)
    assert all(p.status.pod_ip.startswith("127.64.") for p in simulated), "simulated IPs stay on loopback"
    real = core.list_namespaced_pod(namespace, label_selector="app=real").items
    assert [p.spec.node_name for p in real] == ["podlet"]


def test_dev_up_starts_everything_applies_the_example_and_writes_dev_env(tmp_path):
    env_file = tmp_path / "dev.env"
    proc = subprocess.run(
        [sys.executable, "-m", "fleetward.cli.main", "dev", "up", "--name", "uptest", "--exit-after-start",
         "--env-file", str(env_file)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Fleetward local cluster is up" in out
    assert "applied examples/githouse/30-agents.yaml: 10 objects" in out
    assert "Nothing reconciles Agents" in out
    assert out.rstrip().endswith("==> stopped")
    text = env_file.read_text()
    for key in ("KUBECONFIG", "PATH", "KAFKA_BOOTSTRAP", "POSTGRES_DSN", "PROMETHEUS_URL"):
        assert f"export {key}=" in text, key
    # the file is meant to be sourced: check that a shell can, and that kubectl is on PATH
    check = subprocess.run(["bash", "-c", f"source {env_file} && command -v kubectl && command -v helm"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    kubectl_path, helm_path = check.stdout.split()
    assert "/kubernetes-v" in kubectl_path and "/helm-v" in helm_path, check.stdout
    state = REPO / ".fleetward" / "uptest"
    assert (state / "logs" / "kube-apiserver.log").exists()
    assert not _alive_under(state), "everything stopped"


def _alive_under(state: Path) -> list[int]:
    alive = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(state).encode() in (proc / "cmdline").read_bytes():
                    alive.append(int(proc.name))
            except OSError:
                pass
    return alive
