"""`fleetward crds`: generate or check the CRD YAML from the typed API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# The same CRDs go to crds/ (kubectl apply -f crds/) and into the Helm chart.
DEFAULT_DIRS = [REPO / "crds", REPO / "charts" / "fleetward" / "crds"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crds", help="generate or check the CRDs in crds/", description=__doc__)
    p.add_argument("action", choices=["generate"], help="write crds/*.yaml from fleetward.api")
    p.add_argument(
        "--out",
        type=Path,
        action="append",
        help="output folder, repeatable (default: crds/ and charts/fleetward/crds/)",
    )
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are stale")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fleetward.api import crdgen

    dirs = args.out or DEFAULT_DIRS
    if args.check:
        problems = [f"{d}/{p}" for d in dirs for p in crdgen.stale(d)]
        for p in problems:
            print(f"stale CRD {p}; run `fleetward crds generate`", file=sys.stderr)
        return 1 if problems else 0
    for d in dirs:
        for path in crdgen.generate(d):
            print(f"wrote {path}")
    return 0
