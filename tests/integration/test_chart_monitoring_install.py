"""The chart's monitoring objects against a real API server (SPEC §9: "installs into the local
cluster for real"): with the prometheus-operator CRDs installed, the API server accepts the
ServiceMonitors, the PrometheusRule and the dashboard ConfigMaps the chart renders (a
server-side dry run validates them against the CRDs' schemas and admission), and refuses a
ServiceMonitor that breaks the schema, so the check is a real one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml
from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.layout import monitoring_crds
from fleetward.devcluster.process import wait_for
from tests.support.chart import rendered

MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def prometheus_operator_crds(api: client.ApiClient) -> Iterator[list[str]]:
    ext = client.ApiextensionsV1Api(api)
    names = []
    for path in monitoring_crds():
        doc = yaml.safe_load(path.read_text())
        apply_manifest(api, path.read_text())
        names.append(doc["metadata"]["name"])

    def established() -> bool:
        return all(
            any(
                c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(n).status.conditions or []
            )
            for n in names
        )

    wait_for(established, 60, f"CRDs {names} established")
    yield names
    for name in names:
        ext.delete_custom_resource_definition(name)


def test_the_api_server_accepts_the_charts_monitoring_objects(prometheus_operator_crds, kubectl, namespace, tmp_path):
    objects = [
        o
        for o in rendered(
            "monitoring.serviceMonitors.enabled=true",
            "monitoring.rules.enabled=true",
            "monitoring.serviceMonitors.labels.release=kube-prometheus-stack",
            namespace=namespace,
        )
        if o["kind"] in MONITORING_KINDS
        or "-dashboard-" in o["metadata"]["name"]
        or o["metadata"]["name"] == "fw-operator-metrics"
    ]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap"] * 3 + ["PrometheusRule", "Service"] + ["ServiceMonitor"] * 3
    path = tmp_path / "monitoring.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    out = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(path), "-o", "name").stdout.split()
    assert sorted(out) == sorted(
        f"{o['kind'].lower()}{'' if o['kind'] in ('ConfigMap', 'Service') else '.monitoring.coreos.com'}/{o['metadata']['name']}"
        for o in objects
    )


def test_a_service_monitor_that_breaks_the_schema_is_refused(prometheus_operator_crds, kubectl, namespace, tmp_path):
    (monitor,) = [
        o
        for o in rendered("monitoring.serviceMonitors.enabled=true", namespace=namespace)
        if o["kind"] == "ServiceMonitor" and o["metadata"]["name"] == "fw-agents"
    ]
    monitor["spec"]["endpoints"] = [{"port": 8080, "interval": "thirty seconds"}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(monitor))
    proc = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert proc.returncode != 0
    assert "spec.endpoints[0].port" in proc.stderr and "spec.endpoints[0].interval" in proc.stderr, proc.stderr
