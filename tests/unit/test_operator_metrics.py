"""fleetward_operator_agents{phase}: counted from the statuses the operator last wrote, every
phase reported (0 included), nothing from a replica that stands by.
fleetward_kill_switch_active{kill_switch}: read from the watched KillSwitches when scraped,
the same on every replica, whichever one acted."""

from __future__ import annotations

from fleetward.operator.killswitch.revoker import SwitchView
from fleetward.operator.metrics import AGENT_PHASES, register_agents_by_phase, register_kill_switches_active
from fleetward.operator.settings import OperatorSettings
from prometheus_client import CollectorRegistry, generate_latest


def _by_label(registry: CollectorRegistry, metric: str, label: str) -> dict[str, float]:
    """The samples of one metric, by the value of one label."""
    return {s.labels[label]: s.value for family in registry.collect() if family.name == metric for s in family.samples}


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    return _by_label(registry, "fleetward_operator_agents", "phase")


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


def _switch(name: str, engaged: bool, namespaces: list[str] | None = None) -> dict:
    scope = {"namespaces": namespaces} if namespaces else {}
    return {"metadata": {"name": name}, "spec": {"engaged": engaged, "reason": "incident", "scope": scope}}


def _active(registry: CollectorRegistry) -> dict[str, float]:
    return _by_label(registry, "fleetward_kill_switch_active", "kill_switch")


def test_kill_switch_active_follows_the_watched_switches_on_every_replica():
    """Two replicas of one installation: A acted on the engage, B (after a failover) on the
    release. Both watch the switch, so both report 0 once it is released; before, A kept
    the 1 it had set, and the alert (max over replicas) kept firing."""
    settings = OperatorSettings(namespace="fleetward-system")
    replicas = [SwitchView(settings), SwitchView(settings)]
    registries = [CollectorRegistry(), CollectorRegistry()]
    for view, registry in zip(replicas, registries, strict=True):
        register_kill_switches_active(view.engaged, registry)
        view.set_switch(_switch("stop-all", True))
    assert [_active(r) for r in registries] == [{"stop-all": 1}, {"stop-all": 1}]
    for view in replicas:
        view.set_switch(_switch("stop-all", False))
    assert [_active(r) for r in registries] == [{"stop-all": 0}, {"stop-all": 0}]
    assert b'fleetward_kill_switch_active{kill_switch="stop-all"} 0.0' in generate_latest(registries[0])
    replicas[0].set_switch(_switch("stop-all", False), deleted=True)
    assert _active(registries[0]) == {}  # a deleted switch leaves no series behind


def test_kill_switch_active_leaves_out_switches_of_other_installations():
    """A namespace-scoped installation reports the switches that cover its Agents or name
    its namespaces, not another team's."""
    settings = OperatorSettings(namespace="team-a-system", watch_namespaces=["team-a"])
    view = SwitchView(settings)
    view.set_agent({"metadata": {"namespace": "team-a", "name": "billing"}})
    view.set_switch(_switch("team-b-stop", True, ["team-b"]))
    view.set_switch(_switch("team-a-stop", True, ["team-a"]))
    view.set_switch(_switch("everything", False))  # empty scope: covers team-a's Agent too
    registry = CollectorRegistry()
    register_kill_switches_active(view.engaged, registry)
    assert _active(registry) == {"everything": 0, "team-a-stop": 1}


def test_every_kind_of_reconcile_is_timed_and_its_errors_counted():
    import kopf
    import pytest
    from fleetward.operator.metrics import reconcile_measured
    from prometheus_client import REGISTRY

    def count(kind: str, result: str) -> float:
        labels = {"kind": kind, "result": result}
        return REGISTRY.get_sample_value("fleetward_operator_reconcile_duration_seconds_count", labels) or 0.0

    def errors(kind: str, reason: str) -> float:
        return (
            REGISTRY.get_sample_value("fleetward_operator_reconcile_errors_total", {"kind": kind, "reason": reason})
            or 0.0
        )

    before = {r: count("KillSwitch", r) for r in ("ok", "retry", "error")}
    before_errors = errors("KillSwitch", "RuntimeError"), errors("KillSwitch", "TemporaryError")
    with reconcile_measured("KillSwitch"):
        pass
    with pytest.raises(kopf.TemporaryError), reconcile_measured("KillSwitch"):
        raise kopf.TemporaryError("agents not settled yet")
    with pytest.raises(RuntimeError), reconcile_measured("KillSwitch"):
        raise RuntimeError("boom")
    assert {r: count("KillSwitch", r) - before[r] for r in before} == {"ok": 1, "retry": 1, "error": 1}
    assert errors("KillSwitch", "RuntimeError") - before_errors[0] == 1
    assert errors("KillSwitch", "TemporaryError") == before_errors[1] == 0  # a retry is no error
