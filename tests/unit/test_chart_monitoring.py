"""The chart's monitoring objects (SPEC §8, §9): ServiceMonitors whose selectors and ports
match the Services the operator really creates, the PrometheusRule carrying the rule file
as is, and the operator's metrics Service. That the API server accepts them (against the
prometheus-operator CRDs) is checked in tests/integration/test_chart_monitoring_install.py."""

from __future__ import annotations

from pathlib import Path

import yaml
from fleetward.operator.desired import gateway

from tests.support.chart import rendered, rendered_settings

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_BILLING = ROOT / "tests/golden/operator/billing.yaml"  # the reconciler's desired objects for an Agent


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _enabled() -> list[dict]:
    return rendered(
        "monitoring.serviceMonitors.enabled=true",
        "monitoring.rules.enabled=true",
        "monitoring.serviceMonitors.labels.release=kube-prometheus-stack",
        namespace="fleetward",
    )


def test_monitoring_objects_follow_whether_the_cluster_has_prometheus_operator():
    """Default `auto`: rendered when the cluster serves their kinds, left out otherwise (an
    install into a cluster without the CRDs would fail on them)."""
    kinds = {o["kind"] for o in rendered()}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    served = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
    with_operator = [o["kind"] for o in rendered(api_versions=served)]
    assert with_operator.count("ServiceMonitor") == 3 and with_operator.count("PrometheusRule") == 1
    only_monitors = [o["kind"] for o in rendered(api_versions=served[:1])]
    assert only_monitors.count("ServiceMonitor") == 3 and "PrometheusRule" not in only_monitors
    # Set explicitly, they win over what the cluster serves.
    off = {o["kind"] for o in rendered("monitoring.serviceMonitors.enabled=false", api_versions=served)}
    assert "ServiceMonitor" not in off and "PrometheusRule" in off
    on = {o["kind"] for o in rendered("monitoring.rules.enabled=true")}
    assert "PrometheusRule" in on and "ServiceMonitor" not in on


def test_the_agents_service_monitor_selects_every_runtime_metrics_service():
    monitors = _by_kind(_enabled(), "ServiceMonitor")
    agents = monitors["fw-agents"]
    assert agents["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert agents["spec"]["namespaceSelector"] == {"any": True}
    services = [d for d in yaml.safe_load_all(GOLDEN_BILLING.read_text()) if d and d["kind"] == "Service"]
    assert services, "the golden billing Agent has a metrics Service"
    for service in services:
        labels = service["metadata"]["labels"]
        assert agents["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in agents["spec"]["endpoints"]} <= ports


def test_a_namespace_scoped_install_monitors_only_its_namespaces():
    objects = rendered(
        "monitoring.serviceMonitors.enabled=true", "watchNamespaces={team-a,team-b}", namespace="fleetward"
    )
    agents = _by_kind(objects, "ServiceMonitor")["fw-agents"]
    assert agents["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_the_gateway_and_operator_service_monitors_select_their_services(tmp_path: Path):
    objects = _enabled()
    monitors = _by_kind(objects, "ServiceMonitor")
    services = _by_kind(objects, "Service")

    operator_service = services["fw-operator-metrics"]
    operator_pods = _by_kind(objects, "Deployment")["fw-operator"]["spec"]["template"]
    assert operator_service["spec"]["selector"].items() <= operator_pods["metadata"]["labels"].items()
    (container,) = [c for c in operator_pods["spec"]["containers"] if c["name"] == "operator"]
    assert "metrics" in {p["name"] for p in container["ports"]}
    assert (
        monitors["fw-operator"]["spec"]["selector"]["matchLabels"].items()
        <= operator_service["metadata"]["labels"].items()
    )

    gateway_service = gateway.service(rendered_settings(tmp_path))
    assert (
        monitors["fw-gateway"]["spec"]["selector"]["matchLabels"].items()
        <= gateway_service["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitors["fw-gateway"]["spec"]["endpoints"]} <= {
        p["name"] for p in gateway_service["spec"]["ports"]
    }


def test_the_prometheus_rule_carries_the_rule_file_unchanged():
    (rule,) = _by_kind(_enabled(), "PrometheusRule").values()
    assert rule["spec"] == yaml.safe_load((ROOT / "charts/fleetward/monitoring/rules.yaml").read_text())
