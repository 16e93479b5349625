"""`fleetward operator run`: the Kopf operator (SPEC §3). It reconciles Agents, SOPs and
Guardrails into running, credentialed agent runtimes. Normally started by the Helm
chart's Deployment; run it by hand against any kubeconfig for development."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from fleetward.operator import main

    p = sub.add_parser("operator", help="run the Fleetward operator", description=__doc__)
    op_sub = p.add_subparsers(dest="operator_command", metavar="SUBCOMMAND", required=True)
    run = op_sub.add_parser("run", help="run the operator until SIGTERM", description=__doc__)
    main.add_arguments(run)
    run.set_defaults(handler=main.run)
    uninstall = op_sub.add_parser(
        "uninstall",
        help="remove the installation's gateway and trust bundle (the chart's pre-delete hook)",
        description=main.UNINSTALL_HELP,
    )
    main.add_uninstall_arguments(uninstall)
    uninstall.set_defaults(handler=main.uninstall)
