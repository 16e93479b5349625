"""Session fixtures: one real local cluster (fleetward.devcluster) for the whole run.

Nothing here skips: if a component is not built, the cluster fixture errors with
the build command to run (`make test` builds everything first)."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from fleetward.devcluster.cluster import DevCluster
from fleetward.devcluster.install import NAMESPACE, helm_install, local_values, wait_operator_ready
from fleetward.devcluster.kube import apply_manifest, install_crds, manifest_files
from fleetward.devcluster.layout import REPO
from fleetward.devcluster.process import wait_for
from fleetward.devcluster.services import Kafka, Postgres, Prometheus
from fleetward.llmstandin import StandinServer
from tests.support.runtime import EventReader

INTEGRATION = Path(__file__).parent / "integration"
AUDIT_SECRET = "fleetward-audit-db"
GITHOUSE_EXAMPLE = REPO / "examples" / "githouse"
# The example's tool service and LLM stand-in listen on these fixed loopback ports (its
# Agents' endpoints name them), so only one cluster on the machine can run it at a time.
GITHOUSE_PORTS = (18080, 18000)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster() -> Iterator[DevCluster]:
    c = DevCluster.create("test")
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def api(cluster: DevCluster) -> client.ApiClient:
    """Admin API client."""
    return cluster.api_client()


@pytest.fixture(scope="session")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
def user_kubeconfigs(cluster: DevCluster) -> dict[str, Path]:
    """kubeconfig per named user: alice, bob, carol (client certificates)."""
    return cluster.user_kubeconfigs()


@pytest.fixture(scope="session")
def crds(cluster: DevCluster, api: client.ApiClient) -> list[str]:
    return install_crds(api, REPO / "crds")


@pytest.fixture(scope="session")
def kafka(cluster: DevCluster) -> Kafka:
    return cluster.kafka("plain")


@pytest.fixture(scope="session")
def kafka_scram(cluster: DevCluster) -> Kafka:
    return cluster.kafka("scram")


@pytest.fixture(scope="session")
def postgres_dsn(cluster: DevCluster) -> str:
    pg: Postgres = cluster.postgres()
    return pg.dsn


@pytest.fixture(scope="session")
def prometheus(cluster: DevCluster) -> Prometheus:
    return cluster.prometheus()


@pytest.fixture(scope="session")
def kubectl(cluster: DevCluster):
    """Run the built kubectl as the admin (or `as_user`); returns stdout, raises on failure."""

    def run(*args: str, as_user: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        kubeconfig = cluster.user_kubeconfigs()[as_user] if as_user else cluster.kubeconfig
        proc = subprocess.run(
            [str(cluster.bins.kubectl), f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=60
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run


@pytest.fixture
def namespace(core: client.CoreV1Api, request) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = ("t-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()))[:50].rstrip("-")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # Pods need the namespace's default ServiceAccount, which the controller manager creates.
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture(scope="session")
def fleetward(cluster: DevCluster, api: client.ApiClient, kafka: Kafka, crds: list[str], postgres_dsn: str) -> str:
    """Fleetward installed with `helm upgrade --install` of charts/fleetward (cluster-wide);
    the operator runs as a pod on the podlet, its audit log in the cluster's PostgreSQL.
    Returns the installation namespace."""
    core = client.CoreV1Api(api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    except client.exceptions.ApiException as e:
        if e.status != 409:
            raise
    core.create_namespaced_secret(
        NAMESPACE, client.V1Secret(metadata=client.V1ObjectMeta(name=AUDIT_SECRET), string_data={"dsn": postgres_dsn})
    )
    # Namespaces scoped-* belong to the namespace-scoped installation of test_operator_scoped.py.
    values = local_values(
        kafka.bootstrap, excludeNamespaces=["scoped-*"], audit={"databaseSecret": {"name": AUDIT_SECRET, "key": "dsn"}}
    )
    helm_install(cluster.bins.helm, cluster.kubeconfig, values)
    wait_operator_ready(api, log_dir=cluster.state / "podlet" / "logs")
    return NAMESPACE


@pytest.fixture
def llm() -> Iterator[StandinServer]:
    """The LLM stand-in with no rules yet (a test sets its scenario), on a free loopback port."""
    with StandinServer(None) as server:
        yield server


@pytest.fixture
def events(kafka: Kafka) -> Iterator[EventReader]:
    """Reads the session events topic from its beginning, for one test."""
    reader = EventReader(kafka.bootstrap)
    yield reader
    reader.close()


@pytest.fixture(scope="module")
def githouse_example(api: client.ApiClient) -> Iterator[list[str]]:
    """examples/githouse applied to the shared cluster for one test module, removed after it.

    Removed, not left for later modules: its tool service and LLM stand-in hold fixed
    loopback ports, and a later test that brings up a second cluster with the example
    (`make up` in test_kwok_and_dev_up.py) would otherwise have its agents call this
    cluster's services (seen in CI: "key ... is not in the trust bundle")."""
    applied: list[str] = []
    for path in manifest_files([GITHOUSE_EXAMPLE]):
        applied += apply_manifest(api, path.read_text())
    yield applied
    core = client.CoreV1Api(api)
    try:
        client.CustomObjectsApi(api).delete_cluster_custom_object(
            "fleetward.dev", "v1alpha1", "killswitches", "githouse-stop"
        )
    except client.exceptions.ApiException as e:
        if e.status != 404:
            raise
    core.delete_namespace("githouse")

    def gone() -> bool:
        try:
            core.read_namespace("githouse")
        except client.exceptions.ApiException as e:
            return e.status == 404
        return False

    wait_for(gone, 240, "namespace githouse deleted (the GitHouse example's Agents finalized, pods stopped)")
    for port in GITHOUSE_PORTS:
        wait_for(lambda p=port: not _listening(p), 60, f"127.0.0.1:{port} released by the GitHouse example's pods")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
