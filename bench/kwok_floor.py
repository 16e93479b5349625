"""The kwok scale floor: how fast the bare local cluster brings N plain Deployments
(1 replica each, on simulated kwok nodes) to Ready, and whether they stay Ready.

    FLEETWARD_STATE=/tmp/kwok-state .venv/bin/python bench/kwok_floor.py \
        --deployments 1000 --nodes 10 --runs 3 --write

Each run starts a fresh DevCluster, registers the kwok nodes, creates the Deployments
through the API (parallel threads), waits until every one reports availableReplicas=1,
then watches for --stay seconds that nodes, pods and Deployments stay Ready.
With --write the results go to docs/bench/kwok-floor.json.

The floor is what the operator's benchmark compares its own 1000-Agent time against;
it imports the helpers beside this file:

    from kwok_floor import apply_and_wait_deployments, watch_stays_ready
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from fleetward.devcluster.cluster import DevCluster
from fleetward.devcluster.layout import REPO, versions
from fleetward.devcluster.process import wait_for
from fleetward.devcluster.services import KWOK_TAINT

RESULTS = REPO / "docs" / "bench" / "kwok-floor.json"
APPLY_THREADS = 16
# Status codes worth a retry: APF throttling (429) and a briefly overloaded API server.
RETRYABLE = {429, 500, 503, 504}

Progress = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


# -- manifests ------------------------------------------------------------------------------------


def deployment_manifest(name: str) -> dict[str, Any]:
    """A plain 1-replica Deployment whose pod lands only on a kwok node (which never runs it)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"fleetward.dev/bench": "kwok-floor"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "fleetward.dev/bench": "kwok-floor"}},
                "spec": {
                    "containers": [{"name": "main", "image": "none", "command": ["sleep", "inf"]}],
                    "tolerations": [{"key": KWOK_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}],
                    "nodeSelector": {"type": "kwok"},
                    "terminationGracePeriodSeconds": 0,
                },
            },
        },
    }


# -- parallel creation ------------------------------------------------------------------------------


def pooled(api: client.ApiClient, size: int) -> client.ApiClient:
    """A copy of `api` whose connection pool holds `size` connections (urllib3 keeps only
    `connection_pool_maxsize` of them, 10 by default, and drops the rest after each call:
    with more threads than that every request would pay a new TLS handshake)."""
    cfg = copy.copy(api.configuration)
    cfg.connection_pool_maxsize = size
    return client.ApiClient(cfg)


def call_with_retry(fn: Callable[[], Any], attempts: int = 8) -> Any:
    """fn(), retried with back-off on throttling/overload (bounded: `attempts` tries)."""
    for attempt in range(attempts):
        try:
            return fn()
        except client.exceptions.ApiException as e:
            if e.status not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def create_all(
    create_one: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    threads: int = APPLY_THREADS,
    progress: Progress | None = _print,
    what: str = "objects",
) -> float:
    """Call create_one(item) for every item from `threads` threads; returns the seconds taken.
    The first error is raised once every call has finished."""
    items = list(items)
    done = 0
    start = time.monotonic()
    step = max(1, len(items) // 5)
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda item: call_with_retry(lambda: create_one(item)), items):
            done += 1
            if progress and (done % step == 0 or done == len(items)):
                elapsed = time.monotonic() - start
                progress(f"  created {done}/{len(items)} {what} in {elapsed:.1f} s ({done / elapsed:.0f}/s)")
    return time.monotonic() - start


# -- counting -----------------------------------------------------------------------------------------


def _list(api: client.ApiClient, path: str, query: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """GET a list as plain JSON: the generated models would cost seconds per 1000 objects.
    resourceVersion=0 lets the API server answer from its watch cache, not etcd."""
    params = [("resourceVersion", "0"), *(query or {}).items()]
    request = api.param_serialize(
        "GET", path, query_params=params, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
    )
    resp = api.call_api(*request)
    body = resp.read()
    if not 200 <= resp.status <= 299:
        raise client.exceptions.ApiException(status=resp.status, reason=f"GET {path}: {body[:300]!r}")
    return json.loads(body)["items"]


def _ready(conditions: list[dict[str, Any]] | None) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions or [])


