"""Small Kubernetes helpers for the local cluster: server-side apply of YAML manifests."""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, dynamic

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
        ns = doc["metadata"].get("namespace") or (namespace if resource.namespaced else None)
        if resource.namespaced and ns is None:
            ns = "default"
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
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name)
            if any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established within {timeout:.0f} s")
            time.sleep(0.1)
    return names
