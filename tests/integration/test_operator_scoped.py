"""A namespace-scoped installation against Kafka with SASL/SCRAM and ACLs: the operator
reconciles only its namespace, holds no cluster-wide access to Agents or Secrets, and
gives every Agent a Kafka principal that can read its own request topic and nothing
of another Agent's."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaError, KafkaException
from kubernetes import client

from fleetward.devcluster.install import helm_install, helm_uninstall, local_values, wait_operator_ready
from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from tests.integration.test_killswitch import GROUP, VERSION, engage_as_admin, release_as_two, switch
from tests.integration.test_services import consume_one, produce
from tests.support.agents import agent, get_agent, model_secret, wait_ready

RELEASE, SYSTEM, WATCHED, OTHER = "fw-scoped", "scoped-system", "scoped-a", "scoped-b"
SERVICE_ACCOUNT = f"system:serviceaccount:{SYSTEM}:{RELEASE}-operator"


@pytest.fixture(scope="module")
def scoped(cluster, api, core, kafka_scram, fleetward) -> Iterator[None]:
    for ns in (SYSTEM, WATCHED, OTHER):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    core.create_namespaced_secret(
        SYSTEM,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="kafka-admin"), string_data={"password": kafka_scram.admin_password}
        ),
    )
    values = local_values(
        kafka_scram.bootstrap,
        watchNamespaces=[WATCHED],
        kafka={
            "securityProtocol": "SASL_PLAINTEXT",
            "saslMechanism": "SCRAM-SHA-512",
            "adminUsername": "admin",
            "adminPasswordSecret": {"name": "kafka-admin", "key": "password"},
        },
    )
    helm_install(cluster.bins.helm, cluster.kubeconfig, values, release=RELEASE, namespace=SYSTEM)
    wait_operator_ready(api, release=RELEASE, namespace=SYSTEM, log_dir=cluster.state / "podlet" / "logs")
    try:
        yield
    finally:
        helm_uninstall(cluster.bins.helm, cluster.kubeconfig, release=RELEASE, namespace=SYSTEM)
        for ns in (WATCHED, OTHER, SYSTEM):
            core.delete_namespace(ns)


@pytest.mark.parametrize(
    ("verb", "resource", "where", "allowed"),
    [
        ("list", "agents.fleetward.dev", "--all-namespaces", False),
        ("watch", "agents.fleetward.dev", "--all-namespaces", False),
        ("get", "secrets", "--all-namespaces", False),
        ("list", "deployments.apps", "--all-namespaces", False),
        ("list", "agents.fleetward.dev", f"--namespace={OTHER}", False),
        ("get", "secrets", f"--namespace={OTHER}", False),
        ("list", "agents.fleetward.dev", f"--namespace={WATCHED}", True),
        ("create", "deployments.apps", f"--namespace={WATCHED}", True),
        ("update", "configmaps", f"--namespace={SYSTEM}", True),
    ],
)
def test_scoped_operator_has_no_cluster_wide_access(scoped, kubectl, verb, resource, where, allowed):
    out = kubectl("auth", "can-i", verb, resource, where, f"--as={SERVICE_ACCOUNT}", check=False)
    assert out.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, where, out.stdout, out.stderr)


def test_each_agent_principal_reads_only_its_own_topic(scoped, api, core, kafka_scram):
    for ns in (WATCHED, OTHER):
        apply_manifest(api, json.dumps(model_secret(ns)), ns)
    for name in ("alpha", "beta"):
        apply_manifest(api, json.dumps(agent(WATCHED, name)), WATCHED)
    apply_manifest(api, json.dumps(agent(OTHER, "gamma")), OTHER)
    alpha, beta = wait_ready(api, WATCHED, "alpha", timeout=120), wait_ready(api, WATCHED, "beta", timeout=120)

    secret = core.read_namespaced_secret("fw-alpha-credentials", WATCHED)
    user = base64.b64decode(secret.data["kafka-username"]).decode()
    password = base64.b64decode(secret.data["kafka-password"]).decode()
    assert user == f"fleetward.{WATCHED}.alpha"
    as_alpha = kafka_scram.client_config(user, password)
    admin = kafka_scram.client_config()

    produce(admin, alpha["status"]["requestTopic"], "s1", "for alpha")
    # A group of its own under the agent's prefix: the agent's runtime consumes (and
    # dead-letters) whatever lands in its main group.
    mine = f"fleetward.{WATCHED}.alpha.test"
    assert consume_one(as_alpha, alpha["status"]["requestTopic"], mine) == ("s1", "for alpha")

    produce(admin, beta["status"]["requestTopic"], "s2", "for beta")
    with pytest.raises(KafkaException) as denied:
        consume_one(as_alpha, beta["status"]["requestTopic"], mine)
    assert denied.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    with pytest.raises(KafkaException) as denied_write:
        produce(as_alpha, beta["status"]["requestTopic"], "s3", "forged request")
    assert denied_write.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

    # gamma lives outside the watched namespace: neither installation touches it.
    time.sleep(3)  # a negative: give a (wrong) reconcile time to happen
    assert get_agent(api, OTHER, "gamma").get("status") is None


def _login_refused(cfg: dict, topic: str, seconds: float = 15) -> bool:
    """True once the broker reports an authentication failure for these credentials."""
    from confluent_kafka import Consumer

    errors: list[KafkaError] = []
    c = Consumer({**cfg, "group.id": f"login-check-{time.monotonic_ns()}", "error_cb": errors.append})
    c.subscribe([topic])
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = c.poll(0.25)
            assert msg is None or msg.error() is not None, "a revoked principal consumed a message"
            if any(e.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED) for e in errors):
                return True
        return False
    finally:
        c.close()


def test_a_kill_switch_removes_the_agents_kafka_principal(scoped, api, core, kafka_scram, user_kubeconfigs):
    """SCRAM mode: engaging deletes the covered agent's Kafka login and ACLs (its old
    password is refused); releasing issues a new password that works."""
    objs = client.CustomObjectsApi(api)
    apply_manifest(api, json.dumps(model_secret(WATCHED)), WATCHED)
    apply_manifest(api, json.dumps(agent(WATCHED, "delta")), WATCHED)
    delta = wait_ready(api, WATCHED, "delta", timeout=120)
    topic = delta["status"]["requestTopic"]

    def creds() -> tuple[str, str]:
        data = core.read_namespaced_secret("fw-delta-credentials", WATCHED).data
        return base64.b64decode(data["kafka-username"]).decode(), base64.b64decode(data["kafka-password"]).decode()

    user, old_password = creds()
    admin = kafka_scram.client_config()
    produce(admin, topic, "s1", "before the switch")
    assert consume_one(kafka_scram.client_config(user, old_password), topic, f"fleetward.{WATCHED}.delta.t1")

    name = "scoped-kafka-stop"
    engage_as_admin(objs, name, WATCHED, "principal drill")
    try:
        wait_for(lambda: (switch(objs, name).get("status") or {}).get("phase") == "Drained", 60, "phase Drained")
        # Its runtime heard the halt and acked the drain, although its Kafka access was cut
        # first (it keeps reading the control topic and reporting until the drain is over).
        results = switch(objs, name)["status"]["agents"]
        assert results and all(r["drained"] and "forcedInstances" not in r for r in results), results
        produce(admin, topic, "s2", "during the switch")
        assert _login_refused(kafka_scram.client_config(user, old_password), topic)

        release_as_two(user_kubeconfigs, name)
        wait_ready(api, WATCHED, "delta", timeout=120)
        new_user, new_password = creds()
        assert new_user == user and new_password != old_password
        assert consume_one(kafka_scram.client_config(user, new_password), topic, f"fleetward.{WATCHED}.delta.t3")
    finally:
        objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", name)


def test_kafka_principals_of_agents_that_no_longer_exist_are_swept(scoped, api, kafka_scram):
    """An Agent deleted by force (its finalizer removed, the cleanup never ran) leaves its
    SCRAM login and ACLs behind: housekeeping deletes them once the Agent has been absent in
    two sweeps. Principals of namespaces this installation does not serve, and users that do
    not hold an Agent's kind of access, are left alone."""
    from confluent_kafka.admin import (
        AclBinding,
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialDeletion,
        UserScramCredentialUpsertion,
    )

    admin = AdminClient(kafka_scram.client_config())
    ghost, outsider = f"fleetward.{WATCHED}.ghost", f"fleetward.{OTHER}.ghost"
    plain = f"fleetward.{WATCHED}.plain"  # a login of that shape, without an Agent's kind of access
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    for user in (ghost, outsider, plain):
        for f in admin.alter_user_scram_credentials([UserScramCredentialUpsertion(user, info, b"pw")]).values():
            f.result(15)
    # What the operator grants an Agent's principal: its request topic and its groups.
    acls = []
    for user in (ghost, outsider):
        ns = user.split(".")[1]
        acls += [
            AclBinding(
                ResourceType.TOPIC,
                f"fleetward.requests.{ns}.ghost",
                ResourcePatternType.LITERAL,
                f"User:{user}",
                "*",
                AclOperation.READ,
                AclPermissionType.ALLOW,
            ),
            AclBinding(
                ResourceType.GROUP,
                f"{user}.",
                ResourcePatternType.PREFIXED,
                f"User:{user}",
                "*",
                AclOperation.READ,
                AclPermissionType.ALLOW,
            ),
        ]
    for f in admin.create_acls(acls).values():
        f.result(15)

    def acls_of(user: str) -> list:
        flt = AclBindingFilter(
            ResourceType.ANY,
            None,
            ResourcePatternType.ANY,
            f"User:{user}",
            None,
            AclOperation.ANY,
            AclPermissionType.ANY,
        )
        return admin.describe_acls(flt).result(15)

    def users() -> set[str]:
        return set(admin.describe_user_scram_credentials().result(15))

    try:
        # two housekeeping rounds (every 15 s here) after the first one that saw it
        wait_for(lambda: ghost not in users() and not acls_of(ghost), 90, "the orphaned principal swept")
        assert outsider in users() and len(acls_of(outsider)) == 2  # another installation's namespace
        assert plain in users()  # no prefixed group ACL on "<principal>.": not an Agent's
    finally:
        leftover = [
            AclBindingFilter(
                ResourceType.ANY,
                None,
                ResourcePatternType.ANY,
                f"User:{u}",
                None,
                AclOperation.ANY,
                AclPermissionType.ANY,
            )
            for u in (ghost, outsider)
        ]
        for f in admin.delete_acls(leftover).values():
            f.result(15)
        left = users() & {ghost, outsider, plain}
        deletions = [UserScramCredentialDeletion(u, ScramMechanism.SCRAM_SHA_512) for u in sorted(left)]
        for f in admin.alter_user_scram_credentials(deletions).values() if deletions else ():
            f.result(15)
