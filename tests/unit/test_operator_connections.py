"""The operator's connections to the API server are bounded (settings `apiConnections`,
Helm `operator.apiConnections`), for its own client and for Kopf's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from fleetward.operator.handlers.login import WATCHED_KINDS, kopf_connection_limit
from fleetward.operator.settings import OperatorSettings, SettingsError, load

REPO = Path(__file__).resolve().parents[2]


def test_kopf_gets_the_same_pool_plus_one_connection_per_watch_stream():
    assert kopf_connection_limit(OperatorSettings()) == 64 + WATCHED_KINDS
    scoped = OperatorSettings(apiConnections=10, watchNamespaces=["a", "b", "c"])
    assert kopf_connection_limit(scoped) == 10 + 3 * WATCHED_KINDS


@pytest.mark.parametrize("value", [0, 3, 513, "many"])
def test_a_bad_connection_count_stops_the_operator_naming_the_field(tmp_path: Path, value):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"apiConnections": value}))
    with pytest.raises(SettingsError) as err:
        load(path)
    assert "apiConnections" in str(err.value)


def test_the_helm_value_reaches_the_operator_settings(tmp_path: Path):
    from fleetward.devcluster.layout import binaries

    chart = str(REPO / "charts" / "fleetward")
    out = subprocess.run(
        [
            str(binaries().helm),
            "template",
            "fw",
            chart,
            "--kube-version",
            "1.36.0",
            "--set",
            "operator.apiConnections=12",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    config_map = next(
        d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ConfigMap" and "settings.yaml" in d["data"]
    )
    path = tmp_path / "settings.yaml"
    path.write_text(config_map["data"]["settings.yaml"])
    assert load(path).api_connections == 12
