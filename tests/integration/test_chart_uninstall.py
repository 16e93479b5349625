"""`helm uninstall` leaves nothing of the installation behind: the chart's pre-delete hook
(`fleetward operator uninstall`) stops the operator and removes the gateway it ran, which
Helm alone left running. The trust bundle stays while an Agent is left (its tool services
verify tokens against it) and goes with the last one; Agents themselves are never touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kubernetes import client

from fleetward.devcluster.install import helm_install, helm_uninstall, local_values, wait_operator_ready
from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import wait_for
from tests.support.agents import GROUP, VERSION, agent, custom, get_agent, model_secret

# scoped-*: the shared installation leaves these namespaces alone.
RELEASE, SYSTEM, WATCHED = "fw-uninstall", "scoped-uninstall-system", "scoped-uninstall"
BUNDLE, GATEWAY = "fleetward-trust-bundle", f"{RELEASE}-gateway"


def _exists(read, *args) -> bool:
    try:
        read(*args)
        return True
    except client.exceptions.ApiException as e:
        if e.status == 404:
            return False
        raise


def _bundle_agents(core: client.CoreV1Api) -> set[str]:
    doc = core.read_namespaced_config_map(BUNDLE, SYSTEM).data["jwks.json"]
    return {k.get("agent") for k in json.loads(doc)["keys"]}


def _drop_agent(api: client.ApiClient, name: str) -> None:
    """Delete an Agent with no operator left to run its finalizer (as a user would have to)."""
    objs = custom(api)
    objs.patch_namespaced_custom_object(GROUP, VERSION, WATCHED, "agents", name, {"metadata": {"finalizers": None}})
    try:
        objs.delete_namespaced_custom_object(GROUP, VERSION, WATCHED, "agents", name)
    except client.exceptions.ApiException as e:
        if e.status != 404:
            raise


def test_helm_uninstall_removes_the_gateway_and_the_bundle_goes_with_the_last_agent(
    cluster, api, core, kafka, fleetward
):
    apps, autoscaling = client.AppsV1Api(api), client.AutoscalingV2Api(api)
    for ns in (SYSTEM, WATCHED):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    values = local_values(kafka.bootstrap, watchNamespaces=[WATCHED])
    values["gateway"] = {**values["gateway"], "replicas": 1}
    helm_install(cluster.bins.helm, cluster.kubeconfig, values, release=RELEASE, namespace=SYSTEM)
    try:
        wait_operator_ready(api, release=RELEASE, namespace=SYSTEM, log_dir=cluster.state / "podlet" / "logs")
        apply_manifest(api, json.dumps(model_secret(WATCHED)), WATCHED)
        apply_manifest(api, json.dumps(agent(WATCHED, "left", paused=True)), WATCHED)
        wait_for(lambda: f"{WATCHED}/left" in _bundle_agents(core), 90, "the Agent's key in the trust bundle")
        wait_for(lambda: _exists(apps.read_namespaced_deployment, GATEWAY, SYSTEM), 60, "the operator's gateway")
        assert _exists(core.read_namespaced_service, GATEWAY, SYSTEM)

        helm = [str(cluster.bins.helm), f"--kubeconfig={cluster.kubeconfig}", f"--namespace={SYSTEM}"]
        proc = subprocess.run([*helm, "uninstall", RELEASE, "--wait", "--timeout=150s"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

        # The hook ran before Helm deleted the operator: nothing re-applied the gateway.
        assert not _exists(apps.read_namespaced_deployment, GATEWAY, SYSTEM)
        assert not _exists(core.read_namespaced_service, GATEWAY, SYSTEM)
        assert not _exists(autoscaling.read_namespaced_horizontal_pod_autoscaler, GATEWAY, SYSTEM)
        assert not _exists(apps.read_namespaced_deployment, f"{RELEASE}-operator", SYSTEM)
        # A succeeded hook Job is deleted by its hook-delete-policy.
        assert not _exists(client.BatchV1Api(api).read_namespaced_job, f"{RELEASE}-operator-uninstall", SYSTEM)
        # The Agent is the user's and stays; so does the bundle its tools verify against.
        assert get_agent(api, WATCHED, "left")["metadata"]["name"] == "left"
        assert f"{WATCHED}/left" in _bundle_agents(core)

        # With the last Agent gone, the same command (run by hand here: the release is gone)
        # removes the bundle too.
        _drop_agent(api, "left")
        wait_for(lambda: not _exists(get_agent, api, WATCHED, "left"), 30, "the Agent deleted")
        settings = cluster.state / "uninstall-settings.yaml"
        settings.write_text(json.dumps({"namespace": SYSTEM, "watchNamespaces": [WATCHED]}))
        done = subprocess.run(
            [sys.executable, "-m", "fleetward.cli.main", "operator", "uninstall", f"--settings={settings}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        )
        assert done.returncode == 0, done.stderr
        assert f"deleted {SYSTEM}/ConfigMap/{BUNDLE}" in done.stdout, done.stdout
        assert not _exists(core.read_namespaced_config_map, BUNDLE, SYSTEM)
    finally:
        helm_uninstall(cluster.bins.helm, cluster.kubeconfig, release=RELEASE, namespace=SYSTEM)
        if _exists(get_agent, api, WATCHED, "left"):
            _drop_agent(api, "left")
        for ns in (WATCHED, SYSTEM):
            core.delete_namespace(ns)
