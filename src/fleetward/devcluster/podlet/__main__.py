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

from fleetward.devcluster.podlet.node import LogServerSettings, Podlet


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
    logs = p.add_argument_group(
        "container logs", "serve `kubectl logs` like a kubelet (all four options, or none: not served)"
    )
    logs.add_argument("--log-port", type=int, help="port on the node's address (0: any free port)")
    logs.add_argument("--tls-cert-file", type=Path, help="serving certificate (its SANs must name the node's address)")
    logs.add_argument("--tls-private-key-file", type=Path, help="its private key")
    logs.add_argument("--client-ca-file", type=Path, help="CA of the API server's kubelet client certificate")
    logs.add_argument(
        "--log-reader",
        action="append",
        default=[],
        metavar="CN",
        help="client certificate common name allowed to read logs (repeatable; the API server's)",
    )
    args = p.parse_args(argv)
    log_options = (args.log_port, args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    if any(o is not None for o in log_options) and not all(o is not None for o in log_options):
        p.error("--log-port, --tls-cert-file, --tls-private-key-file and --client-ca-file go together")
    if args.log_port is not None and not args.log_reader:
        p.error("--log-reader: name at least one client identity that may read logs")
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
        log_server=LogServerSettings(
            args.log_port, args.tls_cert_file, args.tls_private_key_file, args.client_ca_file, tuple(args.log_reader)
        )
        if args.log_port is not None
        else None,
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