def count_available(api: client.ApiClient, namespace: str, label_selector: str | None = None) -> int:
    """Deployments in `namespace` whose availableReplicas reached their spec.replicas."""
    query = {"labelSelector": label_selector} if label_selector else None
    return sum(
        1
        for d in _list(api, f"/apis/apps/v1/namespaces/{namespace}/deployments", query)
        if (d.get("status") or {}).get("availableReplicas", 0) >= d["spec"].get("replicas", 1)
    )


@dataclass
class FloorResult:
    deployments: int
    apply_seconds: float  # creating the Deployment objects
    ready_seconds: float  # from the first create until every Deployment is available


def apply_and_wait_deployments(
    api: client.ApiClient,
    n: int,
    namespace: str,
    *,
    name_prefix: str = "d",
    threads: int = APPLY_THREADS,
    timeout: float = 900,
    progress: Progress | None = _print,
) -> FloorResult:
    """Create n 1-replica Deployments (on kwok nodes) in `namespace` and wait until all are available.
    The namespace must exist with its default ServiceAccount (see ensure_namespace)."""
    apps = client.AppsV1Api(pooled(api, threads))

    def create(name: str) -> None:
        # _preload_content=False: the raw response, not a model (parsing it costs more than the request)
        resp = apps.create_namespaced_deployment(namespace, deployment_manifest(name), _preload_content=False)
        resp.drain_conn()  # read to the end: the connection goes back to the pool

    start = time.monotonic()
    if progress:
        progress(f"creating {n} Deployments in {namespace} ({threads} threads)")
    apply_seconds = create_all(
        create, [f"{name_prefix}-{i:05d}" for i in range(n)], threads=threads, progress=progress, what="Deployments"
    )
    last_report = 0.0

    def all_available() -> bool:
        nonlocal last_report
        available = count_available(api, namespace)
        now = time.monotonic() - start
        if progress and (now - last_report >= 5 or available >= n):
            progress(f"  t={now:5.1f} s  available {available}/{n}")
            last_report = now
        return available >= n

    wait_for(all_available, timeout, f"{n} Deployments available in {namespace}", interval=1.0)
    return FloorResult(n, round(apply_seconds, 2), round(time.monotonic() - start, 2))


