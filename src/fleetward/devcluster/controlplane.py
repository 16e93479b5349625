"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback.

The API server serves TLS on 127.0.0.1 with client-certificate authentication and
Node+RBAC authorization, like a production control plane; the named users `alice`,
`bob` and `carol` exist for two-person tests (their group `fleetward:oncall` is
bound to the on-call role in bootstrap.yaml).
"""

from __future__ import annotations

import os
import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleetward.devcluster.layout import Binaries
from fleetward.devcluster.pki import CertificateAuthority, CertPair, Identity, service_account_keys
from fleetward.devcluster.process import ManagedProcess, free_port

CONTROLLER_WORKERS = 25
SERVICE_CIDR = "10.96.0.0/16"  # allocation only: nothing routes there (no kube-proxy)
KUBERNETES_SERVICE_IP = "10.96.0.1"
ONCALL_GROUP = "fleetward:oncall"
# API request rate (per second) allowed to each client of the controller manager and the
# scheduler; see where it is used for why the defaults (20 and 50) are too low here.
CONTROLLER_QPS = 200

ADMIN = Identity("fleetward-admin", ("system:masters",))
USERS = (Identity("alice", (ONCALL_GROUP,)), Identity("bob", (ONCALL_GROUP,)), Identity("carol", (ONCALL_GROUP,)))
CONTROLLER_MANAGER = Identity("system:kube-controller-manager")
SCHEDULER = Identity("system:kube-scheduler")
# How the API server authenticates to node agents (`kubectl logs` through the podlet), as
# kubeadm names it.
APISERVER_KUBELET_CLIENT = Identity("kube-apiserver-kubelet-client", ("system:masters",))
# The podlet's volume provisioner (bound to its role in bootstrap.yaml).
LOCAL_PROVISIONER = Identity("fleetward:local-provisioner")
# Prometheus' pod discovery (read-only role in bootstrap.yaml).
PROMETHEUS = Identity("fleetward:prometheus")


def node_identity(node: str) -> Identity:
    """What the Node authorizer expects of a kubelet (and so of the podlet)."""
    return Identity(f"system:node:{node}", ("system:nodes",))


@dataclass
class ControlPlane:
    state: Path
    bins: Binaries
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    apiserver_port: int = field(default_factory=free_port)
    controller_manager_port: int = field(default_factory=free_port)
    scheduler_port: int = field(default_factory=free_port)
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pki_dir = self.state / "pki"
        self.kubeconfig_dir = self.state / "kubeconfig"
        self.logs = self.state / "logs"
        self.ca = CertificateAuthority(self.pki_dir)
        self.sa = service_account_keys(self.pki_dir)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    # -- kubeconfigs -------------------------------------------------------------------

    def _kubeconfig(self, path: Path, users: list[tuple[str, CertPair]], current: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fleetward-dev",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca.cert_path)},
                }
            ],
            "users": [
                {"name": name, "user": {"client-certificate": str(p.cert), "client-key": str(p.key)}}
                for name, p in users
            ],
            "contexts": [
                {"name": name, "context": {"cluster": "fleetward-dev", "user": name, "namespace": "default"}}
                for name, _ in users
            ],
            "current-context": current,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def kubeconfig_for(self, identity: Identity, file_name: str | None = None) -> Path:
        """A kubeconfig with a single user and context."""
        pair = self.ca.client(identity)
        name = file_name or identity.name.replace(":", "-")
        return self._kubeconfig(self.kubeconfig_dir / f"{name}.kubeconfig", [(name, pair)], name)

    @property
    def admin_kubeconfig(self) -> Path:
        """The main kubeconfig: admin (current) plus a context per named user."""
        users = [("fleetward-admin", self.ca.client(ADMIN))] + [(u.name, self.ca.client(u)) for u in USERS]
        return self._kubeconfig(self.state / "kubeconfig.yaml", users, "fleetward-admin")

    def user_kubeconfigs(self) -> dict[str, Path]:
        return {u.name: self.kubeconfig_for(u) for u in USERS}

    # -- processes ----------------------------------------------------------------------

    def _start(self, name: str, argv: list, ready, timeout: float) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.logs / f"{name}.log").start()
        self.processes.append(proc)
        proc.wait_ready(ready, timeout)
        return proc

    def _healthy(self, port: int, path: str = "/healthz", client: CertPair | None = None) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        ctx.check_hostname = False
        if client:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=2) as r:
            return r.status == 200 and r.read().strip() == b"ok"

    def start(self) -> None:
        serving = self.ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            server_ips=("127.0.0.1", KUBERNETES_SERVICE_IP),
            client=False,
        )
        self.admin_kubeconfig  # noqa: B018 - writes the file
        self.user_kubeconfigs()

        data = self.state / "etcd"
        self._start(
            "etcd",
            [
                self.bins.etcd,
                "--name=fleetward-dev",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
                f"--initial-cluster=fleetward-dev=http://127.0.0.1:{self.etcd_peer_port}",
                "--listen-metrics-urls=",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
                # A dev cluster: fsync on every write only slows tests down.
                "--unsafe-no-fsync",
            ],
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2).status == 200,
            60,
        )
        admin = self.ca.client(ADMIN)
        kubelet_client = self.ca.client(APISERVER_KUBELET_CLIENT)
        self._start(
            "kube-apiserver",
            [
                self.bins.kube_apiserver,
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Service's endpoints would be 127.0.0.1, which Endpoints
                # validation rejects; pods reach the API server through the podlet instead.
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.ca.cert_path}",
                f"--kubelet-certificate-authority={self.ca.cert_path}",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                # Nodes are reached on their InternalIP (loopback here), never by host name.
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.sa.cert}",
                f"--service-account-signing-key-file={self.sa.key}",
                "--allow-privileged=true",
                # FLEETWARD_APISERVER_PROFILING=1 serves /debug/pprof (to see where the API
                # server's CPU goes in a benchmark); off otherwise.
                f"--profiling={'true' if os.environ.get('FLEETWARD_APISERVER_PROFILING') == '1' else 'false'}",
                "--v=1",
            ],
            lambda: self._healthy(self.apiserver_port, "/readyz", admin),
            120,
        )
        # Serving certificates from our CA, so health checks verify them like any client would.
        cm_serving = self.ca.issue(
            "controller-manager-serving",
            "kube-controller-manager",
            server_names=("localhost",),
            server_ips=("127.0.0.1",),
            client=False,
        )
        sched_serving = self.ca.issue(
            "scheduler-serving", "kube-scheduler", server_names=("localhost",), server_ips=("127.0.0.1",), client=False
        )
        cm_kubeconfig = self.kubeconfig_for(CONTROLLER_MANAGER, "controller-manager")
        self._start(
            "kube-controller-manager",
            [
                self.bins.kube_controller_manager,
                f"--kubeconfig={cm_kubeconfig}",
                f"--authentication-kubeconfig={cm_kubeconfig}",
                f"--authorization-kubeconfig={cm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.controller_manager_port}",
                f"--tls-cert-file={cm_serving.cert}",
                f"--tls-private-key-file={cm_serving.key}",
                f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.ca.cert_path}",
                f"--cluster-signing-cert-file={self.ca.cert_path}",
                f"--cluster-signing-key-file={self.ca.key_path}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                # Client-side rate limit of each controller's API client. The default, 20 QPS
                # (burst 30), made the Deployment controller alone need ~160 s to create the
                # ReplicaSets of 1000 Deployments (a create, a status update and an Event each)
                # before it could report any of them available; with 200 the API server's CPU
                # is the limit again (bench/kwok_floor.py, docs/bench/kwok-floor.md).
                f"--kube-api-qps={CONTROLLER_QPS}",
                f"--kube-api-burst={2 * CONTROLLER_QPS}",
                # Workers per controller. Each sync waits on API calls, and with 1000 Agents
                # applied at once those take ~250 ms: the default 5 Deployment and 5
                # ReplicaSet workers then created the runtime pods ~45 s behind their
                # Deployments while the machine had CPU to spare (bench/operator_scale.py).
                *(f"--concurrent-{c}-syncs={CONTROLLER_WORKERS}" for c in ("deployment", "replicaset", "endpoint")),
                f"--concurrent-service-endpoint-syncs={CONTROLLER_WORKERS}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
                "--v=1",
            ],
            lambda: self._healthy(self.controller_manager_port),
            90,
        )
        sched_kubeconfig = self.kubeconfig_for(SCHEDULER, "scheduler")
        self._start(
            "kube-scheduler",
            [
                self.bins.kube_scheduler,
                f"--config={self._scheduler_config(sched_kubeconfig)}",
                f"--authentication-kubeconfig={sched_kubeconfig}",
                f"--authorization-kubeconfig={sched_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.scheduler_port}",
                f"--tls-cert-file={sched_serving.cert}",
                f"--tls-private-key-file={sched_serving.key}",
                "--profiling=false",
                "--v=1",
            ],
            lambda: self._healthy(self.scheduler_port),
            90,
        )

    def _scheduler_config(self, kubeconfig: Path) -> Path:
        """The scheduler's client settings live in its config file (its --kube-api-qps and
        --kubeconfig flags are deprecated). At the default 50 QPS (burst 100) binding alone
        would take ~18 s for 1000 pods."""
        config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig), "qps": CONTROLLER_QPS, "burst": 2 * CONTROLLER_QPS},
            "leaderElection": {"leaderElect": False},
        }
        path = self.state / "kube-scheduler.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def check(self) -> None:
        for p in self.processes:
            p.check()

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()
