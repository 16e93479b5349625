"""The command line of `fleetward runtime run`, apart from the runtime itself: building
the `fleetward` parser must not import LangGraph, LangChain and the embedding model (64 MiB
and ~1,400 modules) into every other command, the operator included."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("FLEETWARD_CONFIG"),
        help="rendered runtime config (default: $FLEETWARD_CONFIG)",
    )
    p.add_argument(
        "--listen",
        default=None,
        help="HOST:PORT for /healthz, /readyz, /metrics (default: $POD_IP and the config's server.port)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and credentials, then exit")
