"""The Grafana dashboards of charts/fleetward/monitoring/dashboards/, as tests need them:
every panel query, with Grafana's variables replaced the way Grafana does for "All"."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts/fleetward/monitoring/dashboards"


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def concrete(expr: str, rate_interval: str = "1m", range_: str = "1h") -> str:
    """The query as Grafana sends it with every agent selected ("All" is the variable's
    allValue, `.*`) and the given intervals."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", range_)
        .replace('"$agent"', '".*"')
        .replace("$agent", ".*")
    )


def panels_without_data(prometheus: Any, board: dict, window_seconds: int = 900) -> list[str]:
    """Titles of the panels with a query that returns nothing, asked as Grafana asks over
    the last `window_seconds`: graphs as range queries (a 15 s step), stats, gauges and
    tables as instant queries over the whole window."""
    end = time.time()
    empty = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        for target in panel["targets"]:
            expr = concrete(target["expr"], rate_interval="1m", range_=f"{window_seconds}s")
            if target.get("instant"):
                result = prometheus.query(expr)
            else:
                result = prometheus.query_range(expr, end - window_seconds, end, 15)
            if not result:
                empty.append(panel["title"])
                break
    return empty


def board(title: str) -> dict:
    (found,) = [d for d in dashboards().values() if d["title"] == title]
    return found
