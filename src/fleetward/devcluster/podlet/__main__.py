"""python -m fleetward.devcluster.podlet: run the podlet node agent.

Started by `fleetward dev up` / the test fixtures; it can also be run by hand against
any cluster whose API server accepts its client certificate (user system:node:NAME,
group system:nodes)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from fleetward.devcluster.podlet.node import Podlet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fleetward.devcluster.podlet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--node-name", required=True, help="Node to register (must match the certificate's CN)")
    p.add_argument("--kubeconfig", type=Path, required=True, help="kubeconfig with the node's client certificate")
    p.add_argument("--root", type=Path, required=True, help="folder for pod volumes, launch specs and container logs")
    p.add_argument(
        "--apiserver-port",
        type=int,
        required=True,
        help="loopback port of the API server, given to pods as KUBERNETES_SERVICE_PORT",
    )
    p.add_argument("--kubelet-version", default="v0.0.0", help="version reported in the Node's nodeInfo")
    p.add_argument(
        "--volume-resync-seconds",
        type=float,
        default=1.0,
        help="how often ConfigMap/Secret volumes are re-read (default: %(default)s)",
    )
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="extra Node label")
    p.add_argument(
        "--pod-cidr",
        default="127.0.1.0/16",
        help="loopback range pod IPs come from (default: %(default)s; 127.0.0.0/24 is never used)",
    )
    p.add_argument(
        "--provisioner-kubeconfig",
        type=Path,
        help="also provision hostPath volumes for claims of the local StorageClass, with this identity",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    labels = dict(label.split("=", 1) for label in args.label)
    podlet = Podlet(
        args.node_name,
        args.kubeconfig,
        args.root,
        args.apiserver_port,
        kubelet_version=args.kubelet_version,
        volume_resync_seconds=args.volume_resync_seconds,
        labels=labels,
        pod_cidr=args.pod_cidr,
        provisioner_kubeconfig=args.provisioner_kubeconfig,
    )

    def on_signal(signum, frame):
        logging.getLogger("podlet").info("signal %s: stopping all containers", signum)
        podlet.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    podlet.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
