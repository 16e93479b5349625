"""The installation's own PostgreSQL (chart `postgresql.enabled`, settings
`runtime.databaseSource`): the operator copies its DSN into each Agent's namespace, the
runtime reads it from there, a changed DSN rolls the pods, and nothing is kept on a state
claim. A team's own per-namespace `databaseSecret` wins over it."""

from __future__ import annotations

import base64
import json

from fleetward.operator.desired.agent import DATABASE_DSN_ENV, DATABASE_HASH_ANNOTATION, desired_agent
from fleetward.operator.settings import OperatorSettings
from test_operator_desired import inputs_for

DSN = b"postgresql://fleetward:s3cret@fw-postgresql.fleetward-system.svc:5432/fleetward"


def _settings(**runtime) -> OperatorSettings:
    return OperatorSettings.model_validate({"namespace": "fleetward-system", "runtime": runtime})


def _by_kind_and_name(**fields) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in desired_agent(inputs_for("billing", **fields)).objects}


def _dsn_env(objects: dict) -> dict:
    (container,) = objects[("Deployment", "fw-billing")]["spec"]["template"]["spec"]["containers"]
    return next(e for e in container["env"] if e["name"] == DATABASE_DSN_ENV)


def test_the_installation_dsn_is_copied_into_the_agents_namespace_and_read_from_there():
    objects = _by_kind_and_name(
        settings=_settings(databaseSource={"name": "fw-postgresql", "key": "dsn"}), database_dsn=DSN
    )
    copy = objects[("Secret", "fw-billing-database")]
    assert copy["metadata"]["namespace"] == "githouse"
    assert copy["metadata"]["ownerReferences"][0]["kind"] == "Agent"
    assert base64.b64decode(copy["data"]["dsn"]) == DSN
    assert _dsn_env(objects)["valueFrom"] == {"secretKeyRef": {"name": "fw-billing-database", "key": "dsn"}}
    config = objects[("ConfigMap", "fw-billing-config")]
    assert json.loads(config["data"]["config.json"])["persistence"]["dsnEnv"] == DATABASE_DSN_ENV
    # PostgreSQL keeps the state: no claim, even for a single replica.
    assert not [k for k in objects if k[0] == "PersistentVolumeClaim"]


def test_a_changed_dsn_rolls_the_pods_and_the_dsn_itself_is_not_in_the_pod_template():
    settings = _settings(databaseSource={"name": "fw-postgresql", "key": "dsn"})
    first = _by_kind_and_name(settings=settings, database_dsn=DSN)[("Deployment", "fw-billing")]
    rotated = _by_kind_and_name(settings=settings, database_dsn=DSN.replace(b"s3cret", b"n3w"))[
        ("Deployment", "fw-billing")
    ]
    a = first["spec"]["template"]["metadata"]["annotations"][DATABASE_HASH_ANNOTATION]
    b = rotated["spec"]["template"]["metadata"]["annotations"][DATABASE_HASH_ANNOTATION]
    assert a != b
    assert b"s3cret" not in repr(first).encode()


def test_a_teams_own_database_secret_wins_and_nothing_is_copied():
    settings = _settings(databaseSecret="team-db", databaseSource={"name": "fw-postgresql", "key": "dsn"})
    objects = _by_kind_and_name(settings=settings)
    assert ("Secret", "fw-billing-database") not in objects
    assert _dsn_env(objects)["valueFrom"] == {"secretKeyRef": {"name": "team-db", "key": "dsn"}}


def test_without_a_database_the_runtime_keeps_sqlite_on_its_claim():
    objects = _by_kind_and_name()
    assert ("Secret", "fw-billing-database") not in objects
    (container,) = objects[("Deployment", "fw-billing")]["spec"]["template"]["spec"]["containers"]
    assert DATABASE_DSN_ENV not in {e["name"] for e in container["env"]}
    assert ("PersistentVolumeClaim", "fw-billing-state") in objects
