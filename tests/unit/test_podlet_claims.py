"""persistentVolumeClaim volumes on the podlet: a claim resolves to the folder of the
hostPath volume bound to it, and the local provisioner's volumes fit their claims."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fleetward.devcluster.podlet.provisioner import (
    PROVISIONED_BY,
    PROVISIONER,
    reclaimable,
    volume_for,
    volume_name,
    wants_volume,
)
from fleetward.devcluster.podlet.volumes import VolumeNotReady, claim_path, unsupported


def _ctx(claims: dict, volumes: dict) -> NS:
    def get_claim(namespace: str, name: str):
        if (namespace, name) not in claims:
            raise ApiException(status=404, reason="Not Found")
        return claims[(namespace, name)]

    return NS(namespace="team", get_claim=get_claim, get_volume=lambda name: volumes[name])


def _claim(volume: str | None, phase: str = "Bound", deleting: bool = False) -> NS:
    return NS(
        metadata=NS(deletion_timestamp="2026-12-06T08:00:00Z" if deleting else None),
        spec=NS(volume_name=volume),
        status=NS(phase=phase),
    )


def _host_path_volume(path: Path) -> NS:
    return NS(spec=NS(host_path=NS(path=str(path))))


def test_a_bound_claim_resolves_to_its_volumes_folder(tmp_path) -> None:
    ctx = _ctx({("team", "data"): _claim("pvc-1")}, {"pvc-1": _host_path_volume(tmp_path)})
    assert claim_path(ctx, "data") == tmp_path


@pytest.mark.parametrize(
    ("claims", "volumes", "message"),
    [
        ({}, {}, 'persistentvolumeclaim "data" not found'),
        ({("team", "data"): _claim(None, "Pending")}, {}, "is not bound to a volume yet"),
        ({("team", "data"): _claim("pvc-1", deleting=True)}, {}, "is being deleted"),
        ({("team", "data"): _claim("pvc-1")}, {"pvc-1": NS(spec=NS(host_path=None))}, "not a hostPath volume"),
        ({("team", "data"): _claim("pvc-1")}, {"pvc-1": _host_path_volume(Path("/nonexistent/x"))}, "does not exist"),
    ],
    ids=["missing", "pending", "deleting", "not-host-path", "no-folder"],
)
def test_an_unusable_claim_holds_the_pod_with_a_reason(claims, volumes, message) -> None:
    with pytest.raises(VolumeNotReady, match=message):
        claim_path(_ctx(claims, volumes), "data")


def test_claims_are_a_supported_volume_type_and_others_are_still_named() -> None:
    claim = client.V1Volume(
        name="state", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name="data")
    )
    assert unsupported(claim) is None
    nfs = client.V1Volume(name="x", nfs=client.V1NFSVolumeSource(path="/", server="nfs"))
    assert unsupported(nfs) == "nfs"


CLASS = {"metadata": {"name": "fleetward-local"}, "provisioner": PROVISIONER, "reclaimPolicy": "Delete"}


def _claim_dict(**spec) -> dict:
    return {
        "metadata": {"name": "fw-billing-state", "namespace": "team", "uid": "u-1"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": "fleetward-local",
            **spec,
        },
        "status": {"phase": "Pending"},
    }


def test_the_provisioned_volume_is_pre_bound_to_its_claim(tmp_path) -> None:
    claim = _claim_dict()
    pv = volume_for(claim, CLASS, tmp_path / volume_name(claim))
    assert pv["metadata"] == {"name": "pvc-u-1", "annotations": {PROVISIONED_BY: PROVISIONER}}
    assert pv["spec"] == {
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": "Filesystem",
        "storageClassName": "fleetward-local",
        "persistentVolumeReclaimPolicy": "Delete",
        "hostPath": {"path": str(tmp_path / "pvc-u-1"), "type": "Directory"},
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": "team",
            "name": "fw-billing-state",
            "uid": "u-1",
        },
    }


def test_a_claim_without_a_size_is_refused_with_the_field_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"spec\.resources\.requests\.storage"):
        volume_for(_claim_dict(resources={}), CLASS, tmp_path)


def test_only_pending_unbound_claims_of_our_classes_want_a_volume() -> None:
    classes = {"fleetward-local": CLASS}
    assert wants_volume(_claim_dict(), classes)
    assert not wants_volume(_claim_dict(storageClassName="other"), classes)
    assert not wants_volume(_claim_dict(volumeName="pvc-u-1"), classes)
    deleting = _claim_dict()
    deleting["metadata"]["deletionTimestamp"] = "2026-12-06T08:00:00Z"
    assert not wants_volume(deleting, classes)


def test_only_our_released_volumes_with_policy_delete_are_reclaimed() -> None:
    def pv(phase: str, policy: str = "Delete", by: str = PROVISIONER) -> dict:
        return {
            "metadata": {"name": "pvc-u-1", "annotations": {PROVISIONED_BY: by}},
            "spec": {"persistentVolumeReclaimPolicy": policy},
            "status": {"phase": phase},
        }

    assert reclaimable(pv("Released"), PROVISIONER)
    assert not reclaimable(pv("Bound"), PROVISIONER)
    assert not reclaimable(pv("Released", policy="Retain"), PROVISIONER)
    assert not reclaimable(pv("Released", by="example.com/other"), PROVISIONER)
