"""DevCluster: the whole local cluster — control plane, podlet node, simulated kwok
nodes, Kafka, PostgreSQL and Prometheus — started and stopped as one.

    with DevCluster.create("test") as cluster:
        cluster.start()                     # control plane + podlet
        kafka = cluster.kafka()             # started on first use
        print(cluster.env())                # KUBECONFIG, PATH, KAFKA_BOOTSTRAP, ...
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config

from fleetward.devcluster import layout
from fleetward.devcluster.controlplane import (
    ADMIN,
    APISERVER_KUBELET_CLIENT,
    LOCAL_PROVISIONER,
    PROMETHEUS,
    ControlPlane,
    node_identity,
)
from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.process import ComponentFailed, ManagedProcess, free_port, wait_for
from fleetward.devcluster.services import Kafka, Kwok, Postgres, Prometheus, Service

log = logging.getLogger("fleetward.devcluster")

PODLET_NODE = "podlet"
BOOTSTRAP_MANIFEST = Path(__file__).with_name("bootstrap.yaml")


class ClusterInUse(RuntimeError):
    """Another process runs a cluster with this name."""


def _lock(path: Path, name: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode().strip() or "?"
        os.close(fd)
        raise ClusterInUse(
            f"a local cluster named {name!r} is already running (pid {holder}); "
            "stop it first (Ctrl-C where it runs) or choose another --name"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


@dataclass
class DevCluster:
    state: Path
    bins: layout.Binaries
    control_plane: ControlPlane = field(init=False)
    podlet: ManagedProcess | None = None
    services: dict[str, Service] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    lock_fd: int | None = None

    @classmethod
    def create(cls, name: str = "dev", *, fresh: bool = True) -> DevCluster:
        """A cluster whose state lives in .fleetward/<name> (wiped first when fresh).

        Holds .fleetward/<name>.lock until stop(), so a second cluster of the same name
        fails at once instead of wiping the state of the one that is running."""
        bins = layout.binaries()
        root = layout.state_root()
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(root / f"{name}.lock", name)
        state = root / name
        if fresh and state.exists():
            shutil.rmtree(state)
        state.mkdir(parents=True, exist_ok=True)
        cluster = cls(state, bins)
        cluster.lock_fd = lock_fd
        return cluster

    def __post_init__(self) -> None:
        self.control_plane = ControlPlane(self.state, self.bins)

    def __enter__(self) -> DevCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def _timed(self, name: str, fn) -> None:
        start = time.monotonic()
        log.info("starting %s ...", name)
        fn()
        self.timings[name] = round(time.monotonic() - start, 2)
        log.info("%s ready in %.1f s", name, self.timings[name])

    def start(self) -> DevCluster:
        """Control plane, bootstrap (RBAC, the default StorageClass), and the podlet node
        (Ready), which also provisions the volumes of that class."""
        try:
            self._timed("control plane", self.control_plane.start)
            self._timed("bootstrap", self.bootstrap)
            self._timed("podlet", self.start_podlet)
        except BaseException:
            self.stop()
            raise
        return self

    def bootstrap(self) -> None:
        apply_manifest(self.api_client(), BOOTSTRAP_MANIFEST.read_text())
        core = client.CoreV1Api(self.api_client())
        deadline = time.monotonic() + 60
        while True:  # pods in `default` need its ServiceAccount (created by the controller manager)
            try:
                core.read_namespaced_service_account("default", "default")
                return
            except client.exceptions.ApiException as e:
                if time.monotonic() > deadline:
                    raise ComponentFailed(
                        "the default ServiceAccount did not appear within 60 s (is kube-controller-manager running?)"
                    ) from e
                time.sleep(0.2)

    @property
    def pod_cidr(self) -> str:
        """This cluster's slice of the loopback range for pod IPs: 127.N.0.0/16 with N from
        the state folder, so two local clusters (a `make up` and a test run, say) do not
        hand out the same pod IPs and clash on their ports. N stays below 63: kwok's fake
        node IPs use 127.63 (its pod IPs are outside loopback, see services.Kwok)."""
        return f"127.{1 + zlib.crc32(str(self.state.resolve()).encode()) % 62}.0.0/16"

    def start_podlet(self) -> None:
        kubeconfig = self.control_plane.kubeconfig_for(node_identity(PODLET_NODE), "podlet")
        provisioner = self.control_plane.kubeconfig_for(LOCAL_PROVISIONER, "provisioner")
        serving = self.control_plane.ca.issue(
            "podlet-serving", f"system:node:{PODLET_NODE}", server_ips=("127.0.0.1",), client=False
        )
        proc = ManagedProcess(
            "podlet",
            [
                sys.executable,
                "-m",
                "fleetward.devcluster.podlet",
                "--node-name",
                PODLET_NODE,
                "--kubeconfig",
                kubeconfig,
                "--root",
                self.state / "podlet",
                "--apiserver-port",
                str(self.control_plane.apiserver_port),
                "--kubelet-version",
                f"v{layout.versions()['KUBERNETES_VERSION']}",
                "--pod-cidr",
                self.pod_cidr,
                # Volumes for claims of the default StorageClass (bootstrap.yaml), as folders
                # under the podlet's root: <state>/podlet/persistent-volumes/pvc-<uid>.
                "--provisioner-kubeconfig",
                provisioner,
                # `kubectl logs`: a kubelet-style log endpoint the API server calls.
                "--log-port",
                str(free_port()),
                "--tls-cert-file",
                serving.cert,
                "--tls-private-key-file",
                serving.key,
                "--client-ca-file",
                self.control_plane.ca.cert_path,
                "--log-reader",
                APISERVER_KUBELET_CLIENT.name,
            ],
            self.state / "logs" / "podlet.log",
            env={**os.environ, "PATH": self.path_env()},
        ).start()
        self.podlet = proc
        core = client.CoreV1Api(self.api_client())

        def node_ready() -> bool:
            node = core.read_node(PODLET_NODE)
            return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

        proc.wait_ready(node_ready, 60, "a Ready node")

    def stop(self) -> None:
        for name, svc in reversed(list(self.services.items())):
            try:
                svc.stop()
            except Exception as e:
                log.warning("stopping %s: %s", name, e)
        self.services.clear()
        if self.podlet is not None:
            self.podlet.stop(timeout=20)
            self.podlet = None
        self.control_plane.stop()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None

    def check(self) -> None:
        """Raise ComponentFailed (with the log tail) if any component has died."""
        self.control_plane.check()
        if self.podlet is not None:
            self.podlet.check()
        for svc in self.services.values():
            svc.check()

    # -- services, started on first use ------------------------------------------------------------

    def _service(self, key: str, factory) -> Any:
        if key not in self.services:
            svc = factory()
            self._timed(key, svc.start)
            self.services[key] = svc
        return self.services[key]

    def kafka(self, mode: str = "plain") -> Kafka:
        """The Kafka broker: mode "plain" (no auth) or "scram" (SASL/SCRAM + ACLs)."""
        if mode not in ("plain", "scram"):
            raise ValueError(f"kafka mode must be 'plain' or 'scram', not {mode!r}")
        return self._service(f"kafka-{mode}", lambda: Kafka(self.state, self.bins, mode=mode))

    def postgres(self) -> Postgres:
        return self._service("postgres", lambda: Postgres(self.state, self.bins))

    def prometheus(self) -> Prometheus:
        """Prometheus, scraping the annotated pods of the cluster and evaluating Fleetward's
        alerting rules (the chart's, charts/fleetward/monitoring/rules.yaml)."""
        kubeconfig = self.control_plane.kubeconfig_for(PROMETHEUS, "prometheus")
        rules = (layout.REPO / "charts" / "fleetward" / "monitoring" / "rules.yaml",)
        return self._service(
            "prometheus", lambda: Prometheus(self.state, self.bins, kubeconfig=kubeconfig, rule_files=rules)
        )

    def kwok(self) -> Kwok:
        kubeconfig = self.control_plane.kubeconfig_for(ADMIN, "kwok")
        return self._service("kwok", lambda: Kwok(self.state, self.bins, kubeconfig))

    def add_kwok_nodes(self, count: int, prefix: str = "kwok-node") -> list[str]:
        """Register `count` simulated nodes (kwok is started if needed); returns their names."""
        self.kwok()
        core = client.CoreV1Api(self.api_client())
        names = [f"{prefix}-{i}" for i in range(count)]
        for name in names:
            try:
                core.create_node(Kwok.node_manifest(name))
            except client.exceptions.ApiException as e:
                if e.status != 409:
                    raise

        def all_ready() -> bool:
            ready = 0
            for node in core.list_node(label_selector="type=kwok").items:
                if node.metadata.name in names and any(
                    c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
                ):
                    ready += 1
            return ready == len(names)

        wait_for(all_ready, 120, f"{count} kwok nodes Ready")
        return names

    # -- access ---------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.admin_kubeconfig

    def user_kubeconfigs(self) -> dict[str, Path]:
        return self.control_plane.user_kubeconfigs()

    def api_client(self, kubeconfig: Path | None = None) -> client.ApiClient:
        return config.new_client_from_config(str(kubeconfig or self.kubeconfig))

    def bin_path(self) -> str:
        """The built kubectl/helm/kwok and this Python's scripts (fleetward), PATH-style."""
        return os.pathsep.join([str(d) for d in self.bins.bin_dirs] + [str(Path(sys.executable).parent)])

    def path_env(self) -> str:
        return os.pathsep.join([self.bin_path(), os.environ.get("PATH", "")])

    def env(self) -> dict[str, str]:
        """How to reach everything: KUBECONFIG, PATH, and one variable per running service."""
        out = {"KUBECONFIG": str(self.kubeconfig), "PATH": self.path_env(), "FLEETWARD_STATE_DIR": str(self.state)}
        for svc in self.services.values():
            out.update(svc.env())
        return out

    def write_env_file(self, path: Path) -> Path:
        """A file to `source`: the variables of env(), PATH prepended to the caller's own."""
        lines = [
            f"# Written by `fleetward dev up` for the cluster in {self.state}.",
            f"# Use it in another shell:  source {path}",
        ]
        for key, value in self.env().items():
            if key == "PATH":
                lines.append(f'export PATH={shlex.quote(self.bin_path())}:"$PATH"')
            else:
                lines.append(f"export {key}={shlex.quote(value)}")
        path.write_text("\n".join(lines) + "\n")
        return path
