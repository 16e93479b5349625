"""The chart's PII hash key, as rendered: a generated Secret (kept across upgrades), named in
the operator's settings, readable by the operator by name only; a team's own Secret wins.
That the runtimes hash under it is tested in tests/integration/test_runtime_operator.py."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.support.chart import rendered, rendered_settings


def _secrets(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}


def test_a_random_key_is_generated_and_given_to_the_operator(tmp_path: Path):
    objects = rendered(namespace="fleetward")
    secret = _secrets(objects)["fw-pii-hash-key"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["hash-key"])
    assert len(key) == 48 and key != base64.b64decode(_secrets(rendered())["fw-pii-hash-key"]["data"]["hash-key"])
    source = rendered_settings(tmp_path).runtime.pii_hash_key_source
    assert source is not None and (source.name, source.key) == ("fw-pii-hash-key", "hash-key")
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "fw-operator-installation")
    rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert rules == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["fw-pii-hash-key"], "verbs": ["get"]}
    ]


def test_a_teams_own_secret_replaces_the_generated_one(tmp_path: Path):
    objects = rendered("runtime.piiHashKeySecretName=corp-pii-key")
    assert "fw-pii-hash-key" not in _secrets(objects)
    source = rendered_settings(tmp_path, "runtime.piiHashKeySecretName=corp-pii-key").runtime.pii_hash_key_source
    assert source is not None and source.name == "corp-pii-key"
