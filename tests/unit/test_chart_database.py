"""The chart's optional PostgreSQL (values `postgresql`), as rendered: off by default; on, a
StatefulSet with its claim, a Secret with the password and DSN, the operator told to copy
the DSN to the Agents (settings runtime.databaseSource) and to keep its audit chain there,
and allowed to read that one Secret. A team's own databases win. That it runs and is used
is tested in tests/integration/test_chart_postgresql.py."""

from __future__ import annotations

import base64
from pathlib import Path

from tests.support.chart import rendered, rendered_settings


def _named(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _operator_env(objects: list[dict]) -> dict:
    dep = _named(objects, "Deployment", "fw-operator")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_no_database_by_default(tmp_path: Path):
    objects = rendered()
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    assert rendered_settings(tmp_path).runtime.database_source is None
    assert "FLEETWARD_AUDIT_DSN" not in _operator_env(objects)


def test_enabled_it_runs_a_statefulset_and_wires_the_runtimes_and_the_audit_log(tmp_path: Path):
    objects = rendered("postgresql.enabled=true", namespace="fleetward")
    sts = _named(objects, "StatefulSet", "fw-postgresql")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 999
    (container,) = pod["containers"]
    assert container["image"].startswith("docker.io/library/postgres:16.")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    secret = _named(objects, "Secret", "fw-postgresql")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    password = base64.b64decode(secret["data"]["password"]).decode()
    dsn = base64.b64decode(secret["data"]["dsn"]).decode()
    assert len(password) == 32
    assert dsn == f"postgresql://fleetward:{password}@fw-postgresql.fleetward.svc:5432/fleetward"

    settings = rendered_settings(tmp_path, "postgresql.enabled=true")
    assert settings.runtime.database_source is not None
    assert (settings.runtime.database_source.name, settings.runtime.database_source.key) == ("fw-postgresql", "dsn")
    audit = _operator_env(objects)["FLEETWARD_AUDIT_DSN"]
    assert audit["valueFrom"]["secretKeyRef"] == {"name": "fw-postgresql", "key": "dsn"}
    role = _named(objects, "Role", "fw-operator-installation")
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["fw-pii-hash-key", "fw-postgresql"],
            "verbs": ["get"],
        }
    ]


def test_a_teams_own_databases_win(tmp_path: Path):
    values = ("postgresql.enabled=true", "runtime.databaseSecret=team-db", "audit.databaseSecret.name=team-audit")
    assert rendered_settings(tmp_path, *values).runtime.database_source is None
    audit = _operator_env(rendered(*values))["FLEETWARD_AUDIT_DSN"]
    assert audit["valueFrom"]["secretKeyRef"]["name"] == "team-audit"
