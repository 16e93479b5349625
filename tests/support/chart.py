"""Helpers for tests of the Helm chart: what the operator reads from a rendered chart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from fleetward.operator.settings import OperatorSettings, load

CHART = Path(__file__).resolve().parents[2] / "charts" / "fleetward"


def rendered(*values: str, namespace: str = "default", api_versions: tuple[str, ...] = ()) -> list[dict]:
    """The objects of `helm template fw charts/fleetward` with `--set` for each of `values`
    (the render must succeed); `api_versions`: what the cluster serves besides the built-in
    ones (`--api-versions`)."""
    from fleetward.devcluster.layout import binaries

    sets = [arg for value in values for arg in ("--set", value)]
    sets += [arg for version in api_versions for arg in ("--api-versions", version)]
    out = subprocess.run(
        [str(binaries().helm), "template", "fw", str(CHART), "--kube-version", "1.36.0", "-n", namespace, *sets],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def rendered_settings(tmp_path: Path, *values: str) -> OperatorSettings:
    """`helm template` of the chart with `--set` for each of `values`; the operator settings
    its settings ConfigMap holds, loaded as the operator loads them (the render must succeed)."""
    config_map = next(d for d in rendered(*values) if d["kind"] == "ConfigMap" and "settings.yaml" in d["data"])
    path = tmp_path / "settings.yaml"
    path.write_text(config_map["data"]["settings.yaml"])
    return load(path)
