"""`fleetward schemas`: generate or check the envelope JSON Schema from the typed models."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_OUT = REPO / "schemas" / "envelopes.schema.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schemas", help="generate or check schemas/envelopes.schema.json", description=__doc__)
    p.add_argument("action", choices=["generate"], help="write the schema from fleetward.api.envelopes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is stale")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fleetward.api import schemagen

    if args.check:
        if schemagen.is_stale(args.out):
            print(f"stale schema {args.out}; run `fleetward schemas generate`", file=sys.stderr)
            return 1
        return 0
    print(f"wrote {schemagen.write(args.out)}")
    return 0
