"""`fleetward schemas`: generate or check the JSON Schemas in schemas/ (event/command envelopes,
runtime config) from the typed models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_DIR = REPO / "schemas"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schemas", help="generate or check the JSON Schemas in schemas/", description=__doc__)
    p.add_argument("action", choices=["generate"], help="write the schemas from fleetward.api")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="output folder (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is stale")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fleetward.api import schemagen

    if args.check:
        stale = schemagen.stale_files(args.dir)
        for name in stale:
            print(f"stale schema {args.dir / name}; run `fleetward schemas generate`", file=sys.stderr)
        return 1 if stale else 0
    for path in schemagen.write_all(args.dir):
        print(f"wrote {path}")
    return 0
