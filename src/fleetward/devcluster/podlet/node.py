"""The podlet: a node agent that registers a Node, keeps its Lease, and runs every
Pod bound to it as local processes (see pod.py). It authenticates as
`system:node:<name>`, so the API server's Node authorizer and NodeRestriction admission
limit it exactly as they limit a kubelet."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import platform
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from fleetward.devcluster.podlet.logserver import LogLookupError, LogServer
from fleetward.devcluster.podlet.pod import PodWorker
from fleetward.devcluster.podlet.provisioner import LocalProvisioner
from fleetward.devcluster.podlet.volumes import TokenCache

log = logging.getLogger("podlet")

LEASE_SECONDS = 40
LEASE_RENEW = 10
STATUS_EVERY = 20


class IPPool:
    """One loopback address per pod from the node's range (default 127.0.1.1 upwards; DevCluster
    gives each cluster its own /16). 127.0.0.0/24 is always left to the
    host's own services). Linux routes all of 127.0.0.0/8 to `lo`, so no setup is needed.
    Released addresses go to the end of the pool, so a new pod does not inherit the
    address a deleted pod's clients may still be talking to."""

    def __init__(self, cidr: str = "127.0.1.0/16"):
        net = ipaddress.ip_network(cidr, strict=False)
        self._free = [str(ip) for ip in net.hosts() if not str(ip).startswith("127.0.0.")]
        self._by_uid: dict[str, str] = {}
        self._lock = threading.Lock()

    def allocate(self, uid: str) -> str:
        with self._lock:
            if uid not in self._by_uid:
                if not self._free:
                    raise RuntimeError("podlet: no pod IPs left")
                self._by_uid[uid] = self._free.pop(0)
            return self._by_uid[uid]

    def release(self, uid: str) -> None:
        with self._lock:
            ip = self._by_uid.pop(uid, None)
            if ip:
                self._free.append(ip)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class LogServerSettings:
    """The kubelet-style log endpoint (logserver.py): its TLS identity, the CA its clients'
    certificates must come from, and the client identities it answers (the API server's)."""

    port: int
    cert: Path
    key: Path
    client_ca: Path
    allowed_users: tuple[str, ...]


