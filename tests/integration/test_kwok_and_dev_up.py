"""Simulated kwok nodes for scale tests, and `fleetward dev up` as a whole."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from kubernetes import client

from fleetward.devcluster.layout import REPO, state_root
from fleetward.devcluster.process import wait_for
from fleetward.devcluster.services import KWOK_TAINT


def test_kwok_nodes_take_only_pods_that_tolerate_them(cluster, api, core, namespace):
    nodes = cluster.add_kwok_nodes(3)
    for name in nodes:
        node = core.read_node(name)
        assert node.spec.taints[0].key == KWOK_TAINT["key"] and node.spec.taints[0].effect == "NoSchedule"

    apps = client.AppsV1Api(api)

    def deployment(name: str, replicas: int, on_kwok: bool) -> dict:
        spec: dict = {
            "containers": [{"name": "c", "image": "none", "command": ["sleep", "300"]}],
            "terminationGracePeriodSeconds": 1,
        }
        if on_kwok:
            spec["tolerations"] = [{"key": KWOK_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}]
            spec["nodeSelector"] = {"type": "kwok"}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
            },
        }

    apps.create_namespaced_deployment(namespace, deployment("simulated", 30, on_kwok=True))
    apps.create_namespaced_deployment(namespace, deployment("real", 1, on_kwok=False))

    def ready(name: str, count: int) -> bool:
        d = apps.read_namespaced_deployment(name, namespace)
        return (d.status.ready_replicas or 0) == count

    wait_for(lambda: ready("simulated", 30), 90, "30 simulated pods Ready on kwok nodes")
    wait_for(lambda: ready("real", 1), 60, "the untolerating pod Ready on the podlet")
    simulated = core.list_namespaced_pod(namespace, label_selector="app=simulated").items
    assert {p.spec.node_name for p in simulated} <= set(nodes)
    # simulated IPs come from the benchmarking range (RFC 2544), which EndpointSlices accept
    assert all(ipaddress.ip_address(p.status.pod_ip) in ipaddress.ip_network("198.18.0.0/15") for p in simulated)
    # ... so a Service in front of them gets its endpoints, as in a real cluster (a loopback
    # address is refused: the endpoints controllers retried refused writes)
    core.create_namespaced_service(
        namespace,
        {"metadata": {"name": "simulated"}, "spec": {"selector": {"app": "simulated"}, "ports": [{"port": 8080}]}},
    )
    discovery = client.DiscoveryV1Api(api)

    def endpoints() -> int:
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=simulated"
        ).items
        return sum(len(s.endpoints or []) for s in slices)

    wait_for(lambda: endpoints() == 30, 60, "the Service's EndpointSlices listing the 30 simulated pods")
    real = core.list_namespaced_pod(namespace, label_selector="app=real").items
    assert [p.spec.node_name for p in real] == ["podlet"]


def test_dev_up_starts_everything_applies_the_example_and_stops_on_ctrl_c(tmp_path):
    env_file = tmp_path / "dev.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetward.cli.main", "dev", "up", "--name", "uptest", "--env-file", str(env_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C to stop everything." in line:
                break
        out = "".join(lines)
        assert "Press Ctrl-C" in out, out[-3000:]
        assert "Fleetward local cluster is up" in out
        assert "applied examples/githouse/30-agents.yaml: 10 objects" in out
        assert "the Fleetward operator is running" in out
        assert "Agents Ready: 10/10" in out, out[-3000:]
        # make up runs the seed's enterprise query and says how to watch it
        sent = re.search(r"sent the GitHouse enterprise query to githouse/router \(session (\S+)\)", out)
        assert sent, out[-3000:]
        session = sent.group(1)
        assert f"fleetward sessions tail {session}" in out
        # the printed addresses include the operator-managed gateway's, and it answers there
        gateway = re.search(r"gateway +ws://(\S+?)/v1/sessions/SESSION_ID/ws", out)
        assert gateway, out[-3000:]
        assert "user tokens: HS256 with the key in Secret fleetward-system/" in out, out[-3000:]
        with urllib.request.urlopen(f"http://{gateway.group(1)}/readyz", timeout=10) as ready:
            assert ready.status == 200
        # ...and Prometheus: it scrapes the example's runtimes (found through the API server)
        # and evaluates Fleetward's alerting rules (docs/monitoring.md).
        prometheus = re.search(r"PROMETHEUS_URL +(\S+)", out)
        assert prometheus and f"alerts: {prometheus.group(1)}/alerts" in out, out[-3000:]

        def prom(path: str) -> dict:
            with urllib.request.urlopen(f"{prometheus.group(1)}{path}", timeout=10) as resp:
                return json.load(resp)["data"]

        def runtimes_ready() -> float:
            result = prom('/api/v1/query?query=sum(fleetward_runtime_ready{namespace="githouse"})')["result"]
            return float(result[0]["value"][1]) if result else 0.0

        wait_for(lambda: runtimes_ready() >= 10, 60, "the 10 GitHouse runtimes scraped and ready in Prometheus")
        alerts = {r["name"] for g in prom("/api/v1/rules?type=alert")["groups"] for r in g["rules"]}
        shipped = yaml.safe_load((REPO / "charts/fleetward/monitoring/rules.yaml").read_text())["groups"]
        assert alerts == {r["alert"] for g in shipped for r in g["rules"]}, alerts

        # while it is up: the env file works in a shell, and the cluster answers with the example in it
        check = subprocess.run(
            [
                "bash",
                "-c",
                f"source {env_file} && command -v kubectl && command -v helm && "
                "kubectl get agents -n githouse -o jsonpath='{range .items[*]}{.metadata.name}={.status.phase} {end}'",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        kubectl_path, helm_path, *agents = check.stdout.split()
        assert "/kubernetes-v" in kubectl_path and "/helm-v" in helm_path
        assert "router=Ready" in agents and len(agents) == 10 and all(a.endswith("=Ready") for a in agents), agents
        text = env_file.read_text()
        for key in ("KUBECONFIG", "PATH", "KAFKA_BOOTSTRAP", "POSTGRES_DSN", "PROMETHEUS_URL"):
            assert f"export {key}=" in text, key
        state = state_root() / "uptest"
        assert len(_alive_under(state)) >= 8
        # ... and the query goes through the mesh: watched as the summary says, it reaches
        # the classification, the escalation of the security part and the first reviews.
        tail = subprocess.run(
            [
                "bash",
                "-c",
                f"source {env_file} && {sys.executable} -m fleetward.cli.main sessions tail {session} "
                "--until-idle 30 --timeout 150",
            ],
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert tail.returncode == 0, tail.stderr
        assert "classified: topics account, billing, security" in tail.stdout, tail.stdout[-3000:]
        assert "escalated" in tail.stdout and "approval_required" in tail.stdout, tail.stdout[-3000:]

        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert rest.rstrip().endswith("==> stopped")
    assert not _alive_under(state), "everything stopped"


def test_ctrl_c_during_start_up_stops_everything():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetward.cli.main", "dev", "up", "--name", "uptest-interrupt"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        while True:
            line = proc.stdout.readline()
            assert line, "dev up ended before starting"
            if "podlet ready" in line:  # mid start-up: control plane and node up, services not yet
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted during start-up" in rest and rest.rstrip().endswith("==> stopped")
    assert "Fleetward local cluster is up" not in rest
    assert not _alive_under(state_root() / "uptest-interrupt"), "everything stopped"
    # the name is free again: the lock was released
    from fleetward.devcluster.cluster import _lock

    os.close(_lock(state_root() / "uptest-interrupt.lock", "uptest-interrupt"))


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
