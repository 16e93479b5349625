"""The Argo CD health-check harness (hack/go/argocd-health): where `hack/build-go.sh
argocd-health` puts it, and running it on one object."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from fleetward.devcluster.layout import REPO, MissingComponent, cache_dir

MODULE = REPO / "hack" / "go" / "argocd-health"
CHECKS = REPO / "argocd" / "resource_customizations"


def harness_key() -> str:
    """The cache key hack/build-go.sh gives the harness (argocd_health_key there): a hash of
    its module files, so a binary built from other sources is never picked up."""
    digest = hashlib.sha256(b"".join((MODULE / name).read_bytes() for name in ("go.mod", "go.sum", "main.go")))
    return digest.hexdigest()[:12]


def harness() -> Path:
    """The built harness binary; raises MissingComponent (naming the build command) when it
    is not built for the current sources."""
    folder = cache_dir() / f"argocd-health-v{harness_key()}"
    binary = folder / "argocd-health"
    if not (binary.exists() and (folder / ".complete").exists()):
        raise MissingComponent(
            f"the Argo CD health-check harness is not built for the current sources (expected {binary}); "
            "build it with `hack/build-go.sh argocd-health` (or `make build`)"
        )
    return binary


def health_script(kind: str) -> Path:
    """The health check of a Fleetward kind, e.g. health_script("Agent")."""
    return CHECKS / "fleetward.dev" / kind / "health.lua"


def evaluate(script: Path, obj: dict[str, Any] | str, timeout: float = 30) -> tuple[dict[str, str], int]:
    """Run `script` on one object (a dict, or YAML/JSON text) as Argo CD would: returns the
    health it reports ({"status", "message"}) and the harness's exit code (1: the script
    failed, and the health is then Unknown with the error as its message)."""
    text = obj if isinstance(obj, str) else json.dumps(obj)
    out = subprocess.run(
        [str(harness()), "eval", str(script)], input=text, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode not in (0, 1):
        raise RuntimeError(f"argocd-health eval {script} failed ({out.returncode}): {out.stderr}")
    return json.loads(out.stdout), out.returncode
