"""Entry point of the `fleetward` command (also usable as `kubectl fleetward`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    # Installed twice: `fleetward` and `kubectl-fleetward` (so `kubectl fleetward kill ...` works).
    prog = "kubectl fleetward" if sys.argv and sys.argv[0].endswith("kubectl-fleetward") else "fleetward"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fleetward: run fleets of LLM agents on Kubernetes under SOPs, guardrails and a kill switch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from fleetward.cli import audit, crds, dev, guardrail, killswitch, llm, operator, runtime, schemas, sessions

    operator.register(sub)
    runtime.register(sub)
    guardrail.register(sub)
    llm.register(sub)
    crds.register(sub)
    dev.register(sub)
    schemas.register(sub)
    audit.register(sub)
    killswitch.register(sub)
    sessions.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
