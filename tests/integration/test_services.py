"""Kafka (plain and SCRAM with ACLs), PostgreSQL, Prometheus, and client-certificate
identities, all real and all on loopback."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, start_http_server

from fleetward.devcluster.process import wait_for


def produce(cfg: dict, topic: str, key: str, value: str) -> None:
    errors: list = []
    p = Producer({**cfg, "message.timeout.ms": 10000})
    p.produce(topic, key=key, value=value, on_delivery=lambda err, msg: errors.append(err))
    p.flush(15)
    assert errors, "no delivery report"
    if errors[0] is not None:
        raise KafkaException(errors[0])


def consume_one(cfg: dict, topic: str, group: str) -> tuple[str, str]:
    c = Consumer({**cfg, "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    try:
        for _ in range(60):
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            return msg.key().decode(), msg.value().decode()
        raise AssertionError(f"nothing consumed from {topic}")
    finally:
        c.close()


def test_kafka_round_trip(kafka):
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    kafka.create_topics(topic)
    produce(kafka.client_config(), topic, "session-1", "hello kafka")
    assert consume_one(kafka.client_config(), topic, f"g-{topic}") == ("session-1", "hello kafka")


def test_kafka_rejects_writes_to_missing_topics(kafka):
    # auto-creation is off: topics are created on purpose (by the operator, later)
    with pytest.raises(KafkaException) as err:
        produce(kafka.client_config(), f"nope-{uuid.uuid4().hex[:8]}", "k", "v")
    assert err.value.args[0].code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._MSG_TIMED_OUT)


def test_scram_principal_is_denied_until_an_acl_allows_it(kafka_scram):
    topic = f"acl-{uuid.uuid4().hex[:8]}"
    kafka_scram.create_topics(topic)
    user, password = f"agent-{uuid.uuid4().hex[:6]}", "s3cret-" + uuid.uuid4().hex
    kafka_scram.create_user(user, password)
    as_user = kafka_scram.client_config(user, password)

    with pytest.raises(KafkaException) as err:
        produce(as_user, topic, "k", "before acl")
    assert err.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

    wrong = kafka_scram.client_config(user, "not-the-password")
    with pytest.raises(KafkaException):  # authentication, not just authorization, is enforced
        produce({**wrong, "message.timeout.ms": 5000}, topic, "k", "bad password")

    acls = [
        AclBinding(
            ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, f"User:{user}", "*", op, AclPermissionType.ALLOW
        )
        for op in (AclOperation.WRITE, AclOperation.READ)
    ]
    acls.append(
        AclBinding(
            ResourceType.GROUP,
            f"g-{topic}",
            ResourcePatternType.LITERAL,
            f"User:{user}",
            "*",
            AclOperation.READ,
            AclPermissionType.ALLOW,
        )
    )
    admin = kafka_scram.admin()
    for fut in admin.create_acls(acls).values():
        fut.result(30)

    def allowed() -> bool:
        produce(as_user, topic, "k", "after acl")
        return True

    wait_for(allowed, 30, "write allowed after the ACL")
    assert consume_one(as_user, topic, f"g-{topic}") == ("k", "after acl")


def test_postgres_answers(postgres_dsn):
    assert postgres_dsn.startswith("postgresql://") and "@127.0.0.1:" in postgres_dsn
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("create table if not exists probe (id serial primary key, note text)")
        conn.execute("insert into probe (note) values (%s)", ("hello",))
        assert conn.execute("select note from probe order by id desc limit 1").fetchone() == ("hello",)
        assert conn.execute("show server_version").fetchone()[0].startswith("15")


def test_postgres_requires_the_password(postgres_dsn):
    bad = postgres_dsn.replace("://fleetward:", "://fleetward:wrong", 1)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad, connect_timeout=5)


def test_prometheus_scrapes_a_target_started_by_the_test(prometheus):
    registry = CollectorRegistry()
    counter = Counter("fleetward_probe_events", "events counted by the test", registry=registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        counter.inc(7)
        prometheus.add_target(f"127.0.0.1:{port}", job="probe")

        def scraped_value() -> float | None:
            result = prometheus.query('fleetward_probe_events_total{job="probe"}')
            return float(result[0]["value"][1]) if result else None

        wait_for(lambda: scraped_value() == 7.0, 60, "the probe counter in Prometheus")
        up = prometheus.query(f'up{{instance="127.0.0.1:{port}"}}')
        assert up and up[0]["value"][1] == "1"
    finally:
        server.shutdown()


# A pod whose process serves one counter on its own address (the podlet gives each pod a
# loopback IP of its own, POD_IP).
METRICS_POD_SCRIPT = (
    "import os, time\n"
    "from prometheus_client import Counter, start_http_server\n"
    "Counter('fleetward_probe_pod_events', 'events counted by the test pod').inc(3)\n"
    "start_http_server(9464, addr=os.environ['POD_IP'])\n"
    "time.sleep(3600)\n"
)


def metrics_pod(name: str, annotations: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "app",
                    "image": "ignored.example/metrics:1",
                    "command": [sys.executable, "-c", METRICS_POD_SCRIPT],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "ports": [{"name": "metrics", "containerPort": 9464}, {"name": "other", "containerPort": 9465}],
                }
            ],
        },
    }


def test_prometheus_finds_annotated_pods_through_the_api_server(prometheus, core, namespace):
    """As in a real cluster: pods annotated prometheus.io/scrape are scraped at their
    annotated port and path, found through the API server; others are not."""
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": "9464", "prometheus.io/path": "/metrics"}
    core.create_namespaced_pod(namespace, metrics_pod("annotated", scrape))
    core.create_namespaced_pod(namespace, metrics_pod("not-annotated", {}))
    series = f'fleetward_probe_pod_events_total{{job="kubernetes-pods",namespace="{namespace}"}}'

    def scraped() -> list:
        return prometheus.query(series)

    wait_for(lambda: scraped(), 90, f"{series} in Prometheus")
    (sample,) = scraped()
    assert sample["metric"]["pod"] == "annotated" and sample["value"][1] == "3"
    # One target for the pod although it declares two ports, and none for the other pod.
    targets = prometheus.query(f'up{{job="kubernetes-pods",namespace="{namespace}"}}')
    assert [(t["metric"]["pod"], t["value"][1]) for t in targets] == [("annotated", "1")]


def test_prometheus_evaluates_the_fleetward_alerting_rules(prometheus):
    shipped = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "charts/fleetward/monitoring/rules.yaml").read_text()
    )
    want = {rule["alert"] for group in shipped["groups"] for rule in group["rules"]}
    with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules?type=alert", timeout=10) as resp:
        groups = json.load(resp)["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == want
    assert all(rule["health"] in ("ok", "unknown") for rule in loaded.values()), loaded


def whoami(kubeconfig) -> client.V1SelfSubjectReview:
    api = config.new_client_from_config(str(kubeconfig))
    return client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())


def test_named_users_are_distinct_authenticated_identities(user_kubeconfigs, cluster):
    seen = {}
    for name in ("alice", "bob", "carol"):
        info = whoami(user_kubeconfigs[name]).status.user_info
        seen[name] = info.username
        assert "fleetward:oncall" in info.groups and "system:authenticated" in info.groups
        assert "system:masters" not in info.groups
    assert seen == {"alice": "alice", "bob": "bob", "carol": "carol"}
    admin = whoami(cluster.kubeconfig).status.user_info
    assert admin.username == "fleetward-admin" and "system:masters" in admin.groups


def test_named_users_are_bound_by_rbac(user_kubeconfigs, crds):
    alice = config.new_client_from_config(str(user_kubeconfigs["alice"]))
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(alice).list_namespaced_secret("default")
    assert err.value.status == 403
    assert 'User "alice" cannot list resource "secrets"' in json.loads(err.value.body)["message"]
    # the on-call role may read fleet resources
    client.CustomObjectsApi(alice).list_cluster_custom_object("fleetward.dev", "v1alpha1", "killswitches")


def test_kubectl_contexts_for_each_user(kubectl):
    for user in ("alice", "bob"):
        out = kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", as_user=user).stdout
        assert out == user
