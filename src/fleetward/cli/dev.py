"""`fleetward dev`: the local cluster (SPEC §10).

`fleetward dev up` starts a real Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler) on loopback with TLS, the podlet node that
runs Pods as local processes, Kafka, PostgreSQL and Prometheus; installs Fleetward with
`helm upgrade --install` of charts/fleetward (the operator runs as a pod on the podlet);
applies the GitHouse example and waits until its Agents are Ready; writes
.fleetward/dev.env; and stays up until Ctrl-C, then stops everything. The binaries must be built first (`make build`;
`make up` does both).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from fleetward.devcluster import layout

EXAMPLE = layout.REPO / "examples" / "githouse"
CRDS = layout.REPO / "crds"


def register(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser(
        "dev", help="run the local cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    dev_sub = dev.add_subparsers(dest="dev_command", metavar="SUBCOMMAND", required=True)
    up = dev_sub.add_parser(
        "up",
        help="start the local cluster and stay up until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("--name", default="dev", help="cluster name; state goes to .fleetward/NAME (default: %(default)s)")
    up.add_argument(
        "--apply",
        type=Path,
        action="append",
        metavar="PATH",
        help=f"manifest file or folder to apply after the CRDs (default: {EXAMPLE.relative_to(layout.REPO)})",
    )
    up.add_argument("--no-example", action="store_true", help="apply no manifests; install only Fleetward")
    up.add_argument("--no-wait", action="store_true", help="do not wait for the applied Agents to become Ready")
    up.add_argument(
        "--no-query",
        action="store_true",
        help="do not send the GitHouse enterprise query to the router once the example is up",
    )
    up.add_argument(
        "--wait-timeout",
        type=float,
        default=300,
        metavar="SECONDS",
        help="how long to wait for the applied Agents to become Ready (default: %(default)s)",
    )
    up.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="where to write the variables to source (default: .fleetward/dev.env)",
    )
    up.set_defaults(handler=run_up)


def _print(msg: str = "") -> None:
    print(msg, flush=True)


def run_up(args: argparse.Namespace) -> int:
    from fleetward.devcluster.cluster import ClusterInUse, DevCluster
    from fleetward.devcluster.install import CHART, NAMESPACE, helm_install, local_values, wait_operator_ready
    from fleetward.devcluster.kube import apply_manifest, install_crds, manifest_files
    from fleetward.devcluster.process import ComponentFailed

    logging.basicConfig(level=logging.INFO, format="==> %(message)s", stream=sys.stdout)

    def interrupt(signum, frame):  # Ctrl-C or SIGTERM, during start-up as well as once up
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    up = False

    started = time.monotonic()
    try:
        cluster = DevCluster.create(args.name)
    except (layout.MissingComponent, ClusterInUse) as e:
        _print(f"error: {e}")
        return 2
    try:
        cluster.start()
        cluster.kafka("plain")
        cluster.postgres()
        cluster.prometheus()
        api = cluster.api_client()
        crds = install_crds(api, CRDS)
        _print(f"==> installed CRDs: {', '.join(crds)}")
        _print(f"==> helm install {CHART.relative_to(layout.REPO)} into namespace {NAMESPACE} ...")
        helm_install(cluster.bins.helm, cluster.kubeconfig, local_values(cluster.kafka("plain").bootstrap))
        pods = wait_operator_ready(api, log_dir=cluster.state / "podlet" / "logs")
        _print(f"==> the Fleetward operator is running: {', '.join(pods)}")
        targets = [] if args.no_example else (args.apply or [EXAMPLE])
        for path in manifest_files(targets):
            applied = apply_manifest(api, path.read_text())
            _print(
                f"==> applied {path.relative_to(layout.REPO) if path.is_relative_to(layout.REPO) else path}: "
                f"{len(applied)} objects"
            )
        if targets and not args.no_wait:
            _wait_agents_ready(api, args.wait_timeout)
            _wait_workloads_ready(api, args.wait_timeout, cluster.state / "podlet" / "logs")
        gateway = _wait_gateway_ready(api, NAMESPACE, args.wait_timeout if not args.no_wait else 0)
        env_file = cluster.write_env_file(args.env_file or layout.state_root() / "dev.env")
        session = None
        if EXAMPLE in targets and not args.no_query:
            session = _send_enterprise_query(cluster.kafka("plain").bootstrap)
        elapsed = time.monotonic() - started
        _print_summary(cluster, env_file, elapsed, session, gateway)
        up = True
        while True:
            cluster.check()
            time.sleep(1)
    except KeyboardInterrupt:
        _print("\n==> stopping the local cluster ..." if up else "\n==> interrupted during start-up; stopping ...")
        return 0 if up else 130
    except ComponentFailed as e:
        _print(f"error: {e}")
        return 1
    finally:
        # Stopping is bounded (SIGTERM, then SIGKILL after a timeout per component); a
        # second Ctrl-C must not cut it short and leave half the cluster behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        _print("==> stopped")


def _wait_until_ready(what: str, list_waiting, timeout: float, explain) -> None:
    """Print "==> {what} Ready: n/m" whenever it changes until nothing is waiting; on
    timeout, `explain(waiting)` says which are not and why, then go on: the cluster stays
    up to look at. `list_waiting()` returns (all, waiting)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        items, waiting = list_waiting()
        line = f"==> {what} Ready: {len(items) - len(waiting)}/{len(items)}"
        if line != last:
            _print(line)
            last = line
        if not waiting:
            return
        if time.monotonic() > deadline:
            explain(waiting)
            return
        time.sleep(1)


