"""Entry point of the `fleetward` command (also usable as `kubectl fleetward`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetward",
        description="Fleetward: run fleets of LLM agents on Kubernetes under SOPs, guardrails and a kill switch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from fleetward.cli import crds, dev, guardrail, llm, operator, runtime, schemas

    operator.register(sub)
    runtime.register(sub)
    guardrail.register(sub)
    llm.register(sub)
    crds.register(sub)
    dev.register(sub)
    schemas.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
