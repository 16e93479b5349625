"""The operator's Prometheus metrics (SPEC §8: reconcile duration and errors)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram(
    "fleetward_operator_reconcile_duration_seconds",
    "Time to reconcile one object, by kind and result.",
    ["kind", "result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "fleetward_operator_reconcile_errors_total",
    "Reconciles that ended in an error, by kind and condition reason.",
    ["kind", "reason"],
)
AGENTS = Gauge("fleetward_operator_agents", "Agents known to the operator, by phase.", ["phase"])
KILL_SWITCH_ACTIVE = Gauge(
    "fleetward_kill_switch_active",
    "1 while the KillSwitch is engaged, 0 once released.",
    ["kill_switch"],
)
KILL_SWITCH_REVOCATION_SECONDS = Gauge(
    "fleetward_kill_switch_revocation_seconds",
    "Seconds from the engage being accepted until the covered agents' keys and Kafka access were withdrawn.",
    ["kill_switch"],
)
KILL_SWITCH_DRAIN_SECONDS = Gauge(
    "fleetward_kill_switch_drain_seconds",
    "Seconds from the engage being accepted until every covered runtime drained or was stopped by force.",
    ["kill_switch"],
)
