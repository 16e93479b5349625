"""`fleetward runtime run`: the agent runtime that runs inside each Agent's pods, driven
by the config the operator renders (SPEC §4). Started by the Agent's Deployment."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from fleetward.runtime.arguments import add_arguments

    p = sub.add_parser("runtime", help="run an agent runtime", description=__doc__)
    rt_sub = p.add_subparsers(dest="runtime_command", metavar="SUBCOMMAND", required=True)
    run = rt_sub.add_parser("run", help="run the runtime until SIGTERM", description=__doc__)
    add_arguments(run)
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here, not in register(): the runtime's dependencies are heavy (see
    # fleetward.runtime.arguments) and only this command needs them.
    from fleetward.runtime import main

    return main.run(args)
