"""`fleetward crds`: generate or check the CRD YAML from the typed API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parents[3] / "crds"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crds", help="generate or check the CRDs in crds/", description=__doc__)
    p.add_argument("action", choices=["generate"], help="write crds/*.yaml from fleetward.api")
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="output folder (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are stale")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fleetward.api import crdgen

    if args.check:
        problems = crdgen.stale(args.out)
        for p in problems:
            print(f"stale CRD {p}; run `fleetward crds generate`", file=sys.stderr)
        return 1 if problems else 0
    for path in crdgen.generate(args.out):
        print(f"wrote {path}")
    return 0