def _wait_agents_ready(api, timeout: float) -> None:
    """Every Agent in the cluster Ready; those that are not are named with their Ready condition."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)

    def ready(a) -> bool:
        conds = (a.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def list_waiting():
        agents = custom.list_cluster_custom_object("fleetward.dev", "v1alpha1", "agents")["items"]
        return agents, [a for a in agents if not ready(a)]

    def explain(waiting) -> None:
        for a in waiting:
            conds = (a.get("status") or {}).get("conditions") or []
            why = next((f"{c['reason']}: {c['message']}" for c in conds if c["type"] == "Ready"), "no status yet")
            _print(f"    not Ready: {a['metadata']['namespace']}/{a['metadata']['name']} ({why})")
        _print("    (see `kubectl describe agent NAME -n NAMESPACE`)")

    _wait_until_ready("Agents", list_waiting, timeout, explain)


def _wait_workloads_ready(api, timeout: float, log_dir: Path) -> None:
    """The applied workloads that are not Agents (the example's tool service and LLM
    stand-in) Ready; those that are not are named with the tail of their pod's log, e.g. a
    port another local cluster already holds."""
    from kubernetes import client

    apps = client.AppsV1Api(api)

    def list_waiting():
        deployments = [
            d
            for d in apps.list_deployment_for_all_namespaces().items
            if "fleetward.dev/agent" not in (d.metadata.labels or {}) and d.metadata.namespace != "fleetward-system"
        ]
        return deployments, [d for d in deployments if (d.status.ready_replicas or 0) < (d.spec.replicas or 0)]

    def explain(waiting) -> None:
        for d in waiting:
            ns, name = d.metadata.namespace, d.metadata.name
            _print(f"    not Ready: Deployment {ns}/{name}")
            logs = sorted(log_dir.glob(f"{ns}_{name}-*/*/*.log"), key=lambda f: f.stat().st_mtime)
            for text in logs[-1:]:
                for row in text.read_text(errors="replace").splitlines()[-5:]:
                    _print(f"      | {row}")
        _print("    (see `kubectl describe deployment NAME -n NAMESPACE`; a port in use may belong to another")
        _print("     local cluster running the example: only one at a time can, its ports are fixed)")

    _wait_until_ready("other workloads", list_waiting, timeout, explain)


GATEWAY_SELECTOR = "app.kubernetes.io/component=gateway"
GATEWAY_APPEAR_SECONDS = 60.0
"""How long `dev up` waits for the operator to create the gateway Deployment at all."""


def _wait_gateway_ready(api, namespace: str, timeout: float) -> tuple[list[str], str | None]:
    """The operator-managed gateway's Ready pods as `http://IP:PORT` (the local cluster has no
    Service proxy: clients connect to a pod; every replica serves every session), and the
    Secret holding its HS256 key, if it uses one. Waits up to `timeout` for a Ready pod (up
    to GATEWAY_APPEAR_SECONDS while there is no gateway Deployment at all); ([], None) when
    there is none (gateway disabled or not Ready yet)."""
    from kubernetes import client

    core = client.CoreV1Api(api)

    def ready() -> tuple[list[str], str | None]:
        urls, secret = [], None
        for pod in core.list_namespaced_pod(namespace, label_selector=GATEWAY_SELECTOR).items:
            conditions = {c.type: c.status for c in (pod.status.conditions or [])}
            if conditions.get("Ready") != "True" or not pod.status.pod_ip:
                continue
            ports = [p.container_port for c in pod.spec.containers for p in (c.ports or []) if p.name == "http"]
            urls.append(f"http://{pod.status.pod_ip}:{ports[0] if ports else 8080}")
            for env in (e for c in pod.spec.containers for e in (c.env or [])):
                ref = env.value_from.secret_key_ref if env.value_from else None
                if env.name == "FLEETWARD_GATEWAY_JWT_HS256_SECRET" and ref is not None:
                    secret = f"{namespace}/{ref.name} (key {ref.key})"
        return sorted(urls), secret

    apps = client.AppsV1Api(api)

    def exists() -> bool:  # the operator applies it at start-up; none when the chart disables it
        return bool(apps.list_namespaced_deployment(namespace, label_selector=GATEWAY_SELECTOR).items)

    started = time.monotonic()
    deadline = started + timeout
    while not (found := ready())[0] and time.monotonic() < deadline:
        if time.monotonic() - started > GATEWAY_APPEAR_SECONDS and not exists():
            break
        time.sleep(1)
    if found[0]:
        _print(f"==> gateway Ready: {len(found[0])} replica(s)")
    return found


ENTERPRISE_QUERY = (
    "Our CI/CD pipeline has been dead for three hours, I'm stuck in a 2FA lockout loop, "
    "and please give my Lead Dev permission to increase the budget."
)


def _send_enterprise_query(bootstrap: str) -> str | None:
    """The seed's enterprise query (SPEC §11) as the user octo-admin, to the GitHouse router's
    request topic; returns the session id (None when it could not be sent: the cluster stays
    up, and the summary says so)."""
    import uuid

    from confluent_kafka import Producer

    from fleetward.api.envelopes import AgentCommand

    session = f"githouse-enterprise-{uuid.uuid4().hex[:8]}"
    command = AgentCommand.new(
        "user_message",
        session_id=session,
        agent="githouse/router",
        idempotency_key=f"make-up-{session}",
        user={"sub": "octo-admin", "role": "user"},
        data={"text": ENTERPRISE_QUERY},
    )
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    errors: list[str] = []
    producer.produce(
        "fleetward.requests.githouse.router",
        command.to_json().encode(),
        key=session.encode(),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(15) or errors:
        _print(f"warning: the enterprise query was not sent: {errors[0] if errors else 'no acknowledgement'}")
        return None
    _print(f"==> sent the GitHouse enterprise query to githouse/router (session {session})")
    return session


def _print_summary(
    cluster,
    env_file: Path,
    elapsed: float,
    session: str | None = None,
    gateway: tuple[list[str], str | None] = ([], None),
) -> None:
    env = cluster.env()
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items())
    _print()
    _print(f"Fleetward local cluster is up ({elapsed:.1f} s: {timings})")
    _print(f"  API server      {cluster.control_plane.server}")
    _print(f"  kubeconfig      {env['KUBECONFIG']}  (contexts: fleetward-admin, alice, bob, carol)")
    for key in ("KAFKA_BOOTSTRAP", "POSTGRES_DSN", "PROMETHEUS_URL"):
        if key in env:
            _print(f"  {key:<15} {env[key]}")
    if "PROMETHEUS_URL" in env:
        _print(f"                  alerts: {env['PROMETHEUS_URL']}/alerts; dashboards to import into a Grafana:")
        _print("                  charts/fleetward/monitoring/dashboards/*.json (docs/monitoring.md)")
    urls, secret = gateway
    if urls:
        ws = urls[0].replace("http://", "ws://", 1)
        _print(f"  gateway         {ws}/v1/sessions/SESSION_ID/ws  (replicas: {', '.join(urls)})")
        if secret:
            _print(f"                  user tokens: HS256 with the key in Secret {secret}")
        _print("                  (docs/gateway-protocol.md: token, frames, resume)")
    else:
        _print(
            "  gateway         not Ready yet (see its pods: kubectl get pods -A -l app.kubernetes.io/component=gateway)"
        )
    _print(f"  logs            {cluster.state / 'logs'}")
    _print()
    _print(f"In another shell:  source {env_file}")
    _print("                   kubectl get fleetward -A")
    _print()
    _print("                   kubectl get agents -n githouse      # the operator's work: phase, Ready")
    _print("                   kubectl describe agent router -n githouse")
    if session:
        _print()
        _print("The enterprise query is running through the GitHouse mesh. Watch the session:")
        _print(f"                   fleetward sessions tail {session}")
        _print("Each draft and gated step waits for a reviewer; the tail shows the command that answers it:")
        _print(f"                   fleetward sessions decide {session} RUN_ID --agent AGENT --decision approve")
    _print("Press Ctrl-C to stop everything.")
