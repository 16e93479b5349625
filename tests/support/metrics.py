"""Which Prometheus metrics the components declare, for tests of the rules and dashboards
that read them: a name a query uses must be declared by the runtime, the operator or the
gateway (a typo or a renamed metric would otherwise give an alert that never fires and a
panel that stays empty)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (
    ROOT / "agent-runtime/fleetward/runtime",
    ROOT / "operator/fleetward/operator",
    ROOT / "gateway-rs/src/metrics.rs",
)
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@cache
def _declarations() -> str:
    files = [f for src in SOURCES for f in ([src] if src.is_file() else sorted(src.rglob("*.py")))]
    return "\n".join(f.read_text() for f in files)


def metric_names(query_text: str) -> set[str]:
    """Fleetward metric names in PromQL text."""
    return set(re.findall(r"\bfleetward_[a-z_]+\b", query_text))


def undeclared(names: set[str]) -> list[str]:
    """The names no component declares (as a string literal), histogram suffixes allowed."""
    missing = []
    for name in sorted(names):
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                base = name[: -len(suffix)]
        if f'"{base}"' not in _declarations():
            missing.append(name)
    return missing
