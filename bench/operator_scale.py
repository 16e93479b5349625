"""Benchmark: N Agents on kwok nodes, from apply to every Agent Ready, beside the floor.

The floor is the same cluster's time for N plain 1-replica Deployments applied directly
(bench/kwok_floor.py): what Kubernetes itself needs, without the operator. Also measured:
the operator's peak resident memory and its reconcile durations (p50/p99, from its log).

    .venv/bin/python bench/operator_scale.py              # 1000 Agents (make bench)
    .venv/bin/python bench/operator_scale.py --agents 200 --skip-floor

Results: docs/bench/operator.json (appended) and the table in docs/bench/operator.md.
The cluster runs in .fleetward/opbench and is stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from kwok_floor import apply_and_wait_deployments, ensure_namespace, machine  # noqa: E402
from results import record  # noqa: E402

from fleetward.devcluster.cluster import DevCluster  # noqa: E402
from fleetward.devcluster.install import NAMESPACE, helm_install, local_values, wait_operator_ready  # noqa: E402
from fleetward.devcluster.kube import install_crds  # noqa: E402
from fleetward.devcluster.process import wait_for  # noqa: E402

RESULTS = REPO / "docs" / "bench" / "operator.json"
KWOK_PLACEMENT = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}
LOG_LINE = re.compile(
    r"reconciled Agent (?P<ns>[^/]+)/(?P<name>\S+) in (?P<seconds>[0-9.]+) s \(waited (?P<waited>[0-9.]+) s"
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def agent_manifest(namespace: str, name: str) -> dict:
    return {
        "apiVersion": "fleetward.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "role": "specialist",
            "model": {
                "name": "bench",
                "baseURL": "http://127.0.0.1:18000/v1",
                "credentialsSecretRef": {"name": "llm", "key": "api-key"},
            },
            "deployment": KWOK_PLACEMENT,
        },
    }


def count_ready(api: client.ApiClient, namespace: str) -> int:
    items = client.CustomObjectsApi(api).list_namespaced_custom_object(
        "fleetward.dev", "v1alpha1", namespace, "agents"
    )["items"]
    return sum(
        1
        for a in items
        if any(c["type"] == "Ready" and c["status"] == "True" for c in (a.get("status") or {}).get("conditions") or [])
    )


def count_available(api: client.ApiClient, namespace: str) -> int:
    """Runtime Deployments whose pods are up: beside the Agents' Ready count, it tells the
    operator's lag from the cluster's own."""
    items = client.AppsV1Api(api).list_namespaced_deployment(namespace).items
    return sum(1 for d in items if (d.status.available_replicas or 0) >= 1)


def pod_stages(core: client.CoreV1Api, namespace: str) -> dict[str, list[float]]:
    """When the runtime pods were created, scheduled and Ready, counted from the first
    Deployment's creation (p50, p90, max): where the cluster's own time went."""
    deployments = client.AppsV1Api(core.api_client).list_namespaced_deployment(namespace).items
    t0 = min(d.metadata.creation_timestamp for d in deployments)
    marks: dict[str, list[float]] = {"deployment_created": [], "created": [], "scheduled": [], "ready": []}
    for d in deployments:
        marks["deployment_created"].append((d.metadata.creation_timestamp - t0).total_seconds())
    for pod in core.list_namespaced_pod(namespace).items:
        marks["created"].append((pod.metadata.creation_timestamp - t0).total_seconds())
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "True":
                marks["scheduled"].append((cond.last_transition_time - t0).total_seconds())
            if cond.type == "Ready" and cond.status == "True":
                marks["ready"].append((cond.last_transition_time - t0).total_seconds())
    return {stage: [round(percentile(v, q), 1) for q in (0.5, 0.9, 1.0)] if v else [] for stage, v in marks.items()}


def namespace_gone(core: client.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespace(name)
    except client.ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def operator_pid(core: client.CoreV1Api) -> int:
    (pod,) = core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/component=operator").items
    return int(pod.status.container_statuses[0].container_id.removeprefix("podlet://"))


WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE")
READ_VERBS = ("GET", "LIST")
METRIC = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def api_server_counters(api: client.ApiClient) -> dict[str, float]:
    """The API server's own accounting (its /metrics): write requests by verb and resource
    (`apiserver_request_total`, every response code) and its CPU seconds. The difference
    between two readings is what a phase cost the API server, whoever asked."""
    resp = api.call_api("GET", api.configuration.host + "/metrics")
    out: dict[str, float] = {}
    for line in resp.read().decode().splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        if m["name"] == "process_cpu_seconds_total":
            out["cpu_seconds"] = float(m["value"])
        elif m["name"] == "apiserver_request_total":
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
            if labels.get("verb") in READ_VERBS:
                out["reads"] = out.get("reads", 0.0) + float(m["value"])
            elif labels.get("verb") in WRITE_VERBS:
                sub = f"/{labels['subresource']}" if labels.get("subresource") else ""
                key = f"{labels['verb']} {labels.get('resource', '?')}{sub}"
                out[key] = out.get(key, 0.0) + float(m["value"])
                if labels.get("code", "").startswith(("4", "5")):  # refused: still a request served
                    refused = f"{REFUSED}{key} {labels['code']}"
                    out[refused] = out.get(refused, 0.0) + float(m["value"])
    return out


REFUSED = "refused: "


def api_server_cost(before: dict[str, float], after: dict[str, float], items: int) -> dict:
    """Per item (Deployment or Agent) of a phase: API server CPU and writes, by kind."""

    def per_item(keys: list[str]) -> dict[str, float]:
        counts = {k: after[k] - before.get(k, 0.0) for k in keys}
        return {k: round(v / items, 2) for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v >= items / 10}

    writes = per_item([k for k in after if k not in ("cpu_seconds", "reads") and not k.startswith(REFUSED)])
    refused = per_item([k for k in after if k.startswith(REFUSED)])
    return {
        "cpu_ms_per_item": round((after["cpu_seconds"] - before["cpu_seconds"]) * 1000 / items, 1),
        "reads_per_item": round((after.get("reads", 0.0) - before.get("reads", 0.0)) / items, 1),
        "writes_per_item": round(sum(writes.values()), 1),
        "writes_per_item_by_kind": writes,
        # Writes the API server refused (every code >= 400), included in the writes above.
        "refused_writes_per_item_by_kind": {k.removeprefix(REFUSED): v for k, v in refused.items()},
    }


COMPONENTS = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok", "podlet", "kafka")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_component(state: Path, operator: int | None = None) -> dict[str, float]:
    """CPU seconds used so far by each process of this cluster (its command line names the
    cluster's state folder) and by the operator, by component. Differences between two
    readings say where a phase's CPU went; their sum over the phase's seconds is how many
    of this machine's cores the cluster kept busy."""
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(proc.name) == operator:
            name = "operator"
        elif str(state) in cmdline:
            name = next((c for c in COMPONENTS if c in cmdline), "other")
        else:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return out


def cpu_spent(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    spent = {
        k: round(after[k] - before.get(k, 0.0), 1) for k in sorted(after, key=lambda k: before.get(k, 0.0) - after[k])
    }
    return {
        "cpu_seconds": spent,
        "total": round(sum(spent.values()), 1),
        "cores_busy": round(sum(spent.values()) / seconds, 2),
    }


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict:
    cluster = DevCluster.create("opbench")
    try:
        cluster.start()
        kafka = cluster.kafka("plain")
        api = cluster.api_client()
        core = client.CoreV1Api(api)
        nodes = cluster.add_kwok_nodes(args.nodes)
        say(f"{len(nodes)} kwok nodes Ready")
        install_crds(api, REPO / "crds")
        # No state claims: the runtime pods run on kwok nodes (nothing to keep), and the
        # numbers stay comparable with the runs before claims existed (a claim and a
        # volume per Agent would add to what the control plane does).
        values = local_values(
            kafka.bootstrap, operator={"resyncSeconds": 600}, runtime={"stateVolume": {"enabled": False}}
        )
        helm_install(cluster.bins.helm, cluster.kubeconfig, values)
        wait_operator_ready(api, log_dir=cluster.state / "podlet" / "logs")
        say("operator running")

        floor = floor_cost = floor_teardown_seconds = None
        if not args.skip_floor:
            ensure_namespace(api, "bench-floor")
            before, cpu_before = api_server_counters(api), cpu_by_component(cluster.state)
            floor = apply_and_wait_deployments(api, args.agents, "bench-floor", timeout=args.timeout, progress=say)
            floor_cost = api_server_cost(before, api_server_counters(api), args.agents)
            floor_cost["cluster_cpu"] = cpu_spent(cpu_before, cpu_by_component(cluster.state), floor.ready_seconds)
            say(f"floor: {args.agents} Deployments available in {floor.ready_seconds:.1f} s; API server {floor_cost}")
            core.delete_namespace("bench-floor")
            # Wait for the namespace itself, not just its pods: while it terminates, the
            # namespace controller deletes the floor's ReplicaSets before their Deployments,
            # the Deployment controller recreates them and is refused (403, namespace
            # terminating), and that teardown used to run inside the Agents' measured phase.
            teardown_start = time.monotonic()
            wait_for(lambda: namespace_gone(core, "bench-floor"), 900, "the floor's namespace deleted", 2)
            floor_teardown_seconds = round(time.monotonic() - teardown_start, 1)
            say(f"floor namespace deleted in {floor_teardown_seconds} s")

        ns = "bench-agents"
        ensure_namespace(api, ns)
        core.create_namespaced_secret(
            ns, client.V1Secret(metadata=client.V1ObjectMeta(name="llm"), string_data={"api-key": "sk-bench"})
        )
        custom = client.CustomObjectsApi(api)
        names = [f"a-{i:05d}" for i in range(args.agents)]
        say(f"applying {len(names)} Agents")
        before, cpu_before = api_server_counters(api), cpu_by_component(cluster.state, operator_pid(core))
        start = time.monotonic()

        def create(name: str) -> None:
            custom.create_namespaced_custom_object(
                "fleetward.dev", "v1alpha1", ns, "agents", agent_manifest(ns, name), _preload_content=False
            ).drain_conn()

        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(create, names))
        apply_seconds = time.monotonic() - start
        say(f"applied in {apply_seconds:.1f} s")
        pid = operator_pid(core)
        last = -1.0

        def all_ready() -> bool:
            nonlocal last
            ready = count_ready(api, ns)
            now = time.monotonic() - start
            if now - last >= 5 or ready == len(names):
                say(
                    f"  t={now:5.1f} s  Ready {ready}/{len(names)}  runtime Deployments available "
                    f"{count_available(api, ns)}  operator RSS {memory_kib(pid)['VmRSS'] // 1024} MiB"
                )
                last = now
            return ready == len(names)

        wait_for(all_ready, args.timeout, f"{len(names)} Agents Ready", interval=1.0)
        ready_seconds = time.monotonic() - start
        agents_cost = api_server_cost(before, api_server_counters(api), len(names))
        agents_cost["cluster_cpu"] = cpu_spent(cpu_before, cpu_by_component(cluster.state, pid), ready_seconds)
        say(f"API server per Agent: {agents_cost}")
        stages = pod_stages(core, ns)
        say(f"runtime pods, seconds after the first Agent (p50/p90/max): {stages}")
        mem = memory_kib(pid)
        log_files = sorted((cluster.state / "podlet" / "logs").glob(f"{NAMESPACE}_*operator*/operator/*.log"))
        matches = [
            m
            for f in log_files
            for line in f.read_text(errors="replace").splitlines()
            if (m := LOG_LINE.search(line)) and m["ns"] == ns
        ]
        durations = [float(m["seconds"]) for m in matches]  # the work, without the queue wait
        waits = [float(m["waited"]) for m in matches]
        return {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "agents": args.agents,
            "kwok_nodes": args.nodes,
            "apply_seconds": round(apply_seconds, 2),
            "agents_ready_seconds": round(ready_seconds, 2),
            "floor_deployments_ready_seconds": floor.ready_seconds if floor else None,
            "ratio_to_floor": round(ready_seconds / floor.ready_seconds, 2) if floor else None,
            # Not measured before 2026-12-07: until then the Agents' phase began while this ran.
            "floor_teardown_seconds": floor_teardown_seconds,
            "operator_peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
            "operator_rss_end_mib": round(mem["VmRSS"] / 1024, 1),
            "reconciles": len(durations),
            "reconcile_p50_ms": round(statistics.median(durations) * 1000, 1) if durations else None,
            "reconcile_p99_ms": round(percentile(durations, 0.99) * 1000, 1) if durations else None,
            "reconcile_queue_wait_p50_ms": round(statistics.median(waits) * 1000, 1) if waits else None,
            "runtime_pod_stages": stages,
            # What each phase cost the API server (the shared bottleneck on this machine).
            "api_server_per_floor_deployment": floor_cost,
            "api_server_per_agent": agents_cost,
        }
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=12, help="kwok nodes (110 pods each)")
    parser.add_argument("--threads", type=int, default=16, help="parallel API clients applying the Agents")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--skip-floor", action="store_true", help="do not measure the plain-Deployment floor")
    parser.add_argument("--no-record", action="store_true", help="print the result only")
    args = parser.parse_args(argv)
    result = run(args)
    record(result, RESULTS, write=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
