"""`fleetward operator run`: load the settings, register the handlers, run Kopf.

Replicas coordinate through Kopf peering: each replica starts with a random priority,
so exactly one (the highest) acts and the others stand by until its keep-alives stop. The
operator's own background loops follow the same decision (peering.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import sys
import uuid
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--settings",
        type=Path,
        default=os.environ.get("FLEETWARD_SETTINGS") or None,
        help="operator settings YAML (default: $FLEETWARD_SETTINGS, else built-in defaults)",
    )
    p.add_argument(
        "--namespace",
        action="append",
        metavar="NS",
        help="reconcile only this namespace (repeatable; overrides watchNamespaces in the settings)",
    )
    p.add_argument("--standalone", action="store_true", help="no peering: act even if other replicas run")
    p.add_argument("--priority", type=int, default=None, help="peering priority (default: random)")
    p.add_argument(
        "--listen",
        default=None,
        help="HOST:PORT of /healthz (Kopf liveness) and /metrics (default: $POD_IP:8080 and :8081)",
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    import kopf
    from fleetward.operator import handlers
    from fleetward.operator.peering import PeerIdentity
    from fleetward.operator.settings import SettingsError, load
    from prometheus_client import start_http_server

    try:
        settings = load(args.settings)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.namespace:
        settings.watch_namespaces = args.namespace
    if args.standalone:
        settings.peering = None
    host = os.environ.get("POD_IP", "127.0.0.1")
    port = 8080
    if args.listen:
        host, _, p = args.listen.rpartition(":")
        port = int(p)
    kopf.configure(log_format=kopf.LogFormat.JSON, verbose=args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    start_http_server(port + 1, addr=host)
    handlers.register(settings)
    scope = "the whole cluster" if settings.clusterwide else f"namespaces {', '.join(settings.watch_namespaces)}"
    logging.getLogger("fleetward.operator").info(
        "Fleetward operator %s reconciling %s; installation namespace %s",
        settings.installation_id,
        scope,
        settings.namespace,
    )
    # Our identity and priority in the peering object, known here as well as to Kopf: the
    # operator's background loops act only on the replica Kopf lets act (peering.py).
    peer = PeerIdentity(
        identity=f"{os.environ.get('POD_NAME') or socket.gethostname()}/{uuid.uuid4().hex[:8]}",
        priority=args.priority if args.priority is not None else random.randint(1, 2**30),
    )
    kopf.run(
        clusterwide=settings.clusterwide,
        namespaces=settings.watch_namespaces,
        memo=kopf.Memo(settings=settings, peer=peer if settings.peering is not None else None),
        standalone=settings.peering is None,
        peering_name=settings.peering,
        identity=peer.identity,
        priority=peer.priority,
        liveness_endpoint=f"http://{host}:{port}/healthz",
    )
    return 0
