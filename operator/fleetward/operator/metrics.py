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
