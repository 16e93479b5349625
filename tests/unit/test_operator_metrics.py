"""fleetward_operator_agents{phase}: counted from the statuses the operator last wrote, every
phase reported (0 included), nothing from a replica that stands by."""

from __future__ import annotations

from fleetward.operator.metrics import AGENT_PHASES, register_agents_by_phase
from prometheus_client import CollectorRegistry, generate_latest


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.labels["phase"]: s.value
        for family in registry.collect()
        if family.name == "fleetward_operator_agents"
        for s in family.samples
    }


def test_agents_are_counted_by_the_phase_last_written_every_phase_reported():
    phases = ["Ready", "Ready", "Degraded", None, "Halted"]
    registry = CollectorRegistry()
    register_agents_by_phase(lambda: phases, lambda: True, registry)
    assert _samples(registry) == {"Pending": 0, "Ready": 2, "Degraded": 1, "Paused": 0, "Halted": 1}
    phases.append("Pending")  # read at each scrape, not kept in step
    assert _samples(registry)["Pending"] == 1
    assert set(AGENT_PHASES) == set(_samples(registry))
    assert b'fleetward_operator_agents{phase="Ready"} 2.0' in generate_latest(registry)


def test_a_replica_standing_by_reports_no_agents():
    acting: list[bool | None] = [False]
    registry = CollectorRegistry()
    register_agents_by_phase(lambda: ["Ready"], lambda: acting[0], registry)
    assert _samples(registry) == {}
    acting[0] = None  # peering not decided yet (or standalone): what it has
    assert _samples(registry)["Ready"] == 1
