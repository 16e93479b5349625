#!/usr/bin/env python3
"""Generate the Grafana dashboards of charts/fleetward/monitoring/dashboards/ (SPEC §8).

    .venv/bin/python hack/dashboards.py            # write the JSON files
    .venv/bin/python hack/dashboards.py --check    # fail if they are stale (tests do this)

Three dashboards: executive (what the fleet does and costs), operational (runtimes, tools,
guardrails, gateway, operator), kill switch / debug. Each panel is one line below; the JSON
model Grafana wants (grid positions, ids, datasource references, variables) is filled in
here, so a panel cannot be added without a query the tests check against a real Prometheus
(tests/integration/test_githouse_enterprise.py).

Why not grafanalib or the Grafana Foundation SDK: three dashboards of plain PromQL panels
need a few dozen lines of JSON shape, not a dependency; the output is plain dashboard JSON
that Grafana imports as is and that people can read in review.

Queries use Grafana's own variables only: `$agent` (multi-value, "All" = `.*`),
`$__rate_interval`, `$__range`. The `agent` label is namespace/name.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "charts" / "fleetward" / "monitoring" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
AGENT = 'agent=~"$agent"'


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"  # timeseries | stat | bargauge | table
    unit: str = "short"
    width: int = 8
    height: int = 8
    description: str = ""
    decimals: int | None = None
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)  # (from, color)


@dataclass
class Row:
    title: str


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    items: list[Panel | Row]
    time_from: str = "now-6h"


def p(title: str, expr: str, legend: str = "", **kw) -> Panel:
    return Panel(title, [(expr, legend)], **kw)


# --- The three dashboards -------------------------------------------------------------------

EXECUTIVE = Dashboard(
    uid="fleetward-executive",
    title="Fleetward / Executive",
    description="What the agent fleet does and what it costs: runs, outcomes, spend, budgets, reviews, kill switches.",
    time_from="now-24h",
    items=[
        Row("Fleet"),
        p(
            "Agents by phase",
            "sum by (phase) (fleetward_operator_agents)",
            "{{phase}}",
            kind="stat",
            width=6,
            height=5,
            description="Agents the operator knows, by status.phase.",
        ),
        p(
            "Runs in the period",
            f'sum(increase(fleetward_agent_run_duration_seconds_count{{{AGENT},outcome!="duplicate"}}[$__range]))',
            "runs",
            kind="stat",
            width=6,
            height=5,
            decimals=0,
        ),
        p(
            "Spend in the period",
            f"sum(increase(fleetward_agent_cost_usd_total{{{AGENT}}}[$__range]))",
            "USD",
            kind="stat",
            unit="currencyUSD",
            width=6,
            height=5,
            decimals=2,
            description="Tokens x the model prices (spec.model.pricing, else the installation's modelPrices).",
        ),
        p(
            "Kill switches engaged",
            "count(max by (kill_switch) (fleetward_kill_switch_active) > 0) or vector(0)",
            "engaged",
            kind="stat",
            width=6,
            height=5,
            thresholds=[(None, "green"), (1, "red")],
        ),
        Row("Outcomes and spend"),
        p(
            "Runs by outcome",
            f"sum by (outcome) (rate(fleetward_agent_run_duration_seconds_count{{{AGENT}}}[$__rate_interval]))",
            "{{outcome}}",
            unit="ops",
            width=12,
            description="Run segments per second: completed, waiting (for a reviewer), budget_stopped, failed, stopped, duplicate.",
        ),
        p(
            "Spend per hour by agent",
            f"sum by (agent) (rate(fleetward_agent_cost_usd_total{{{AGENT}}}[$__rate_interval])) * 3600",
            "{{agent}}",
            unit="currencyUSD",
            width=12,
        ),
        p(
            "Tokens by agent",
            f"sum by (agent) (increase(fleetward_agent_tokens_total{{{AGENT}}}[$__range]))",
            "{{agent}}",
            kind="bargauge",
            width=8,
            decimals=0,
        ),
        p(
            "Daily token budget used",
            f"max by (agent) (fleetward_budget_utilization_ratio{{{AGENT}}})",
            "{{agent}}",
            kind="bargauge",
            unit="percentunit",
            width=8,
            thresholds=[(None, "green"), (0.8, "orange"), (0.95, "red")],
        ),
        p(
            "Runs waiting for a reviewer",
            f"max by (agent) (fleetward_human_review_queue_depth{{{AGENT}}})",
            "{{agent}}",
            kind="bargauge",
            width=8,
            decimals=0,
        ),
        p(
            "Guardrail interventions",
            f"sum by (kind) (increase(fleetward_guardrail_violations_total{{{AGENT}}}[$__range]))",
            "{{kind}}",
            kind="bargauge",
            width=12,
            decimals=0,
            description="Blocks, escalations, SOP-gate and allow-list refusals, by kind.",
        ),
        p(
            "PII values redacted or blocked",
            f"sum by (type) (increase(fleetward_pii_detections_total{{{AGENT}}}[$__range]))",
            "{{type}}",
            kind="bargauge",
            width=12,
            decimals=0,
        ),
    ],
)

OPERATIONAL = Dashboard(
    uid="fleetward-operational",
    title="Fleetward / Operational",
    description="Runtimes, models, tools, guardrails, the WebSocket gateway and the operator.",
    items=[
        Row("Runtimes"),
        p("Ready runtime pods", f"sum by (agent) (fleetward_runtime_ready{{{AGENT}}})", "{{agent}}", width=6),
        p("Runs in flight", f"sum by (agent) (fleetward_runtime_runs_in_flight{{{AGENT}}})", "{{agent}}", width=6),
        p(
            "Requests taken",
            f"sum by (agent, outcome) (rate(fleetward_runtime_requests_total{{{AGENT}}}[$__rate_interval]))",
            "{{agent}} {{outcome}}",
            unit="reqps",
            width=12,
            description="Commands taken from the request topics, by outcome (dead_lettered: sent to the DLQ).",
        ),
        Panel(
            "Run duration",
            [
                (
                    f"histogram_quantile(0.5, sum by (agent, le) (rate(fleetward_agent_run_duration_seconds_bucket{{{AGENT}}}[$__rate_interval])))",
                    "p50 {{agent}}",
                ),
                (
                    f"histogram_quantile(0.95, sum by (agent, le) (rate(fleetward_agent_run_duration_seconds_bucket{{{AGENT}}}[$__rate_interval])))",
                    "p95 {{agent}}",
                ),
            ],
            unit="s",
            width=12,
        ),
        p(
            "Session events published",
            f"sum by (type) (rate(fleetward_runtime_events_total{{{AGENT}}}[$__rate_interval]))",
            "{{type}}",
            unit="ops",
            width=12,
        ),
        Row("Models and tools"),
        p(
            "Model calls",
            f"sum by (model, outcome) (rate(fleetward_agent_model_calls_total{{{AGENT}}}[$__rate_interval]))",
            "{{model}} {{outcome}}",
            unit="ops",
            width=8,
        ),
        p(
            "Tokens",
            f"sum by (kind) (rate(fleetward_agent_tokens_total{{{AGENT}}}[$__rate_interval]))",
            "{{kind}}",
            unit="short",
            width=8,
        ),
        p(
            "Router hand-offs",
            f"sum by (topic, target) (rate(fleetward_router_handoffs_total{{{AGENT}}}[$__rate_interval]))",
            "{{topic}} -> {{target}}",
            unit="ops",
            width=8,
        ),
        p(
            "Tool call duration p95",
            f"histogram_quantile(0.95, sum by (tool, le) (rate(fleetward_tool_duration_seconds_bucket{{{AGENT}}}[$__rate_interval])))",
            "{{tool}}",
            unit="s",
            width=8,
        ),
        p(
            "Tool calls",
            f"sum by (tool, outcome) (rate(fleetward_tool_duration_seconds_count{{{AGENT}}}[$__rate_interval]))",
            "{{tool}} {{outcome}}",
            unit="ops",
            width=8,
        ),
        p(
            "Tool errors and refusals",
            f"sum by (tool, reason) (rate(fleetward_tool_errors_total{{{AGENT}}}[$__rate_interval]))",
            "{{tool}} {{reason}}",
            unit="ops",
            width=8,
        ),
        p(
            "Tool circuit breakers",
            f"max by (agent, tool) (fleetward_tool_circuit_state{{{AGENT}}})",
            "{{agent}} {{tool}}",
            width=12,
            description="0 closed, 1 half-open, 2 open.",
            thresholds=[(None, "green"), (1, "orange"), (2, "red")],
        ),
        p(
            "Guardrail interventions",
            f"sum by (stage, kind, action) (rate(fleetward_guardrail_violations_total{{{AGENT}}}[$__rate_interval]))",
            "{{stage}} {{kind}} {{action}}",
            unit="ops",
            width=12,
        ),
        Row("Gateway"),
        p("WebSocket connections", "sum(fleetward_gateway_connections)", "connections", width=6),
        p(
            "Deliveries",
            "sum(rate(fleetward_gateway_deliveries_total[$__rate_interval]))",
            "frames/s",
            unit="ops",
            width=6,
        ),
        Panel(
            "Delivery latency",
            [
                (
                    "histogram_quantile(0.5, sum by (le) (rate(fleetward_gateway_delivery_latency_seconds_bucket[$__rate_interval])))",
                    "p50",
                ),
                (
                    "histogram_quantile(0.99, sum by (le) (rate(fleetward_gateway_delivery_latency_seconds_bucket[$__rate_interval])))",
                    "p99",
                ),
            ],
            unit="s",
            width=6,
        ),
        p(
            "Kafka lag",
            "sum by (pod) (fleetward_gateway_kafka_lag)",
            "{{pod}}",
            width=6,
            description="Events between each replica's position and the events topic's end.",
        ),
        p("Sessions by state", "sum by (state) (fleetward_gateway_sessions)", "{{state}}", width=8),
        p(
            "Handshakes refused",
            "sum by (status) (rate(fleetward_gateway_handshake_refusals_total[$__rate_interval]))",
            "{{status}}",
            unit="ops",
            width=8,
        ),
        p(
            "Kafka reachable",
            "min by (pod) (fleetward_gateway_kafka_up)",
            "{{pod}}",
            width=8,
            thresholds=[(None, "red"), (1, "green")],
        ),
        Row("Operator"),
        p(
            "Reconcile duration p95",
            "histogram_quantile(0.95, sum by (kind, le) (rate(fleetward_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
            "{{kind}}",
            unit="s",
            width=12,
        ),
        p(
            "Reconciles",
            "sum by (kind, result) (rate(fleetward_operator_reconcile_duration_seconds_count[$__rate_interval]))",
            "{{kind}} {{result}}",
            unit="ops",
            width=12,
        ),
    ],
)

KILL_SWITCH = Dashboard(
    uid="fleetward-killswitch",
    title="Fleetward / Kill switch and debug",
    description="Kill switches, revocation and drain times, halted runtimes and what the gateways did about them.",
    items=[
        Row("Kill switches"),
        p(
            "Engaged",
            "max by (kill_switch) (fleetward_kill_switch_active)",
            "{{kill_switch}}",
            kind="stat",
            width=8,
            thresholds=[(None, "green"), (1, "red")],
        ),
        p(
            "Seconds to revoke every credential",
            "max by (kill_switch) (fleetward_kill_switch_revocation_seconds)",
            "{{kill_switch}}",
            kind="stat",
            unit="s",
            width=8,
            decimals=3,
            description="From the engage being accepted until keys left the trust bundle and Kafka access was withdrawn.",
        ),
        p(
            "Seconds to drain",
            "max by (kill_switch) (fleetward_kill_switch_drain_seconds)",
            "{{kill_switch}}",
            kind="stat",
            unit="s",
            width=8,
            decimals=2,
        ),
        Row("Agents and runtimes"),
        p(
            "Agents halted",
            'sum(fleetward_operator_agents{phase="Halted"})',
            "halted",
            kind="stat",
            width=6,
            description="Agents whose phase is Halted: a switch covers them (their runtimes may be scaled to zero).",
        ),
        p(
            "Halted runtime pods",
            f"sum by (agent) (fleetward_runtime_halted{{{AGENT}}})",
            "{{agent}}",
            width=9,
            description="Runtime pods that obeyed a halt and still run (a switch without scaleToZero, or draining).",
        ),
        p(
            "Runs halted and resumed",
            f'sum by (agent, type) (increase(fleetward_runtime_events_total{{{AGENT},type=~"halted|resumed"}}[$__range]))',
            "{{agent}} {{type}}",
            kind="table",
            width=9,
            description="Runs in flight when a switch engaged (halted) and picked up again after the release (resumed).",
        ),
        Row("Gateways"),
        p("Kill switches a gateway enforces", "max(fleetward_gateway_halted_kill_switches)", "halting", width=8),
        p(
            "Control orders",
            "sum by (type, outcome) (increase(fleetward_gateway_control_messages_total[$__range]))",
            "{{type}} {{outcome}}",
            kind="table",
            width=8,
        ),
        p(
            "Connections closed",
            "sum by (code) (increase(fleetward_gateway_closes_total[$__range]))",
            "{{code}}",
            kind="bargauge",
            width=8,
            decimals=0,
            description="4009: halted by a kill switch; 4003: signing key revoked or forbidden; 4008: slow client; 1001: shutdown.",
        ),
        p("Agent keys trusted", "min(fleetward_gateway_trust_bundle_keys)", "keys", width=8),
        p(
            "Keys covered by an engaged switch",
            "max(fleetward_gateway_trust_bundle_keys_covered_by_kill_switch)",
            "keys",
            width=8,
        ),
        p(
            "Token refusals",
            "sum by (reason) (rate(fleetward_gateway_auth_refusals_total[$__rate_interval]))",
            "{{reason}}",
            unit="ops",
            width=8,
        ),
    ],
)

DASHBOARDS = [EXECUTIVE, OPERATIONAL, KILL_SWITCH]


# --- JSON model ---------------------------------------------------------------------------


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": panel.unit}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": color, "value": start} for start, color in panel.thresholds],
        }
        defaults["color"] = {"mode": "thresholds"}
    options: dict = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    if panel.kind == "timeseries":
        options = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif panel.kind == "table":
        options = {"showHeader": True}
    targets = []
    for i, (expr, legend) in enumerate(panel.exprs):
        target = {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
        if panel.kind == "table":
            target |= {"instant": True, "format": "table"}
        elif panel.kind in ("stat", "bargauge"):
            target["instant"] = True
        targets.append(target)
    out = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.description:
        out["description"] = panel.description
    return out


def dashboard_json(d: Dashboard) -> dict:
    panels: list[dict] = []
    x = y = row_height = 0
    for pid, item in enumerate(d.items, start=1):
        if isinstance(item, Row):
            y += row_height
            x = row_height = 0
            panels.append({"id": pid, "type": "row", "title": item.title, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
            y += 1
            continue
        if x + item.width > 24:
            y += row_height
            x = row_height = 0
        panels.append(_panel_json(item, pid, x, y))
        x += item.width
        row_height = max(row_height, item.height)
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["fleetward"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": d.time_from, "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                {
                    "name": "agent",
                    "label": "Agent",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": "label_values(fleetward_runtime_ready, agent)",
                    "query": {"query": "label_values(fleetward_runtime_ready, agent)", "refId": "agent"},
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "refresh": 2,
                    "sort": 1,
                },
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render(d: Dashboard) -> str:
    return json.dumps(dashboard_json(d), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON files differ from what this writes")
    args = parser.parse_args(argv)
    stale = []
    for d in DASHBOARDS:
        path = OUT / f"{d.uid.removeprefix('fleetward-')}.json"
        text = render(d)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale dashboards (run `make dashboards`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
