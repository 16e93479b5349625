"""The Grafana dashboards (SPEC §8): generated, well-formed, every query valid PromQL over
metrics the components declare, and shipped by the chart as sidecar ConfigMaps. That every
panel shows data from a real run is checked against the dev cluster's Prometheus in
tests/integration/test_githouse_enterprise.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from fleetward.devcluster.layout import binaries
from tests.support.chart import rendered
from tests.support.dashboards import DASHBOARDS, concrete, dashboards, queries
from tests.support.metrics import metric_names, undeclared

ROOT = Path(__file__).resolve().parents[2]


def test_the_dashboard_files_are_what_the_generator_writes():
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack/dashboards.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_there_are_executive_operational_and_kill_switch_dashboards():
    titles = {d["title"] for d in dashboards().values()}
    assert titles == {"Fleetward / Executive", "Fleetward / Operational", "Fleetward / Kill switch and debug"}
    uids = [d["uid"] for d in dashboards().values()]
    assert len(set(uids)) == len(uids)


def test_panels_have_unique_ids_fit_the_grid_and_do_not_overlap():
    for name, board in dashboards().items():
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids), name
        taken: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, (name, panel["title"])
            cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not cells & taken, f"{name}: {panel['title']} overlaps another panel"
            taken |= cells


def test_every_panel_queries_prometheus_through_the_datasource_variable():
    for name, board in dashboards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["agent"]["allValue"] == ".*" and variables["agent"]["includeAll"]
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            for target in [panel, *panel["targets"]]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (name, panel["title"])


def test_every_query_is_valid_promql(tmp_path: Path):
    # promtool parses recording rules offline, so each query becomes one.
    rules = [
        {"record": f"panel:{i}", "expr": concrete(expr)}
        for board in dashboards().values()
        for i, (_, expr) in enumerate(queries(board))
    ]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [str(binaries().promtool), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_a_panel_reads_is_exported_by_a_component():
    used = {name for board in dashboards().values() for _, expr in queries(board) for name in metric_names(expr)}
    assert not undeclared(used), undeclared(used)


def test_the_chart_ships_each_dashboard_unchanged_for_the_grafana_sidecar():
    objects = rendered("monitoring.dashboards.namespace=grafana")
    maps = {
        o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap" and "-dashboard-" in o["metadata"]["name"]
    }
    assert set(maps) == {f"fw-dashboard-{p.stem}" for p in DASHBOARDS.glob("*.json")}
    for path in DASHBOARDS.glob("*.json"):
        cm = maps[f"fw-dashboard-{path.stem}"]
        assert cm["metadata"]["namespace"] == "grafana"
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"]["grafana_folder"] == "Fleetward"
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
    assert not [o for o in rendered("monitoring.dashboards.enabled=false") if "-dashboard-" in o["metadata"]["name"]]
