"""The chart's pre-delete hook, as rendered: a Job that runs `fleetward operator uninstall`
with the operator's ServiceAccount, settings and image, naming the operator Deployment to
stop first. That it removes the gateway on `helm uninstall` is tested in
tests/integration/test_chart_uninstall.py."""

from __future__ import annotations

from tests.support.chart import rendered


def _hook(objects: list[dict]) -> dict | None:
    found = [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "fw-operator-uninstall"]
    return found[0] if found else None


def test_the_hook_runs_the_uninstall_command_as_the_operator():
    objects = rendered(namespace="fleetward")
    job = _hook(objects)
    assert job is not None
    assert job["metadata"]["namespace"] == "fleetward"
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert "hook-succeeded" in job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    (operator,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "fw-operator"]
    assert pod["serviceAccountName"] == operator["spec"]["template"]["spec"]["serviceAccountName"] == "fw-operator"
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    (operator_container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["image"] == operator_container["image"]
    assert container["command"] == ["fleetward", "operator", "uninstall"]
    assert "--operator-deployment=fw-operator" in container["args"]
    assert "--settings=/etc/fleetward/settings.yaml" in container["args"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (settings,) = [v for v in pod["volumes"] if v["name"] == "settings"]
    assert settings["configMap"]["name"] == "fw-operator"
    # The Job outlives the wait for the operator's pods, so a timeout is the command's error.
    assert job["spec"]["activeDeadlineSeconds"] > int(container["args"][-1].split("=")[1])


def test_the_hook_can_be_turned_off():
    assert _hook(rendered("uninstall.cleanup=false")) is None
