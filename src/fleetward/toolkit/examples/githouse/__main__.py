"""`python -m fleetward.toolkit.examples.githouse`: run the GitHouse tool service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from fleetward.toolkit.bundle import DEFAULT_CONFIGMAP, DEFAULT_MAX_STALENESS, DEFAULT_NAMESPACE, JWKS_KEY, TrustBundle
from fleetward.toolkit.examples.githouse.app import create_app
from fleetward.toolkit.sources import SourceConfigError
from fleetward.toolkit.tokens import DEFAULT_ISSUER
from fleetward.toolkit.verify import ToolTokenVerifier

log = logging.getLogger("githouse.tools")

DEFAULT_LISTEN = "127.0.0.1:18080"


def listen_address(value: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT'."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen must be HOST:PORT with a port 1-65535, got {value!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m fleetward.toolkit.examples.githouse",
        description="GitHouse tool service (verifies Fleetward tool tokens).",
    )
    p.add_argument(
        "--listen",
        action="append",
        type=listen_address,
        metavar="HOST:PORT",
        help=f"address to serve on; repeat for several (env GITHOUSE_TOOLS_LISTEN, comma-separated; "
        f"default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--installation-id",
        default=env("FLEETWARD_INSTALLATION_ID", DEFAULT_ISSUER),
        help="expected token issuer: the Fleetward installation id (env FLEETWARD_INSTALLATION_ID; "
        f"default {DEFAULT_ISSUER})",
    )
    p.add_argument(
        "--trust-bundle-namespace",
        default=env("FLEETWARD_TRUST_BUNDLE_NAMESPACE", DEFAULT_NAMESPACE),
        help="namespace of the trust-bundle ConfigMap, i.e. the Fleetward installation namespace "
        f"(env FLEETWARD_TRUST_BUNDLE_NAMESPACE; default {DEFAULT_NAMESPACE})",
    )
    p.add_argument(
        "--trust-bundle-configmap",
        default=DEFAULT_CONFIGMAP,
        help=f"trust-bundle ConfigMap, watched through the Kubernetes API (default {DEFAULT_CONFIGMAP})",
    )
    p.add_argument("--trust-bundle-key", default=JWKS_KEY, help=f"data key of the JWKS (default {JWKS_KEY})")
    p.add_argument(
        "--trust-bundle-file",
        default=env("FLEETWARD_TRUST_BUNDLE_FILE"),
        help="read the JWKS from this file (watched every 100 ms) instead of the ConfigMap: for "
        "tests and non-Kubernetes use (env FLEETWARD_TRUST_BUNDLE_FILE)",
    )
    p.add_argument(
        "--max-staleness",
        type=float,
        default=DEFAULT_MAX_STALENESS,
        help="seconds the last known keys stay trusted while the bundle source is unreachable "
        f"(default {DEFAULT_MAX_STALENESS:.0f}); then every token is refused",
    )
    p.add_argument(
        "--watch-kill-switches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also watch KillSwitches and refuse the keys an engaged one covers at once, before the "
        "operator's trust-bundle update arrives (default on; needs get/list/watch on "
        "killswitches.fleetward.dev)",
    )
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def make_bundle(args: argparse.Namespace) -> TrustBundle:
    if args.trust_bundle_file:
        return TrustBundle.from_file(args.trust_bundle_file, max_staleness=args.max_staleness)
    return TrustBundle.from_configmap(
        args.trust_bundle_namespace,
        args.trust_bundle_configmap,
        key=args.trust_bundle_key,
        max_staleness=args.max_staleness,
        watch_kill_switches=args.watch_kill_switches,
    )


async def serve(args: argparse.Namespace) -> None:
    bundle = make_bundle(args).start()
    try:
        verifier = ToolTokenVerifier(bundle, issuer=args.installation_id)
        runner = web.AppRunner(create_app(bundle, verifier), access_log=None, handle_signals=False)
        await runner.setup()
        for host, port in args.listen:
            await web.TCPSite(runner, host, port).start()
            log.info(
                "serving GitHouse tools on %s:%d (issuer %r, trust bundle from %s)",
                host,
                port,
                args.installation_id,
                bundle.source.description if bundle.source else "-",
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await runner.cleanup()
    finally:
        bundle.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.listen:
        raw = os.environ.get("GITHOUSE_TOOLS_LISTEN", DEFAULT_LISTEN)
        try:
            args.listen = [listen_address(v.strip()) for v in raw.split(",") if v.strip()]
        except argparse.ArgumentTypeError as e:
            print(f"GITHOUSE_TOOLS_LISTEN: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        asyncio.run(serve(args))
    except SourceConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
