"""The operator's Prometheus metrics (SPEC §8: reconcile duration and errors)."""

from __future__ import annotations

import time
from collections import Counter as Counter_
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import kopf
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
AGENT_PHASES = ("Pending", "Ready", "Degraded", "Paused", "Halted")


@contextmanager
def reconcile_measured(kind: str) -> Iterator[None]:
    """Time a handler's reconcile of one `kind` object (SOP, Guardrail, KillSwitch; Agents
    are measured inside reconcile_agent, which knows retries apart). A Kopf TemporaryError
    is a retry (waiting for something to settle), not an error; any other exception counts
    as an error named by its class."""
    started = time.monotonic()
    try:
        yield
    except kopf.TemporaryError:
        RECONCILE_SECONDS.labels(kind, "retry").observe(time.monotonic() - started)
        raise
    except Exception as e:
        RECONCILE_SECONDS.labels(kind, "error").observe(time.monotonic() - started)
        RECONCILE_ERRORS.labels(kind, type(e).__name__).inc()
        raise
    RECONCILE_SECONDS.labels(kind, "ok").observe(time.monotonic() - started)


class AgentsByPhase(Collector):
    """fleetward_operator_agents{phase}: the Agents this replica reconciles, by the phase it
    last wrote, counted when scraped (nothing to keep in step on every status write). Every
    phase is reported, 0 included, so a panel or rule sees "none Degraded" rather than no
    data. A replica that stands by reports nothing: its statuses may be stale, and a sum over
    replicas would count every Agent twice."""

    def __init__(self, phases: Callable[[], Iterable[str | None]], acting: Callable[[], bool | None]) -> None:
        self._phases = phases
        self._acting = acting

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "fleetward_operator_agents", "Agents known to the operator, by phase.", labels=["phase"]
        )

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "fleetward_operator_agents", "Agents known to the operator, by phase.", labels=["phase"]
        )
        if self._acting() is not False:
            counts = Counter_(phase for phase in self._phases() if phase)
            for phase in AGENT_PHASES:
                family.add_metric([phase], counts.get(phase, 0))
        yield family


def register_agents_by_phase(
    phases: Callable[[], Iterable[str | None]],
    acting: Callable[[], bool | None],
    registry: CollectorRegistry = REGISTRY,
) -> AgentsByPhase:
    collector = AgentsByPhase(phases, acting)
    registry.register(collector)
    return collector


class KillSwitchesActive(Collector):
    """fleetward_kill_switch_active{kill_switch}: 1 while a switch this installation handles
    is engaged, 0 once released, gone once deleted. Computed when scraped from the revoker's
    watch of the KillSwitches, so that every replica reports the API server's truth; a gauge
    set by the handler that acted stayed at its last value on a replica that stopped acting,
    and kept the alert (a max over replicas) firing after a release."""

    NAME = "fleetward_kill_switch_active"
    HELP = "1 while the KillSwitch is engaged, 0 once released."

    def __init__(self, switches: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        self._switches = switches

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["kill_switch"])

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["kill_switch"])
        for name, engaged in self._switches():
            family.add_metric([name], 1 if engaged else 0)
        yield family


def register_kill_switches_active(
    switches: Callable[[], Iterable[tuple[str, bool]]], registry: CollectorRegistry = REGISTRY
) -> KillSwitchesActive:
    collector = KillSwitchesActive(switches)
    registry.register(collector)
    return collector


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