@dataclass
class Podlet:
    node_name: str
    kubeconfig: Path
    root: Path
    apiserver_port: int
    kubelet_version: str = "v0.0.0"
    volume_resync_seconds: float = 1.0
    capacity: dict[str, str] = field(
        default_factory=lambda: {"cpu": "32", "memory": "64Gi", "pods": "250", "ephemeral-storage": "100Gi"}
    )
    labels: dict[str, str] = field(default_factory=dict)
    host_ip: str = "127.0.0.1"
    pod_cidr: str = "127.0.1.0/16"
    provisioner_kubeconfig: Path | None = None
    """Run the local volume provisioner (provisioner.py) with this identity; None: not here."""
    log_server: LogServerSettings | None = None
    """Serve container logs to the API server (`kubectl logs`); None: not served."""

    def __post_init__(self) -> None:
        self.api_client = config.new_client_from_config(str(self.kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.ips = IPPool(self.pod_cidr)
        self.tokens = TokenCache()
        self.workers: dict[str, PodWorker] = {}
        self._logs: LogServer | None = None
        self._log_port = 0
        if self.log_server is not None:
            ls = self.log_server
            self._logs = LogServer(
                self.host_ip,
                ls.port,
                self.container_log,
                cert=ls.cert,
                key=ls.key,
                client_ca=ls.client_ca,
                allowed_users=ls.allowed_users,
            )
            self._log_port = self._logs.port
        self.stopping = threading.Event()
        self.root.mkdir(parents=True, exist_ok=True)
        # What every container gets (the podlet's PATH, so `fleetward` and the built
        # binaries resolve; in-cluster clients reach the API server on loopback).
        self.base_env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.apiserver_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.apiserver_port),
            "LANG": "C.UTF-8",
        }

    # -- container logs (logserver.py) ---------------------------------------------------------

    def container_log(self, namespace: str, pod: str, container: str, previous: bool) -> tuple[Path, Any]:
        """The log file of a container of a pod running here, and a check of whether it
        still runs (for `follow`)."""
        here = list(self.workers.values())
        worker = next((w for w in here if (w.pod.metadata.namespace, w.pod.metadata.name) == (namespace, pod)), None)
        if worker is None:
            raise LogLookupError(f"pod {namespace}/{pod} does not run on node {self.node_name}", HTTPStatus.NOT_FOUND)
        runs = [*worker.init, *worker.containers]
        run = next((r for r in runs if r.spec.name == container), None)
        if run is None:
            names = ", ".join(r.spec.name for r in runs)
            raise LogLookupError(f"container {container!r} is not in pod {namespace}/{pod} (it has: {names})")
        attempt = run.restart_count - (1 if previous else 0)
        if attempt < 0:
            raise LogLookupError(f"previous terminated container {container!r} in pod {namespace}/{pod} not found")
        path = worker.log_dir / container / f"{attempt}.log"
        if not path.is_file():
            raise LogLookupError(f"container {container!r} in pod {namespace}/{pod} has not started yet")
        copier = run.log_copier if run.restart_count == attempt else None

        def writing() -> bool:
            # Until the container ended and its last output was copied (a second at most to
            # drain the pipe; a child that kept the pipe open keeps the log growing).
            if run.running and run.restart_count == attempt:
                return True
            return copier is not None and not copier.done.wait(1.0)

        return path, writing

    # -- API helpers used by pod workers ------------------------------------------------------

    def get_configmap(self, namespace: str, name: str) -> Any:
        return self.core.read_namespaced_config_map(name, namespace)

    def get_secret(self, namespace: str, name: str) -> Any:
        return self.core.read_namespaced_secret(name, namespace)

    def get_claim(self, namespace: str, name: str) -> Any:
        return self.core.read_namespaced_persistent_volume_claim(name, namespace)

    def get_volume(self, name: str) -> Any:
        return self.core.read_persistent_volume(name)

    def request_token(self, pod: Any, sa: str, audiences: list[str] | None, ttl: int) -> tuple[str, dt.datetime]:
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=audiences or [],
                expiration_seconds=max(ttl, 600),
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        result = self.core.create_namespaced_service_account_token(sa, pod.metadata.namespace, body)
        return result.status.token, result.status.expiration_timestamp

    def event(self, pod: Any, type_: str, reason: str, message: str) -> None:
        now = utcnow()
        try:
            self.core.create_namespaced_event(
                pod.metadata.namespace,
                client.CoreV1Event(
                    metadata=client.V1ObjectMeta(name=f"{pod.metadata.name}.{uuid.uuid4().hex[:12]}"),
                    involved_object=client.V1ObjectReference(
                        api_version="v1",
                        kind="Pod",
                        name=pod.metadata.name,
                        namespace=pod.metadata.namespace,
                        uid=pod.metadata.uid,
                    ),
                    reason=reason,
                    message=message[:1024],
                    type=type_,
                    count=1,
                    first_timestamp=now,
                    last_timestamp=now,
                    source=client.V1EventSource(component="podlet", host=self.node_name),
                    reporting_component="podlet",
                    reporting_instance=self.node_name,
                ),
            )
        except ApiException as e:
            log.debug("event not recorded: %s", e.reason)

    # -- Node and Lease -------------------------------------------------------------------------

    def node_status(self) -> dict:
        now = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = [
            {
                "type": t,
                "status": "False",
                "reason": f"PodletHas{r}",
                "message": f"podlet has {m}",
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._since,
            }
            for t, r, m in (
                ("MemoryPressure", "SufficientMemory", "sufficient memory available"),
                ("DiskPressure", "NoDiskPressure", "no disk pressure"),
                ("PIDPressure", "SufficientPID", "sufficient PID available"),
            )
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "PodletReady",
                "message": "podlet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._since,
            }
        )
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._log_port}},
            "nodeInfo": {
                "machineID": self._machine_id,
                "systemUUID": self._machine_id,
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": "fleetward podlet",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
                "containerRuntimeVersion": "podlet://0.1.0",
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
            },
        }

    def register(self) -> None:
        self._since = utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        self._machine_id = uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex
        self._boot_id = uuid.uuid4().hex
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": self.node_status()["nodeInfo"]["architecture"],
            "fleetward.dev/node-type": "podlet",
            **self.labels,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
            "status": self.node_status(),
        }
        try:
            self.core.create_node(body)
            log.info("registered node %s", self.node_name)
        except ApiException as e:
            if e.status != 409:
                raise
            log.info("node %s exists; taking it over", self.node_name)
        self.heartbeat()
        self.renew_lease()

    def heartbeat(self) -> None:
        self.core.patch_node_status(
            self.node_name, {"status": self.node_status()}, _content_type="application/strategic-merge-patch+json"
        )

    def renew_lease(self) -> None:
        node = self.core.read_node(self.node_name)
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.node_name,
                "namespace": "kube-node-lease",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": node.metadata.uid}
                ],
            },
            "spec": spec,
        }
        try:
            self.coordination.patch_namespaced_lease(
                self.node_name, "kube-node-lease", {"spec": spec}, _content_type="application/merge-patch+json"
            )
        except ApiException as e:
            if e.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def keepalive(self) -> None:
        next_status = time.monotonic() + STATUS_EVERY
        while not self.stopping.wait(LEASE_RENEW):
            try:
                self.renew_lease()
                if time.monotonic() >= next_status:
                    self.heartbeat()
                    next_status = time.monotonic() + STATUS_EVERY
            except Exception as e:  # the API server may be restarting; try again next round
                log.warning("lease/heartbeat failed: %s", e)

    # -- Pods ---------------------------------------------------------------------------------------

    def dispatch(self, kind: str, pod: Any) -> None:
        uid = pod.metadata.uid
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                worker.gone()
            return
        if worker is None:
            if (
                pod.status is not None
                and pod.status.phase in ("Succeeded", "Failed")
                and pod.metadata.deletion_timestamp is None
            ):
                return  # finished before this podlet started: nothing to run
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            worker.start()
        else:
            worker.update(pod)
        for gone in [u for u, w in self.workers.items() if w.done.is_set()]:
            del self.workers[gone]

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                pods = self.core.list_pod_for_all_namespaces(field_selector=selector)
                seen = set()
                for pod in pods.items:
                    seen.add(pod.metadata.uid)
                    self.dispatch("MODIFIED", pod)
                for uid, worker in list(self.workers.items()):
                    if uid not in seen:
                        worker.gone()
                w = watch.Watch()
                for ev in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=pods.metadata.resource_version,
                    timeout_seconds=300,
                ):
                    if self.stopping.is_set():
                        w.stop()
                        break
                    self.dispatch(ev["type"], ev["object"])
            except ApiException as e:
                if e.status != 410:  # 410 Gone: resource version too old, just list again
                    log.warning("pod watch failed: %s %s", e.status, e.reason)
                    time.sleep(1)
            except Exception as e:
                if not self.stopping.is_set():
                    log.warning("pod watch interrupted: %s", e)
                    time.sleep(1)

    def run(self) -> None:
        if self._logs is not None:
            self._logs.start()
        self.register()
        threading.Thread(target=self.keepalive, name="keepalive", daemon=True).start()
        watcher = threading.Thread(target=self.watch_pods, name="pod-watch", daemon=True)
        watcher.start()
        if self.provisioner_kubeconfig is not None:
            provisioner = LocalProvisioner(
                config.new_client_from_config(str(self.provisioner_kubeconfig)), self.root / "persistent-volumes"
            )
            threading.Thread(target=provisioner.run, args=(self.stopping,), name="provisioner", daemon=True).start()
        log.info("podlet %s running pods under %s", self.node_name, self.root)
        self.stopping.wait()

    def stop(self) -> None:
        """Stop every container (SIGTERM, short grace, SIGKILL) and return."""
        self.stopping.set()
        if self._logs is not None:
            self._logs.stop()
        for worker in list(self.workers.values()):
            worker.done.wait(10)
