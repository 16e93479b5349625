"""The Grafana dashboards of charts/fleetward/monitoring/dashboards/, as tests need them:
every panel query, with Grafana's variables replaced the way Grafana does for "All"."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fleetward.devcluster.process import wait_for
from tests.support.metrics import metric_names

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


def wait_for_data_in_every_panel(
    prometheus: Any, board: dict, except_: Iterable[str] = (), timeout: float = 90
) -> None:
    """Wait until every panel of `board` but those named in `except_` shows data; fails
    naming the panels that still show none."""
    skip = set(except_)

    def missing() -> list[str]:
        return [p for p in panels_without_data(prometheus, board) if p not in skip]

    try:
        wait_for(lambda: not missing(), timeout, f"data in every panel of {board['title']}")
    except Exception:
        raise AssertionError(f"{board['title']}: panels without data: {missing()}") from None


def panel_metrics(board: dict, titles: Iterable[str]) -> set[str]:
    """The Fleetward metrics the panels named `titles` read."""
    wanted = set(titles)
    return {
        name
        for panel in board["panels"]
        if panel["title"] in wanted
        for target in panel["targets"]
        for name in metric_names(target["expr"])
    }
