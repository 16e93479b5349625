"""`fleetward dev`: the local cluster (see fleetward.devcluster)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
