"""`kubectl logs` on the podlet node: the API server calls the podlet's kubelet-style log
endpoint with its kubelet client certificate; the endpoint answers only that identity.
`--tail`, `--limit-bytes`, `-f`, `--previous`, `--timestamps`, `--since` and `--since-time`
work as on a kubelet."""

from __future__ import annotations

import datetime as dt
import re
import ssl
import urllib.error
import urllib.request

import pytest
from kubernetes import client

from fleetward.devcluster.controlplane import USERS
from fleetward.devcluster.process import wait_for

SCRIPT = "for i in 1 2 3 4 5; do echo line-$i; done; echo done >&2; sleep 300"


def shell_pod(core: client.CoreV1Api, namespace: str, name: str, script: str, **spec) -> None:
    """A pod on the podlet whose one container `main` runs `script` with sh."""
    core.create_namespaced_pod(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {**spec, "containers": [{"name": "main", "image": "none", "command": ["sh", "-c", script]}]},
        },
    )


def test_kubectl_logs_reads_a_podlet_containers_output(core: client.CoreV1Api, namespace: str, kubectl):
    shell_pod(core, namespace, "talker", SCRIPT, terminationGracePeriodSeconds=1)
    wait_for(lambda: core.read_namespaced_pod("talker", namespace).status.phase == "Running", 60, "talker Running")
    wait_for(
        lambda: "done" in kubectl("logs", "-n", namespace, "talker", check=False).stdout, 30, "the whole output logged"
    )

    out = kubectl("logs", "-n", namespace, "talker").stdout
    assert out.splitlines() == ["line-1", "line-2", "line-3", "line-4", "line-5", "done"]
    assert kubectl("logs", "-n", namespace, "talker", "--tail=2").stdout.splitlines() == ["line-5", "done"]
    assert kubectl("logs", "-n", namespace, "talker", "-c", "main", "--limit-bytes=6").stdout == "line-1"

    # Through the Python client too (the same API), and clear errors for what is not there.
    assert "line-3" in core.read_namespaced_pod_log("talker", namespace)
    with pytest.raises(client.exceptions.ApiException) as e:
        core.read_namespaced_pod_log("talker", namespace, previous=True)
    assert "previous terminated container" in str(e.value.body)
    missing = kubectl("logs", "-n", namespace, "talker", "-c", "nope", check=False)
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_the_log_endpoint_answers_only_the_api_server(cluster, core: client.CoreV1Api):
    node = core.read_node("podlet")
    port = node.status.daemon_endpoints.kubelet_endpoint.port
    assert port > 0
    url = f"https://127.0.0.1:{port}/containerLogs/kube-system/any/any"
    ca = cluster.control_plane.ca

    # A user of this cluster, with a valid client certificate from its CA: refused.
    alice = ca.client(next(u for u in USERS if u.name == "alice"))
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.load_cert_chain(str(alice.cert), str(alice.key))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, context=ctx, timeout=10)
    assert refused.value.code == 403

    # No client certificate at all: the TLS handshake itself fails.
    bare = ssl.create_default_context(cafile=str(ca.cert_path))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        urllib.request.urlopen(url, context=bare, timeout=10).read()


def test_kubectl_logs_follow_streams_until_the_container_ends(core: client.CoreV1Api, namespace: str, kubectl):
    script = "echo first; sleep 2; echo second; sleep 2; echo last"
    shell_pod(core, namespace, "slow", script, restartPolicy="Never")
    wait_for(lambda: kubectl("logs", "-n", namespace, "slow", check=False).stdout.startswith("first"), 60, "first line")
    followed = kubectl("logs", "-f", "-n", namespace, "slow").stdout  # returns once the container ended
    assert followed.splitlines() == ["first", "second", "last"]


def test_kubectl_logs_timestamps_and_since(core: client.CoreV1Api, namespace: str, kubectl):
    script = "echo early; sleep 2; echo late; sleep 300"
    shell_pod(core, namespace, "timed", script, terminationGracePeriodSeconds=1)
    wait_for(lambda: "late" in kubectl("logs", "-n", namespace, "timed", check=False).stdout, 60, "both lines")

    stamped = kubectl("logs", "-n", namespace, "timed", "--timestamps").stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["early", "late"]
    times = [dt.datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")) for line in stamped]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", line.split(" ")[0]) for line in stamped)
    assert dt.timedelta(seconds=1.5) < times[1] - times[0] < dt.timedelta(seconds=30)
    assert abs(dt.datetime.now(dt.UTC) - times[0]) < dt.timedelta(minutes=2)  # the time it was written

    between = (times[0] + (times[1] - times[0]) / 2).isoformat().replace("+00:00", "Z")
    assert kubectl("logs", "-n", namespace, "timed", f"--since-time={between}").stdout.splitlines() == ["late"]
    assert kubectl("logs", "-n", namespace, "timed", "--since=1h").stdout.splitlines() == ["early", "late"]
    after = (times[1] + dt.timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    assert kubectl("logs", "-n", namespace, "timed", f"--since-time={after}").stdout == ""
    tail = kubectl("logs", "-n", namespace, "timed", "--tail=1", "--timestamps").stdout
    assert tail == stamped[1] + "\n"
