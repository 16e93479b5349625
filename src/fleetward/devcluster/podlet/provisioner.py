"""The local cluster's volume provisioner: PersistentVolumeClaims of a StorageClass whose
provisioner is `fleetward.dev/podlet-local` (bootstrap.yaml's default class) get a
hostPath PersistentVolume, a folder under the podlet's root, created already bound to
the claim (claimRef with its uid); kube-controller-manager's PV controller completes the
binding. When the claim is deleted the PV controller marks the volume Released, and
with reclaim policy Delete the folder and the volume are removed here, as an external
provisioner does (the PV controller leaves volumes provisioned by others alone).

It runs as a thread of the podlet (the only node that runs anything, so the folders
live where the pods are) with its own identity: a node may not list claims or create
volumes. Level-based: every change of a claim or a volume wakes one pass over all of
them, and a pass runs every RESYNC seconds anyway.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("podlet.provisioner")

PROVISIONER = "fleetward.dev/podlet-local"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
RESYNC = 30.0
SETTLE = 0.1  # a burst of watch events makes one pass


def volume_name(claim: dict[str, Any]) -> str:
    """Named after the claim's uid, like other provisioners' volumes: never reused."""
    return f"pvc-{claim['metadata']['uid']}"


def wants_volume(claim: dict[str, Any], classes: dict[str, dict[str, Any]]) -> bool:
    """A claim of one of our classes that is pending and bound to no volume yet."""
    spec, status = claim.get("spec") or {}, claim.get("status") or {}
    return (
        spec.get("storageClassName") in classes
        and not spec.get("volumeName")
        and status.get("phase", "Pending") == "Pending"
        and not claim["metadata"].get("deletionTimestamp")
    )


def volume_for(claim: dict[str, Any], storage_class: dict[str, Any], path: Path) -> dict[str, Any]:
    """The PersistentVolume for a claim: its size, access modes and mode, pre-bound to it.

    No node affinity: every node of the local cluster is this machine (kwok nodes run
    nothing), so a pod using the claim may be scheduled anywhere."""
    meta, spec = claim["metadata"], claim.get("spec") or {}
    size = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if not size:
        raise ValueError(f"claim {meta['namespace']}/{meta['name']}: spec.resources.requests.storage is not set")
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume_name(claim),
            "annotations": {PROVISIONED_BY: storage_class["provisioner"]},
        },
        "spec": {
            "capacity": {"storage": size},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "storageClassName": storage_class["metadata"]["name"],
            "persistentVolumeReclaimPolicy": storage_class.get("reclaimPolicy") or "Delete",
            "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


def reclaimable(volume: dict[str, Any], provisioner: str) -> bool:
    """One of our volumes whose claim is gone (Released) and whose policy is Delete."""
    meta, spec = volume["metadata"], volume.get("spec") or {}
    return (
        (meta.get("annotations") or {}).get(PROVISIONED_BY) == provisioner
        and (volume.get("status") or {}).get("phase") == "Released"
        and spec.get("persistentVolumeReclaimPolicy") == "Delete"
        and not meta.get("deletionTimestamp")
    )


class LocalProvisioner:
    def __init__(self, api_client: client.ApiClient, directory: Path, provisioner: str = PROVISIONER):
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.storage = client.StorageV1Api(api_client)
        self.directory = directory
        self.provisioner = provisioner
        self._wake = threading.Event()

    def _plain(self, obj: Any) -> dict[str, Any]:
        return self.api_client.sanitize_for_serialization(obj)

    # -- one pass ------------------------------------------------------------------------

    def classes(self) -> dict[str, dict[str, Any]]:
        items = self.storage.list_storage_class().items
        return {c.metadata.name: self._plain(c) for c in items if c.provisioner == self.provisioner}

    def sync(self) -> None:
        classes = self.classes()
        claims = [self._plain(c) for c in self.core.list_persistent_volume_claim_for_all_namespaces().items]
        volumes = [self._plain(v) for v in self.core.list_persistent_volume().items]
        provisioned = {(v["spec"].get("claimRef") or {}).get("uid") for v in volumes}
        for claim in claims:
            if wants_volume(claim, classes) and claim["metadata"]["uid"] not in provisioned:
                self.provision(claim, classes[claim["spec"]["storageClassName"]])
        for volume in volumes:
            if reclaimable(volume, self.provisioner):
                self.delete(volume)

    def provision(self, claim: dict[str, Any], storage_class: dict[str, Any]) -> None:
        meta = claim["metadata"]
        path = self.directory / volume_name(claim)
        try:
            body = volume_for(claim, storage_class, path)
        except ValueError as e:
            log.warning("not provisioning: %s", e)
            return
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)  # like an emptyDir: whichever user the pod's processes run as
        try:
            self.core.create_persistent_volume(body)
            log.info(
                "provisioned %s for claim %s/%s at %s", body["metadata"]["name"], meta["namespace"], meta["name"], path
            )
        except ApiException as e:
            if e.status != 409:  # 409: made by an earlier pass
                raise

    def delete(self, volume: dict[str, Any]) -> None:
        name = volume["metadata"]["name"]
        path = Path((volume["spec"].get("hostPath") or {}).get("path") or "")
        if path.parent == self.directory and path.name == name:  # never a folder we did not make
            shutil.rmtree(path, ignore_errors=True)
        else:
            log.warning("volume %s: leaving %s alone (not one of the provisioner's folders)", name, path)
        try:
            self.core.delete_persistent_volume(name)
            log.info("deleted released volume %s and its folder", name)
        except ApiException as e:
            if e.status != 404:
                raise

    # -- loop ----------------------------------------------------------------------------

    def _watch(self, list_fn, what: str, stopping: threading.Event) -> None:
        """Wake a pass on every change; the pass itself reads the current state."""
        while not stopping.is_set():
            try:
                for _ in watch.Watch().stream(list_fn, timeout_seconds=300):
                    self._wake.set()
                    if stopping.is_set():
                        return
            except Exception as e:
                if not stopping.is_set():
                    log.warning("%s watch interrupted: %s", what, e)
                    time.sleep(1)

    def run(self, stopping: threading.Event) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for list_fn, what in (
            (self.core.list_persistent_volume_claim_for_all_namespaces, "claim"),
            (self.core.list_persistent_volume, "volume"),
        ):
            threading.Thread(
                target=self._watch, args=(list_fn, what, stopping), name=f"{what}-watch", daemon=True
            ).start()
        log.info("provisioning %s volumes under %s", self.provisioner, self.directory)
        while not stopping.is_set():
            self._wake.clear()  # before the pass: a change during it wakes the next one
            wait = RESYNC
            try:
                self.sync()
            except Exception as e:  # the API server may be restarting: try again soon
                log.warning("provisioner pass failed: %s", e)
                wait = 1.0
            self._wake.wait(wait)
            time.sleep(SETTLE)
