"""`fleetward dev`: the local cluster (SPEC §10).

`fleetward dev up` starts a real Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler) on loopback with TLS, the podlet node that
runs Pods as local processes, Kafka, PostgreSQL and Prometheus; installs the Fleetward
CRDs; applies the GitHouse example; writes .fleetward/dev.env; and stays up until
Ctrl-C, then stops everything. The binaries must be built first (`make build`;
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
    up.add_argument("--no-example", action="store_true", help="apply no manifests, only the CRDs")
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
        targets = [] if args.no_example else (args.apply or [EXAMPLE])
        for path in manifest_files(targets):
            applied = apply_manifest(api, path.read_text())
            _print(
                f"==> applied {path.relative_to(layout.REPO) if path.is_relative_to(layout.REPO) else path}: "
                f"{len(applied)} objects"
            )
        env_file = cluster.write_env_file(args.env_file or layout.state_root() / "dev.env")
        elapsed = time.monotonic() - started
        _print_summary(cluster, env_file, elapsed)
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


def _print_summary(cluster, env_file: Path, elapsed: float) -> None:
    env = cluster.env()
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items())
    _print()
    _print(f"Fleetward local cluster is up ({elapsed:.1f} s: {timings})")
    _print(f"  API server      {cluster.control_plane.server}")
    _print(f"  kubeconfig      {env['KUBECONFIG']}  (contexts: fleetward-admin, alice, bob, carol)")
    for key in ("KAFKA_BOOTSTRAP", "POSTGRES_DSN", "PROMETHEUS_URL"):
        if key in env:
            _print(f"  {key:<15} {env[key]}")
    _print(f"  logs            {cluster.state / 'logs'}")
    _print()
    _print(f"In another shell:  source {env_file}")
    _print("                   kubectl get fleetward -A")
    _print()
    _print("Nothing reconciles Agents, SOPs, Guardrails or KillSwitches yet: the operator is not")
    _print("built so far. The resources are validated and stored by the API server.")
    _print("Press Ctrl-C to stop everything.")
