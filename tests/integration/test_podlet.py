"""A Deployment created through the API really runs: the controller manager makes a
ReplicaSet and Pods, the scheduler binds them to the podlet node, the podlet runs the
command as a process in a private mount namespace, probes drive readiness and
restarts, ConfigMap updates reach the files the process reads, deletion sends SIGTERM,
and deleting the Deployment garbage-collects everything."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from fleetward.devcluster.process import wait_for

PODAPP = Path(__file__).resolve().parents[1] / "fixtures" / "podapp.py"
CONTROL_MOUNT = "/run/fleetward-test/control"
CONFIG_MOUNT = "/run/fleetward-test/config"


def http(url: str, timeout: float = 2) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def container(control: Path, *, probes: bool = True, always_ready: bool = True) -> dict:
    c = {
        "name": "app",
        "image": "ignored.example/podapp:1",
        "command": ["python3", str(PODAPP)],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "podapp-secret", "key": "token"}}},
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "podapp-config", "key": "greeting"}}},
            {"name": "CONTROL_DIR", "value": CONTROL_MOUNT},
            {"name": "CONFIG_FILE", "value": f"{CONFIG_MOUNT}/message"},
            {"name": "ALWAYS_READY", "value": "1" if always_ready else "0"},
        ],
        "envFrom": [{"prefix": "FROM_", "configMapRef": {"name": "podapp-config"}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "volumeMounts": [
            {"name": "control", "mountPath": CONTROL_MOUNT},
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        ],
    }
    if probes:
        c["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1}
        c["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2}
    return c


def pod_spec(control: Path, **kw) -> dict:
    return {
        "terminationGracePeriodSeconds": 10,
        "containers": [container(control, **kw)],
        "volumes": [
            {"name": "control", "hostPath": {"path": str(control)}},
            {"name": "config", "configMap": {"name": "podapp-config"}},
        ],
    }


@pytest.fixture
def app_config(core: client.CoreV1Api, namespace: str) -> str:
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="podapp-config"),
            data={"message": "version one", "greeting": "hello", "ENV_FROM": "from-env-from"},
        ),
    )
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="podapp-secret"), string_data={"token": "s3cr3t-token"}),
    )
    return namespace


@pytest.fixture
def control(tmp_path: Path) -> Path:
    d = tmp_path / "control"
    (d / "signals").mkdir(parents=True)
    return d


def pid_of(pod) -> int:
    cid = pod.status.container_statuses[0].container_id
    assert cid.startswith("podlet://"), cid
    return int(cid.removeprefix("podlet://"))


def read_in_pod(pid: int, path: str) -> str:
    """A file as the container process sees it: inside its mount namespace."""
    out = subprocess.run(["nsenter", f"--target={pid}", "--mount", "cat", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise FileNotFoundError(f"{path} in pid {pid}: {out.stderr.strip()}")
    return out.stdout


def mode_in_pod(pid: int, path: str) -> str:
    out = subprocess.run(
        ["nsenter", f"--target={pid}", "--mount", "stat", "-L", "-c", "%a", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def is_ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_deployment_runs_as_real_processes_on_the_podlet(cluster, api, core, app_config, control):
    ns = app_config
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(
        ns,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "podapp"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "podapp"}},
                "template": {"metadata": {"labels": {"app": "podapp"}}, "spec": pod_spec(control)},
            },
        },
    )

    def available() -> bool:
        d = apps.read_namespaced_deployment("podapp", ns)
        return (d.status.available_replicas or 0) == 2 and any(
            c.type == "Available" and c.status == "True" for c in d.status.conditions or []
        )

    wait_for(available, 60, "Deployment podapp Available with 2 replicas")

    rs = apps.list_namespaced_replica_set(ns).items
    assert len(rs) == 1 and rs[0].metadata.owner_references[0].kind == "Deployment"
    pods = core.list_namespaced_pod(ns, label_selector="app=podapp").items
    assert len(pods) == 2
    ips = set()
    for pod in pods:
        assert pod.spec.node_name == "podlet"
        assert pod.metadata.owner_references[0].name == rs[0].metadata.name
        assert is_ready(pod) and pod.status.phase == "Running"
        ip = pod.status.pod_ip
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(cluster.pod_cidr) and not ip.startswith("127.0.0."), ip
        ips.add(ip)

        # A real process: its PID is alive, runs our command, in its own mount namespace.
        pid = pid_of(pod)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(PODAPP).encode() in cmdline
        status, body = http(f"http://{ip}:8080/whoami")
        assert status == 200
        who = json.loads(body)
        assert who["pid"] == pid
        assert who["mntns"] != os.readlink("/proc/self/ns/mnt"), "volumes must be mounted in a private namespace"
        assert who["env"] == {
            "POD_NAME": pod.metadata.name,
            "POD_IP": ip,
            "POD_NAMESPACE": ns,
            "TOKEN": "s3cr3t-token",
            "GREETING": "hello",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "FROM_ENV_FROM": "from-env-from",
        }
    assert len(ips) == 2, "each pod has its own loopback address"
    assert not any(Path(CONFIG_MOUNT).glob("*")), "the config volume is not mounted on the host"

    # A ConfigMap update reaches the file the running process reads (atomic swap).
    ip = pods[0].status.pod_ip
    assert http(f"http://{ip}:8080/config") == (200, "version one")
    core.patch_namespaced_config_map("podapp-config", ns, {"data": {"message": "version two"}})
    wait_for(lambda: http(f"http://{ip}:8080/config") == (200, "version two"), 20, "updated config in the pod")

    # Deleting a pod sends SIGTERM to its process; the ReplicaSet replaces it.
    victim = pods[0]
    victim_pid = pid_of(victim)
    core.delete_namespaced_pod(victim.metadata.name, ns)
    signal_file = control / "signals" / victim.metadata.name
    wait_for(signal_file.exists, 20, "SIGTERM recorded by the deleted pod")
    assert signal_file.read_text() == f"SIGTERM {victim_pid}"

    def victim_gone_and_replaced() -> bool:
        current = core.list_namespaced_pod(ns, label_selector="app=podapp").items
        names = {p.metadata.name for p in current}
        return victim.metadata.name not in names and sum(is_ready(p) for p in current) == 2

    wait_for(victim_gone_and_replaced, 60, "pod removed and replaced")
    assert not Path(f"/proc/{victim_pid}").exists()
    remaining_pids = [pid_of(p) for p in core.list_namespaced_pod(ns, label_selector="app=podapp").items]

    # Deleting the Deployment garbage-collects ReplicaSet and Pods (owner references).
    apps.delete_namespaced_deployment("podapp", ns, body=client.V1DeleteOptions(propagation_policy="Background"))
    wait_for(
        lambda: not apps.list_namespaced_replica_set(ns).items and not core.list_namespaced_pod(ns).items,
        60,
        "ReplicaSet and Pods garbage-collected",
    )
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in remaining_pids), 20, "processes ended")


def create_pod(core, ns: str, name: str, spec: dict):
    return core.create_namespaced_pod(
        ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}}, "spec": spec}
    )


def test_readiness_probe_flips_ready_both_ways(core, app_config, control):
    ns = app_config
    create_pod(core, ns, "gated", pod_spec(control, always_ready=False))
    read = lambda: core.read_namespaced_pod("gated", ns)  # noqa: E731
    wait_for(lambda: read().status.phase == "Running", 30, "pod Running")
    time.sleep(3)  # several probe periods: it must stay unready while /ready says 503
    assert not is_ready(read())
    (control / "ready").touch()
    wait_for(lambda: is_ready(read()), 20, "Ready after the probe succeeds")
    (control / "ready").unlink()
    wait_for(lambda: not is_ready(read()), 20, "unready after the probe fails")
    assert read().status.container_statuses[0].restart_count == 0, "readiness failures do not restart"


def test_liveness_failure_restarts_the_container(core, app_config, control):
    ns = app_config
    create_pod(core, ns, "sickly", pod_spec(control))
    read = lambda: core.read_namespaced_pod("sickly", ns)  # noqa: E731
    wait_for(lambda: is_ready(read()), 30, "pod Ready")
    first_pid = pid_of(read())
    (control / "sick").touch()
    wait_for(lambda: read().status.container_statuses[0].restart_count >= 1, 30, "container restarted")
    (control / "sick").unlink()
    wait_for(lambda: is_ready(read()), 30, "Ready again after restart")
    status = read().status.container_statuses[0]
    assert pid_of(read()) != first_pid
    assert status.last_state.terminated is not None
    reasons = {e.reason for e in core.list_namespaced_event(ns, field_selector="involvedObject.name=sickly").items}
    assert {"Unhealthy", "Killing", "Started"} <= reasons


@pytest.mark.parametrize(
    "policy,code,phase,restarts",
    [
        ("Never", 3, "Failed", 0),
        ("Never", 0, "Succeeded", 0),
        ("OnFailure", 0, "Succeeded", 0),
    ],
)
def test_restart_policy_and_exit_codes(core, namespace, policy, code, phase, restarts):
    name = f"exit-{policy.lower()}-{code}"
    create_pod(
        core,
        namespace,
        name,
        {
            "restartPolicy": policy,
            "containers": [{"name": "main", "image": "none", "command": ["sh", "-c", f"echo bye; exit {code}"]}],
        },
    )
    wait_for(lambda: core.read_namespaced_pod(name, namespace).status.phase == phase, 30, f"phase {phase}")
    st = core.read_namespaced_pod(name, namespace).status.container_statuses[0]
    assert st.state.terminated.exit_code == code and st.restart_count == restarts


def test_crashing_container_is_restarted_with_backoff(core, namespace):
    create_pod(
        core,
        namespace,
        "crasher",
        {
            "restartPolicy": "Always",
            "containers": [{"name": "main", "image": "none", "command": ["sh", "-c", "exit 1"]}],
        },
    )
    read = lambda: core.read_namespaced_pod("crasher", namespace)  # noqa: E731
    wait_for(lambda: read().status.container_statuses[0].restart_count >= 2, 30, "two restarts")
    st = read().status.container_statuses[0]
    assert st.last_state.terminated.exit_code == 1
    reasons = {
        e.reason for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=crasher").items
    }
    assert "BackOff" in reasons


def test_missing_secret_holds_the_pod_until_it_exists(core, namespace, control):
    spec = {
        "containers": [
            {
                "name": "main",
                "image": "none",
                "command": ["sleep", "300"],
                "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}],
            }
        ],
        "terminationGracePeriodSeconds": 1,
    }
    create_pod(core, namespace, "waits", spec)
    read = lambda: core.read_namespaced_pod("waits", namespace)  # noqa: E731

    def waiting_reason():
        statuses = read().status.container_statuses or []
        return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None

    wait_for(lambda: waiting_reason() == "CreateContainerConfigError", 30, "CreateContainerConfigError")
    assert 'secret "later" not found' in read().status.container_statuses[0].state.waiting.message
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="later"), string_data={"k": "v"})
    )
    wait_for(lambda: read().status.phase == "Running", 30, "Running once the Secret exists")


def test_deleted_secret_stays_in_a_running_pod(core, namespace):
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="cred"), string_data={"key": "private-key-material"}),
    )
    spec = {
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "main",
                "image": "none",
                "command": ["sleep", "300"],
                "volumeMounts": [{"name": "cred", "mountPath": "/run/fleetward-test/cred", "readOnly": True}],
            }
        ],
        "volumes": [{"name": "cred", "secret": {"secretName": "cred", "defaultMode": 0o400}}],
    }
    create_pod(core, namespace, "holder", spec)
    read = lambda: core.read_namespaced_pod("holder", namespace)  # noqa: E731
    wait_for(lambda: read().status.phase == "Running", 30, "Running")
    pid = pid_of(read())

    def seen_by_pod() -> str:
        return read_in_pod(pid, "/run/fleetward-test/cred/key")

    assert seen_by_pod() == "private-key-material"
    assert mode_in_pod(pid, "/run/fleetward-test/cred/key") == "400"
    with pytest.raises(FileNotFoundError):
        read_in_pod(os.getpid(), "/run/fleetward-test/cred/key")  # not visible outside the pod
    core.delete_namespaced_secret("cred", namespace)
    time.sleep(3)  # several volume resyncs
    assert seen_by_pod() == "private-key-material", "the kubelet keeps a deleted Secret's files in a running pod"


def test_service_account_token_is_projected_and_accepted_by_the_api_server(api, core, namespace):
    spec = {
        "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": "none", "command": ["sleep", "300"]}],
    }
    create_pod(core, namespace, "sa-user", spec)
    read = lambda: core.read_namespaced_pod("sa-user", namespace)  # noqa: E731
    wait_for(lambda: read().status.phase == "Running", 30, "Running")
    pid = pid_of(read())
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = read_in_pod(pid, f"{sa_dir}/token")
    assert read_in_pod(pid, f"{sa_dir}/namespace") == namespace
    assert "BEGIN CERTIFICATE" in read_in_pod(pid, f"{sa_dir}/ca.crt")
    review = client.AuthenticationV1Api(api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
    )
    assert review.status.authenticated
    assert review.status.user.username == f"system:serviceaccount:{namespace}:default"


def test_grace_period_then_sigkill_for_a_process_that_ignores_sigterm(core, namespace):
    spec = {
        "terminationGracePeriodSeconds": 2,
        "containers": [
            {
                "name": "main",
                "image": "none",
                "command": ["sh", "-c", "trap '' TERM; echo stubborn; while :; do sleep 0.2; done"],
            }
        ],
    }
    create_pod(core, namespace, "stubborn", spec)
    wait_for(lambda: core.read_namespaced_pod("stubborn", namespace).status.phase == "Running", 30, "Running")
    pid = pid_of(core.read_namespaced_pod("stubborn", namespace))
    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("stubborn", namespace)
            return False
        except client.exceptions.ApiException as e:
            return e.status == 404

    wait_for(gone, 30, "pod removed after its grace period")
    elapsed = time.monotonic() - started
    assert elapsed >= 2, f"removed after {elapsed:.1f}s: the grace period was not honoured"
    assert not Path(f"/proc/{pid}").exists(), "SIGKILL ended the process that ignored SIGTERM"


def test_container_output_goes_to_log_files(cluster, core, namespace):
    create_pod(
        core,
        namespace,
        "talker",
        {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "none", "command": ["sh", "-c", "echo to-stdout; echo to-stderr >&2"]}
            ],
        },
    )
    wait_for(lambda: core.read_namespaced_pod("talker", namespace).status.phase == "Succeeded", 30, "Succeeded")
    uid = core.read_namespaced_pod("talker", namespace).metadata.uid
    log = cluster.state / "podlet" / "logs" / f"{namespace}_talker_{uid}" / "main" / "0.log"
    assert log.read_text().split() == ["to-stdout", "to-stderr"]


def test_podlet_node_is_ready_and_renews_its_lease(core, api):
    node = core.read_node("podlet")
    assert node.status.node_info.kubelet_version == "v1.36.3"
    assert node.metadata.labels["fleetward.dev/node-type"] == "podlet"
    assert not node.spec.taints
    leases = client.CoordinationV1Api(api)
    first = leases.read_namespaced_lease("podlet", "kube-node-lease").spec.renew_time
    assert leases.read_namespaced_lease("podlet", "kube-node-lease").spec.holder_identity == "podlet"
    wait_for(
        lambda: leases.read_namespaced_lease("podlet", "kube-node-lease").spec.renew_time > first, 30, "lease renewed"
    )


def test_init_containers_run_to_completion_before_the_app(core, namespace):
    spec = {
        "restartPolicy": "Never",
        "volumes": [{"name": "work", "emptyDir": {}}],
        "initContainers": [
            {
                "name": "prepare",
                "image": "none",
                "command": ["sh", "-c", "echo prepared-by-init > /run/fleetward-test/work/note"],
                "volumeMounts": [{"name": "work", "mountPath": "/run/fleetward-test/work"}],
            }
        ],
        "containers": [
            {
                "name": "main",
                "image": "none",
                "command": ["sh", "-c", 'test "$(cat /run/fleetward-test/work/note)" = prepared-by-init'],
                "volumeMounts": [{"name": "work", "mountPath": "/run/fleetward-test/work"}],
            }
        ],
    }
    create_pod(core, namespace, "with-init", spec)
    wait_for(
        lambda: core.read_namespaced_pod("with-init", namespace).status.phase in ("Succeeded", "Failed"),
        30,
        "pod finished",
    )
    status = core.read_namespaced_pod("with-init", namespace).status
    assert status.phase == "Succeeded", "the app container saw the init container's file"
    assert status.init_container_statuses[0].state.terminated.exit_code == 0
    initialized = next(c for c in status.conditions if c.type == "Initialized")
    assert initialized.status == "True"


def test_a_claim_of_the_default_class_is_provisioned_mounted_and_outlives_its_pods(cluster, api, core, namespace):
    """The default StorageClass's provisioner (in the podlet) makes a hostPath volume for a
    claim that names no class, the controller manager binds them, the scheduler holds a
    pod until its claim exists and is bound, the podlet mounts the volume's folder; a second
    pod reads what the first wrote; deleting the claim removes the volume and its folder."""
    storage = client.StorageV1Api(api)
    default = storage.read_storage_class("fleetward-local")
    assert default.metadata.annotations["storageclass.kubernetes.io/is-default-class"] == "true"

    def pod(name: str, script: str) -> None:
        spec = {
            "restartPolicy": "Never",
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            "containers": [
                {
                    "name": "main",
                    "image": "none",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/run/fleetward-test/data"}],
                }
            ],
        }
        create_pod(core, namespace, name, spec)

    def finished(name: str) -> client.V1Pod:
        done = lambda: core.read_namespaced_pod(name, namespace).status.phase in ("Succeeded", "Failed")  # noqa: E731
        wait_for(done, 30, f"pod {name} finished")
        return core.read_namespaced_pod(name, namespace)

    pod("writer", "echo kept > /run/fleetward-test/data/note")
    time.sleep(2)
    writer = core.read_namespaced_pod("writer", namespace)
    assert writer.spec.node_name is None and writer.status.phase == "Pending", "scheduled without its claim"
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}},
        },
    )
    read_claim = lambda: core.read_namespaced_persistent_volume_claim("data", namespace)  # noqa: E731
    wait_for(lambda: read_claim().status.phase == "Bound", 30, "the claim Bound")
    claim = read_claim()
    assert claim.spec.storage_class_name == "fleetward-local"
    pv = core.read_persistent_volume(claim.spec.volume_name)
    assert pv.status.phase == "Bound" and pv.spec.claim_ref.uid == claim.metadata.uid
    folder = Path(pv.spec.host_path.path)
    assert folder.is_dir() and folder.is_relative_to(cluster.state)

    assert finished("writer").status.phase == "Succeeded"
    core.delete_namespaced_pod("writer", namespace)
    assert (folder / "note").read_text() == "kept\n"
    pod("reader", 'test "$(cat /run/fleetward-test/data/note)" = kept')
    assert finished("reader").status.phase == "Succeeded"

    core.delete_namespaced_pod("reader", namespace)
    core.delete_namespaced_persistent_volume_claim("data", namespace)

    def volume_gone() -> bool:
        try:
            core.read_persistent_volume(pv.metadata.name)
            return False
        except client.exceptions.ApiException as e:
            return e.status == 404

    wait_for(volume_gone, 60, "the released volume deleted")
    assert not folder.exists()
