"""Small Kubernetes helpers for the local cluster: server-side apply of YAML manifests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, dynamic

from fleetward.devcluster.process import wait_for

FIELD_MANAGER = "fleetward-devcluster"


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def manifest_files(paths: Iterable[Path]) -> list[Path]:
    """YAML files in the given files/folders, in name order (folders are not recursed)."""
    out: list[Path] = []
    for p in paths:
        out += sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml")) if p.is_dir() else [p]
    return out


def apply_manifest(api: client.ApiClient, text: str, namespace: str | None = None) -> list[str]:
    """Server-side apply every document; returns 'Kind/name' for each."""
    dyn = dynamic.DynamicClient(api)
    applied = []
    for doc in documents(text):
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        ns = (doc["metadata"].get("namespace") or namespace or "default") if resource.namespaced else None
        dyn.server_side_apply(resource, body=doc, namespace=ns, field_manager=FIELD_MANAGER, force_conflicts=True)
        applied.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return applied


def install_crds(api: client.ApiClient, crd_dir: Path, timeout: float = 60) -> list[str]:
    """Apply every CRD in crd_dir and wait until the API server serves them (Established)."""
    applied = []
    for path in manifest_files([crd_dir]):
        applied += apply_manifest(api, path.read_text())
    ext = client.ApiextensionsV1Api(api)
    names = [a.split("/", 1)[1] for a in applied]

    def established(name: str) -> bool:
        conditions = ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    for name in names:
        wait_for(lambda name=name: established(name), timeout, f"CRD {name} Established", interval=0.1)
    return names
