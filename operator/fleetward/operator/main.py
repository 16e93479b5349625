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


def _settings_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--settings",
        type=Path,
        default=os.environ.get("FLEETWARD_SETTINGS") or None,
        help="the installation's operator settings YAML (default: $FLEETWARD_SETTINGS, else built-in defaults)",
    )


def _load_settings(path: Path | None):
    """The operator settings, or None after printing why they cannot be read (exit code 2)."""
    from fleetward.operator.settings import SettingsError, load

    try:
        return load(path)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    _settings_argument(p)
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
    from prometheus_client import start_http_server

    settings = _load_settings(args.settings)
    if settings is None:
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


UNINSTALL_HELP = """Remove what the operator made for the installation itself: the gateway (Deployment,
Service, HPA) and, when no Agent is left, the trust bundle. The chart runs it as a pre-delete
hook, so `helm uninstall` leaves nothing of the installation behind. It scales the operator
to zero first (it would re-apply the gateway), and scales it back when a deletion fails.
Agents are yours and stay: delete them first, their finalizers need the operator."""


def add_uninstall_arguments(p: argparse.ArgumentParser) -> None:
    _settings_argument(p)
    p.add_argument(
        "--operator-deployment",
        metavar="NAME",
        default=None,
        help="the operator Deployment in the installation namespace, scaled to zero first so that it "
        "re-applies nothing (default: none is stopped)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds to wait for the operator's pods to stop (default: 90)",
    )


def uninstall(args: argparse.Namespace) -> int:
    import asyncio

    from fleetward.operator import uninstall as steps
    from fleetward.operator.kube import Kube, KubeError

    settings = _load_settings(args.settings)
    if settings is None:
        return 2

    def say(line: str) -> None:
        print(line, flush=True)

    async def go() -> steps.UninstallReport:
        kube = await Kube.connect()
        try:
            return await steps.uninstall(
                kube, settings, operator_deployment=args.operator_deployment, timeout=args.timeout, say=say
            )
        finally:
            await kube.close()

    try:
        report = asyncio.run(go())
    except (steps.UninstallFailed, KubeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in report.deleted:
        say(f"deleted {settings.namespace}/{name}")
    for why in report.kept:
        say(f"kept {settings.namespace}/{why}")
    if report.agents_left:
        shown = ", ".join(report.agents_left[:10]) + (" ..." if len(report.agents_left) > 10 else "")
        say(
            f"warning: {len(report.agents_left)} Agent(s) remain ({shown}): their runtimes keep running "
            "unmanaged, and deleting them later waits for an operator to remove their finalizers"
        )
    return 0
