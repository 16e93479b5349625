"""The runtime's state volume (settings `runtime.stateVolume`): in SQLite mode a
single-replica Agent's checkpoints and dedupe ledger live on a PersistentVolumeClaim, so a
kill switch's scale to zero or the roll after its release does not lose them; Agents
with several pods keep a per-pod emptyDir; with PostgreSQL nothing is claimed."""

from __future__ import annotations

import pytest
from fleetward.operator.desired.agent import desired_agent, state_claim_name
from fleetward.operator.kube import KINDS, with_live_claim_spec
from fleetward.operator.settings import OperatorSettings, SettingsError, load
from test_operator_desired import AGENTS, inputs_for

from fleetward.api.agent import AgentSpec


def _objects(name: str, settings: OperatorSettings | None = None, **spec_changes):
    spec = AgentSpec.model_validate({**AGENTS[name]["spec"], **spec_changes})
    fields = {"spec": spec}
    if settings is not None:
        fields["settings"] = settings
    desired = desired_agent(inputs_for(name, **fields))
    by_kind = {o["kind"]: o for o in desired.objects}
    return by_kind, desired.absent


def _settings(**runtime) -> OperatorSettings:
    return OperatorSettings.model_validate({"namespace": "fleetward-system", "runtime": runtime})


def _state_volume(dep: dict) -> dict:
    return next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "state")


def test_a_single_replica_agent_keeps_its_state_on_a_claim() -> None:
    objects, absent = _objects("billing")
    claim = objects["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "fw-billing-state" == state_claim_name("billing")
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    dep = objects["Deployment"]
    assert _state_volume(dep) == {"name": "state", "persistentVolumeClaim": {"claimName": "fw-billing-state"}}
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert ("PersistentVolumeClaim", "fw-billing-state") not in absent


def test_the_claim_is_applied_before_the_deployment_that_mounts_it() -> None:
    kinds = [o["kind"] for o in desired_agent(inputs_for("billing")).objects]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Deployment")
    assert kinds[-1] == "Deployment"


def test_size_and_class_come_from_the_settings() -> None:
    settings = _settings(stateVolume={"size": "5Gi", "storageClassName": "fast-ssd"})
    claim = _objects("billing", settings)[0]["PersistentVolumeClaim"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "5Gi"}}
    assert claim["spec"]["storageClassName"] == "fast-ssd"


@pytest.mark.parametrize("changes", [{"replicas": 0}, {"paused": True}])
def test_a_paused_or_zero_replica_agent_keeps_its_claim(changes) -> None:
    objects, absent = _objects("billing", **changes)
    assert objects["Deployment"]["spec"]["replicas"] == 0
    assert not absent or ("PersistentVolumeClaim", "fw-billing-state") not in absent
    assert "PersistentVolumeClaim" in objects
    assert _state_volume(objects["Deployment"])["persistentVolumeClaim"]["claimName"] == "fw-billing-state"


@pytest.mark.parametrize("name, changes", [("billing", {"replicas": 3}), ("router", {})])
def test_several_pods_keep_a_per_pod_empty_dir_and_a_left_claim_is_removed(name, changes) -> None:
    objects, absent = _objects(name, **changes)
    assert "PersistentVolumeClaim" not in objects
    assert _state_volume(objects["Deployment"]) == {"name": "state", "emptyDir": {}}
    assert objects["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"
    assert ("PersistentVolumeClaim", f"fw-{name}-state") in absent


@pytest.mark.parametrize(
    "runtime", [{"databaseSecret": "fleetward-db"}, {"stateVolume": {"enabled": False}}], ids=["postgres", "off"]
)
def test_no_claim_with_postgres_or_when_disabled_and_none_is_deleted(runtime) -> None:
    objects, absent = _objects("billing", _settings(**runtime))
    assert "PersistentVolumeClaim" not in objects
    assert _state_volume(objects["Deployment"]) == {"name": "state", "emptyDir": {}}
    assert objects["Deployment"]["spec"]["strategy"]["type"] == "RollingUpdate"
    # A claim left from before the installation changed modes holds the only copy of that
    # state: it is not pruned, it goes with the Agent.
    assert not [kind for kind, _ in absent if kind == "PersistentVolumeClaim"]


def test_a_bad_size_is_refused_with_the_field_named(tmp_path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("runtime:\n  stateVolume:\n    size: lots\n")
    with pytest.raises(SettingsError, match=r"runtime\.stateVolume\.size"):
        load(path)


def test_the_operator_can_apply_and_delete_claims() -> None:
    assert (
        KINDS["PersistentVolumeClaim"].path("ns", "fw-a-state")
        == "/api/v1/namespaces/ns/persistentvolumeclaims/fw-a-state"
    )


def test_a_reapply_keeps_the_live_claims_fixed_spec() -> None:
    """A size or class changed in the settings after the claim was created: the apply
    carries the live values (the API server refuses to change them) and still updates
    the metadata."""
    desired = _objects("billing", _settings(stateVolume={"size": "5Gi", "storageClassName": "fast"}))[0][
        "PersistentVolumeClaim"
    ]
    live = {
        "metadata": {"name": "fw-billing-state", "namespace": "githouse"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": "fleetward-local",
            "volumeMode": "Filesystem",
            "volumeName": "pvc-1234",
        },
    }
    merged = with_live_claim_spec(desired, live)
    assert merged["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
        "storageClassName": "fleetward-local",
        "volumeMode": "Filesystem",
    }
    assert merged["metadata"] == desired["metadata"]
    assert desired["spec"]["resources"] == {"requests": {"storage": "5Gi"}}  # not changed in place


def _kube_answering(*answers):
    """A Kube whose API calls answer in turn (a KubeError is raised); records the bodies."""
    from fleetward.operator.kube import Kube

    kube = Kube.__new__(Kube)
    calls: list[tuple[str, str, dict | None]] = []
    pending = list(answers)

    async def request(method, path, *, body=None, params=None, content_type="application/json"):
        calls.append((method, path, body))
        answer = pending.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    kube.request = request
    return kube, calls


@pytest.mark.parametrize("status", [422, 403])
def test_an_apply_the_api_server_refuses_for_a_claims_fixed_spec_is_retried_with_the_live_spec(status) -> None:
    import asyncio

    from fleetward.operator.kube import KubeError

    desired = _objects("billing", _settings(stateVolume={"size": "5Gi"}))[0]["PersistentVolumeClaim"]
    live = {**desired, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    refused = KubeError(status, "Invalid", "spec: Forbidden: spec is immutable after creation", "/api/v1/...")
    kube, calls = _kube_answering(refused, live, live)
    assert asyncio.run(kube.apply(desired)) == live
    assert [c[0] for c in calls] == ["PATCH", "GET", "PATCH"]
    assert calls[2][2]["spec"]["resources"] == {"requests": {"storage": "1Gi"}}


def test_other_refusals_are_not_retried() -> None:
    import asyncio

    from fleetward.operator.kube import KubeError

    claim = _objects("billing")[0]["PersistentVolumeClaim"]
    kube, calls = _kube_answering(KubeError(409, "Conflict", "conflict", "/api/v1/..."))
    with pytest.raises(KubeError):
        asyncio.run(kube.apply(claim))
    deployment = _objects("billing")[0]["Deployment"]
    kube, calls = _kube_answering(KubeError(422, "Invalid", "bad", "/apis/apps/v1/..."))
    with pytest.raises(KubeError):
        asyncio.run(kube.apply(deployment))
    assert len(calls) == 1
