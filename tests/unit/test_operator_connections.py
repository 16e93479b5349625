"""The operator's connections to the API server are bounded (settings `apiConnections`,
Helm `operator.apiConnections`), for its own client and for Kopf's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fleetward.operator.handlers.login import WATCHED_KINDS, kopf_connection_limit
from fleetward.operator.settings import OperatorSettings, SettingsError, load

from tests.support.chart import rendered_settings


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
    assert rendered_settings(tmp_path, "operator.apiConnections=12").api_connections == 12