def ensure_namespace(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    except client.exceptions.ApiException as e:
        if e.status != 409:
            raise
    # Pod creation needs the namespace's default ServiceAccount (made by the controller manager).
    wait_for(
        lambda: core.read_namespaced_service_account("default", namespace), 60, f"ServiceAccount {namespace}/default"
    )


# -- stability ------------------------------------------------------------------------------------------


def _parse_time(value: str | None) -> float:
    if not value:
        return 0.0
    return datetime.datetime.fromisoformat(value).timestamp()


@dataclass
class Stability:
    seconds: float
    samples: int = 0
    nodes: int = 0
    max_nodes_not_ready: int = 0
    max_pods_not_ready: int = 0
    max_deployments_unavailable: int = 0
    # Ready-condition transitions that happened inside the window (caught even between samples)
    node_ready_transitions: int = 0
    pod_ready_transitions: int = 0
    not_ready_nodes: list[str] = field(default_factory=list)

    @property
    def stable(self) -> bool:
        return not (
            self.max_nodes_not_ready
            or self.max_pods_not_ready
            or self.max_deployments_unavailable
            or self.node_ready_transitions
            or self.pod_ready_transitions
        )


def watch_stays_ready(
    api: client.ApiClient,
    namespace: str,
    seconds: float = 60,
    *,
    interval: float = 5,
    node_selector: str = "type=kwok",
    progress: Progress | None = _print,
) -> Stability:
    """Sample kwok nodes, pods and Deployments of `namespace` for `seconds`: how many were not Ready,
    and how many Ready conditions changed during the window (timestamps, so flips between samples count)."""
    result = Stability(seconds)
    window_start = time.time()
    end = time.monotonic() + seconds
    while True:
        nodes = _list(api, "/api/v1/nodes", {"labelSelector": node_selector})
        pods = _list(api, f"/api/v1/namespaces/{namespace}/pods")
        deployments = _list(api, f"/apis/apps/v1/namespaces/{namespace}/deployments")
        not_ready_nodes = [x["metadata"]["name"] for x in nodes if not _ready(x["status"].get("conditions"))]
        pods_not_ready = sum(1 for p in pods if not _ready(p["status"].get("conditions")))
        unavailable = sum(1 for d in deployments if (d.get("status") or {}).get("availableReplicas", 0) < 1)
        result.samples += 1
        result.nodes = len(nodes)
        result.max_nodes_not_ready = max(result.max_nodes_not_ready, len(not_ready_nodes))
        result.max_pods_not_ready = max(result.max_pods_not_ready, pods_not_ready)
        result.max_deployments_unavailable = max(result.max_deployments_unavailable, unavailable)
        result.not_ready_nodes = sorted(set(result.not_ready_nodes) | set(not_ready_nodes))
        if progress:
            progress(
                f"  stay: nodes not Ready {len(not_ready_nodes)}/{len(nodes)}, pods not Ready "
                f"{pods_not_ready}/{len(pods)}, Deployments unavailable {unavailable}/{len(deployments)}"
            )
        if time.monotonic() >= end:
            break
        time.sleep(min(interval, max(0.0, end - time.monotonic())))
    # 1 s slack: condition timestamps have whole-second precision
    result.node_ready_transitions = sum(
        1
        for x in nodes
        for c in x["status"].get("conditions") or []
        if c["type"] == "Ready" and _parse_time(c.get("lastTransitionTime")) > window_start + 1
    )
    result.pod_ready_transitions = sum(
        1
        for p in pods
        for c in p["status"].get("conditions") or []
        if c["type"] == "Ready" and _parse_time(c.get("lastTransitionTime")) > window_start + 1
    )
    return result


# -- the benchmark ----------------------------------------------------------------------------------------


def one_run(index: int, args: argparse.Namespace) -> dict[str, Any]:
    _print(f"==> run {index}: fresh cluster, {args.nodes} kwok nodes, {args.deployments} Deployments")
    load_before = os.getloadavg()[0]  # the machine is shared: a busy one makes the run slower
    with DevCluster.create(args.cluster_name) as cluster:
        cluster.start()
        cluster.add_kwok_nodes(args.nodes)
        api = cluster.api_client()
        ensure_namespace(api, args.namespace)
        floor = apply_and_wait_deployments(
            api, args.deployments, args.namespace, threads=args.threads, timeout=args.timeout
        )
        _print(
            f"  all {floor.deployments} available after {floor.ready_seconds:.1f} s "
            f"(apply alone {floor.apply_seconds:.1f} s); watching {args.stay:.0f} s"
        )
        stay = watch_stays_ready(api, args.namespace, args.stay)
        cluster.check()  # a component that died during the run fails the run
    run = {
        **asdict(floor),
        "stay": {**asdict(stay), "stable": stay.stable},
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
    }
    _print(f"  run {index}: {json.dumps(run)}")
    return run


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(
        next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=10, help="kwok nodes (110 pods each)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stay", type=float, default=60, help="seconds to watch that everything stays Ready")
    parser.add_argument("--threads", type=int, default=APPLY_THREADS)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for all Deployments")
    parser.add_argument("--namespace", default="bench")
    parser.add_argument("--cluster-name", default="kwokbench")
    parser.add_argument("--write", action="store_true", help=f"write the results to {RESULTS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    for name in ("deployments", "nodes", "runs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.deployments > args.nodes * 110:
        parser.error(
            f"--deployments {args.deployments} do not fit on --nodes {args.nodes} "
            f"(110 pods each): use at least {-(-args.deployments // 110)} nodes"
        )

    runs = [one_run(i + 1, args) for i in range(args.runs)]
    summary = {
        "ready_seconds_median": statistics.median(r["ready_seconds"] for r in runs),
        "apply_seconds_median": statistics.median(r["apply_seconds"] for r in runs),
        "all_runs_stable": all(r["stay"]["stable"] for r in runs),
    }
    report = {
        "benchmark": "kwok-floor",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": {k: versions()[k] for k in ("KUBERNETES_VERSION", "ETCD_VERSION", "KWOK_VERSION")},
        "parameters": {
            "deployments": args.deployments,
            "replicas": 1,
            "kwok_nodes": args.nodes,
            "pods_per_node": 110,
            "apply_threads": args.threads,
            "stay_seconds": args.stay,
            "runs": args.runs,
        },
        "command": "FLEETWARD_STATE=/tmp/kwok-state .venv/bin/python bench/kwok_floor.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "summary": summary,
        "runs": runs,
    }
    _print(json.dumps(summary))
    if args.write:
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        _print(f"wrote {RESULTS}")
    return 0 if summary["all_runs_stable"] else 1


if __name__ == "__main__":
    sys.exit(main())
