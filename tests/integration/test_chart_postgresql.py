"""The chart's optional PostgreSQL (SPEC §9, values `postgresql`): a second installation
with `postgresql.enabled` runs it as a StatefulSet on the podlet; the operator copies its
DSN into the Agent's namespace; an Agent with two runtime replicas (which SQLite cannot
serve) is Ready on it and serves a request, its run state lands in that database, and so
does the operator's audit chain."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from kubernetes import client

from fleetward.audit import AuditLog
from fleetward.devcluster.install import (
    helm_install,
    helm_uninstall,
    local_postgresql,
    local_values,
    wait_operator_ready,
)
from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from fleetward.llmstandin import StandinServer
from tests.support.agents import agent, model_secret, sop, wait_ready
from tests.support.runtime import EventReader, ensure_topics, produce, user_message

# Namespaces scoped-* are left to other installations by the shared one (tests/conftest.py).
RELEASE, SYSTEM, WATCHED = "fw-chartdb", "scoped-chartdb-system", "scoped-chartdb"
SECRET = f"{RELEASE}-postgresql"
SCRIPT = [{"name": "reply", "match": {"lastRole": "user"}, "respond": {"content": "Kept in PostgreSQL."}}]


@pytest.fixture(scope="module")
def installed(cluster, api, core, kafka, fleetward) -> Iterator[str]:
    """The installation with the chart's PostgreSQL; returns its DSN (reachable from here)."""
    for ns in (SYSTEM, WATCHED):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    values = local_values(kafka.bootstrap, watchNamespaces=[WATCHED], postgresql=local_postgresql())
    values["gateway"] = {"enabled": False}  # the shared installation's gateway serves the tests
    helm_install(cluster.bins.helm, cluster.kubeconfig, values, release=RELEASE, namespace=SYSTEM)
    try:
        wait_operator_ready(api, release=RELEASE, namespace=SYSTEM, log_dir=cluster.state / "podlet" / "logs")
        yield base64.b64decode(core.read_namespaced_secret(SECRET, SYSTEM).data["dsn"]).decode()
    finally:
        helm_uninstall(cluster.bins.helm, cluster.kubeconfig, release=RELEASE, namespace=SYSTEM)
        for ns in (WATCHED, SYSTEM):
            core.delete_namespace(ns)


def _ready(core: client.CoreV1Api, ns: str, selector: str) -> list:
    pods = core.list_namespaced_pod(ns, label_selector=selector).items
    return [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]


def test_the_charts_postgresql_runs_and_holds_the_runtimes_state_and_the_audit_chain(installed, api, core, kafka):
    dsn = installed
    wait_for(
        lambda: _ready(core, SYSTEM, f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=postgresql"),
        120,
        "the chart's PostgreSQL pod Ready",
    )
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("select current_database(), current_user").fetchone() == ("fleetward", "fleetward")

    ensure_topics(kafka.bootstrap, ["fleetward.events"])
    events = EventReader(kafka.bootstrap)
    with StandinServer(SCRIPT) as llm:
        model = {"name": "scripted", "baseURL": llm.url, "credentialsSecretRef": {"name": "llm", "key": "api-key"}}
        apply_manifest(api, json.dumps(model_secret(WATCHED)), WATCHED)
        invoices = sop(WATCHED, "invoices", {"domain": "billing"})
        invoices["spec"]["triggers"] = {"keywords": ["invoice"]}
        apply_manifest(api, json.dumps(invoices), WATCHED)
        apply_manifest(api, json.dumps(agent(WATCHED, "billing", model=model, replicas=2)), WATCHED)
        obj = wait_ready(api, WATCHED, "billing", timeout=240)
        assert obj["status"]["readyReplicas"] == 2

        # The operator copied the DSN next to the Agent; the runtime reads it from there and
        # keeps nothing on a claim.
        copy = core.read_namespaced_secret("fw-billing-database", WATCHED)
        assert base64.b64decode(copy.data["dsn"]).decode() == dsn
        assert copy.metadata.owner_references[0].kind == "Agent"
        dep = client.AppsV1Api(api).read_namespaced_deployment("fw-billing", WATCHED)
        env = {e.name: e for e in dep.spec.template.spec.containers[0].env}
        assert env["FLEETWARD_DATABASE_DSN"].value_from.secret_key_ref.name == "fw-billing-database"
        assert not core.list_namespaced_persistent_volume_claim(WATCHED).items

        session = f"chartdb-{uuid.uuid4().hex[:12]}"
        topic = obj["status"]["requestTopic"]
        produce(
            kafka.bootstrap,
            topic,
            user_message(f"{WATCHED}/billing", session, "Where is my invoice?").to_json(),
            session,
        )
        got = events.wait_for(session, "message", timeout=90)
        events.close()
        assert got[-1].data.text == "Kept in PostgreSQL."

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        (runs,) = conn.execute("select count(*) from fw_runs where session_id = %s", (session,)).fetchone()
        assert runs >= 1
        (checkpoints,) = conn.execute("select count(*) from checkpoints").fetchone()
        assert checkpoints > 0
    # The operator's audit chain is in the same database (no audit.databaseSecret was given).
    with AuditLog.open(dsn, create=False) as audit:
        assert any(r["target"] == f"agent/{WATCHED}/billing" for r in audit.records()), "no audit record of the Agent"
        assert audit.verify().ok
