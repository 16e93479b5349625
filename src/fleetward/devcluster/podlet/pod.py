"""One Pod on the podlet node: its volumes, its containers as local processes, its
probes and its status, from scheduling to deletion. One worker thread per Pod."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fleetward.devcluster.podlet import launch
from fleetward.devcluster.podlet.env import EnvError, container_env, expand, field_value
from fleetward.devcluster.podlet.logfile import LogCopier
from fleetward.devcluster.podlet.probes import ProbeState, run_probe
from fleetward.devcluster.podlet.volumes import (
    SourceContext,
    VolumeNotReady,
    claim_path,
    unsupported,
    volume_files,
    write_atomic,
)
from fleetward.devcluster.process import die_with_parent

if TYPE_CHECKING:
    from fleetward.devcluster.podlet.node import Podlet

log = logging.getLogger("podlet.pod")

# Crash-loop back-off: the kubelet's shape (doubling, capped), shortened for a dev node.
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 60.0
TICK = 0.2


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRun:
    """A container's process and what the status reports about it."""

    spec: Any
    init: bool
    proc: subprocess.Popen | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    restart_count: int = 0
    terminated: dict | None = None  # current state when not running and not restarting
    last_state: dict | None = None  # lastState.terminated
    waiting: tuple[str, str] = ("ContainerCreating", "")
    next_start: float = 0.0
    backoff: float = BACKOFF_INITIAL
    succeeded: bool = False  # init containers: completed with exit code 0
    startup: ProbeState | None = None
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    killing: str | None = None  # why the podlet is stopping it (liveness, deletion)
    log_copier: LogCopier | None = None  # of the current attempt's output

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def started(self) -> bool:
        return self.running and (self.startup is None or self.startup.result is True)

    @property
    def ready(self) -> bool:
        if not self.started:
            return False
        return self.readiness is None or self.readiness.result is True


@dataclass
class Condition:
    status: str
    since: str = field(default_factory=now_iso)
    reason: str | None = None


class PodWorker(threading.Thread):
    def __init__(self, podlet: Podlet, pod: Any):
        super().__init__(name=f"pod-{pod.metadata.namespace}/{pod.metadata.name}", daemon=True)
        self.podlet = podlet
        self.api: client.CoreV1Api = podlet.core
        self.uid: str = pod.metadata.uid
        self._pod = pod
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._force_gone = False
        self.done = threading.Event()
        self.dir = podlet.root / "pods" / self.uid
        self.log_dir = podlet.root / "logs" / f"{pod.metadata.namespace}_{pod.metadata.name}_{self.uid}"
        self.ip: str | None = None
        self.start_time: str | None = None
        self.volumes_ready = False
        self.volume_error = ""
        self.next_volume_sync = 0.0
        self.claim_paths: dict[str, Path] = {}
        """Folder of each persistentVolumeClaim volume, resolved once: a bound claim keeps its volume."""
        self.init = [ContainerRun(c, True) for c in pod.spec.init_containers or []]
        self.containers = [ContainerRun(c, False) for c in pod.spec.containers]
        self.conditions: dict[str, Condition] = {}
        self.last_status: dict | None = None
        self.failed_reason: str | None = None

    # -- inputs from the watch -----------------------------------------------------------

    def update(self, pod: Any) -> None:
        with self._lock:
            self._pod = pod
        self._wake.set()

    def gone(self) -> None:
        """The Pod object was removed from the API (force deletion): stop at once."""
        self._force_gone = True
        self._wake.set()

    @property
    def pod(self) -> Any:
        with self._lock:
            return self._pod

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.ip = self.podlet.ips.allocate(self.uid)
            self.dir.mkdir(parents=True, exist_ok=True)
            self.dir.chmod(0o700)
            self.start_time = now_iso()
            while not self.podlet.stopping.is_set():
                if self._force_gone:
                    self.kill_all(grace=0)
                    break
                pod = self.pod
                if pod.metadata.deletion_timestamp is not None:
                    self.terminate(pod)
                    break
                try:
                    self.sync(pod)
                except ApiException as e:
                    log.warning("%s: API error %s: %s", self.name, e.status, e.reason)
                except Exception:
                    log.exception("%s: sync failed", self.name)
                self._wake.wait(TICK)
                self._wake.clear()
            else:
                self.kill_all(grace=2)
        finally:
            self.cleanup()
            self.done.set()

    def sync(self, pod: Any) -> None:
        now = time.monotonic()
        if now >= self.next_volume_sync:
            self.sync_volumes(pod)
            self.next_volume_sync = now + self.podlet.volume_resync_seconds
        if self.volumes_ready and self.failed_reason is None and self.run_init_containers(pod):
            for run in self.containers:
                self.sync_container(pod, run)
        self.push_status(pod)

    # -- volumes ----------------------------------------------------------------------------

    def source_context(self, pod: Any) -> SourceContext:
        return SourceContext(
            namespace=pod.metadata.namespace,
            pod=self.pod_with_ip(pod),
            get_configmap=self.podlet.get_configmap,
            get_secret=self.podlet.get_secret,
            request_token=self.podlet.request_token,
            field_value=field_value,
            get_claim=self.podlet.get_claim,
            get_volume=self.podlet.get_volume,
        )

    def pod_with_ip(self, pod: Any) -> Any:
        if pod.status is None:
            pod.status = client.V1PodStatus()
        pod.status.pod_ip = self.ip
        pod.status.pod_ips = [client.V1PodIP(ip=self.ip)]
        pod.status.host_ip = self.podlet.host_ip
        return pod

    def volume_path(self, name: str) -> Path:
        return self.dir / "volumes" / name

    def sync_volumes(self, pod: Any) -> None:
        ctx = self.source_context(pod)
        errors = []
        for volume in pod.spec.volumes or []:
            kind = unsupported(volume)
            if kind:
                errors.append(f"volume {volume.name}: type {kind} is not supported by the podlet")
                continue
            path = self.volume_path(volume.name)
            if volume.empty_dir is not None:
                if not path.exists():
                    path.mkdir(parents=True)
                    path.chmod(0o777)
                continue
            if volume.host_path is not None or volume.name in self.claim_paths:
                continue
            if volume.persistent_volume_claim is not None:
                try:
                    self.claim_paths[volume.name] = claim_path(ctx, volume.persistent_volume_claim.claim_name)
                except VolumeNotReady as e:
                    errors.append(f"volume {volume.name}: {e}")
                continue
            try:
                files = volume_files(ctx, volume, self.podlet.tokens)
            except VolumeNotReady as e:
                if path.exists():
                    continue  # keep what was mounted (a deleted Secret stays in a running pod)
                errors.append(f"volume {volume.name}: {e}")
                continue
            if files is not None:
                write_atomic(path, *files)
        if errors:
            message = "; ".join(errors)
            if message != self.volume_error:
                self.podlet.event(pod, "Warning", "FailedMount", message)
            self.volume_error = message
        else:
            self.volume_error = ""
            self.volumes_ready = True  # once mounted, later source errors keep the last content

    def volume_source(self, volume: Any) -> Path:
        """Where a volume's content is on this machine."""
        if volume.host_path is not None:
            return Path(volume.host_path.path)
        if volume.persistent_volume_claim is not None:
            return self.claim_paths[volume.name]  # resolved by sync_volumes before any start
        return self.volume_path(volume.name)

    def mounts(self, pod: Any, container: Any) -> list[dict]:
        by_name = {v.name: v for v in pod.spec.volumes or []}
        out = []
        for vm in container.volume_mounts or []:
            volume = by_name.get(vm.name)
            if volume is None:
                raise EnvError(f"volumeMount {vm.name}: no such volume")
            source = self.volume_source(volume)
            claim = volume.persistent_volume_claim
            read_only = bool(vm.read_only or (claim is not None and claim.read_only))
            if vm.sub_path:
                source = (source / vm.sub_path).resolve()  # like the kubelet: fixed at start
            out.append(
                {
                    "source": str(source),
                    "target": vm.mount_path,
                    "readOnly": read_only,
                    "file": source.is_file(),
                }
            )
        return sorted(out, key=lambda m: m["target"].count("/"))

    # -- containers -------------------------------------------------------------------------

    def base_env(self, pod: Any) -> dict[str, str]:
        env = dict(self.podlet.base_env)
        env["HOSTNAME"] = pod.metadata.name
        return env

    def start_container(self, pod: Any, run: ContainerRun) -> None:
        c = run.spec
        pod = self.pod_with_ip(pod)
        try:
            env = container_env(pod, c, self.base_env(pod), self.podlet.get_configmap, self.podlet.get_secret)
            argv = [expand(a, env) for a in (c.command or []) + (c.args or [])]
            if not c.command:
                raise EnvError(
                    f"container {c.name} has no command: the podlet runs host commands and ignores the image "
                    f"({c.image}); set `command`"
                )
            if shutil.which(argv[0], path=env.get("PATH")) is None and not os.path.isabs(argv[0]):
                raise EnvError(
                    f"container {c.name}: command {argv[0]!r} not found on this machine (PATH={env.get('PATH')})"
                )
            mounts = self.mounts(pod, c)
        except (EnvError, ApiException) as e:
            reason = "CreateContainerConfigError"
            message = str(e) if isinstance(e, EnvError) else f"API error {e.status}: {e.reason}"
            if run.waiting != (reason, message):
                self.podlet.event(pod, "Warning", "Failed", f"Error: {message}")
            run.waiting = (reason, message)
            run.next_start = time.monotonic() + 2
            return
        spec_dir = self.dir / "launch"
        spec_dir.mkdir(exist_ok=True)
        spec_path = spec_dir / f"{c.name}-{run.restart_count}.json"
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # env may hold secrets
        with os.fdopen(fd, "w") as f:
            json.dump({"mounts": mounts, "workingDir": c.working_dir, "argv": argv, "env": env}, f)
        log_path = self.log_dir / c.name / f"{run.restart_count}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()  # there (empty) from the start, for `kubectl logs`
        # Output goes through a pipe, so that each line's time is kept (logfile.py).
        read_end, write_end = os.pipe()
        try:
            run.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    "-S",
                    "-E",
                    launch.__file__,
                    str(spec_path),
                ],
                stdout=write_end,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the container holds it now; EOF when it (and its children) end
        run.log_copier = LogCopier(read_end, log_path, f"{pod.metadata.name}/{c.name}")
        run.log_copier.start()
        run.started_at = now_iso()
        run.started_mono = time.monotonic()
        run.terminated = None
        run.waiting = ("", "")
        run.killing = None
        run.startup = ProbeState(c.startup_probe) if c.startup_probe else None
        run.readiness = ProbeState(c.readiness_probe) if c.readiness_probe else None
        run.liveness = ProbeState(c.liveness_probe) if c.liveness_probe else None
        self.podlet.event(pod, "Normal", "Started", f"Started container {c.name} (pid {run.proc.pid})")

    def reap(self, pod: Any, run: ContainerRun) -> int | None:
        """If the process exited, record it; returns its exit code."""
        if run.proc is None or run.proc.poll() is None:
            return None
        code = run.proc.returncode
        if code < 0:  # killed by a signal: report it the way container runtimes do
            code = 128 - code
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)  # leftovers of the container's process group
        except (ProcessLookupError, PermissionError):
            pass
        run.terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": run.started_at,
            "finishedAt": now_iso(),
            "containerID": f"podlet://{run.proc.pid}",
        }
        run.proc = None
        run.readiness = run.liveness = run.startup = None
        return code

    def should_restart(self, pod: Any, code: int) -> bool:
        policy = pod.spec.restart_policy or "Always"
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def schedule_restart(self, pod: Any, run: ContainerRun) -> None:
        if time.monotonic() - run.started_mono > BACKOFF_RESET_AFTER:
            run.backoff = BACKOFF_INITIAL
        run.last_state = run.terminated
        run.restart_count += 1
        run.next_start = time.monotonic() + run.backoff
        run.waiting = ("CrashLoopBackOff", f"back-off {run.backoff:.0f}s restarting failed container={run.spec.name}")
        if run.backoff > BACKOFF_INITIAL:
            self.podlet.event(pod, "Warning", "BackOff", run.waiting[1])
        run.backoff = min(run.backoff * 2, BACKOFF_MAX)
        run.terminated = None

    def run_init_containers(self, pod: Any) -> bool:
        """Run init containers in order; True once all have succeeded."""
        for run in self.init:
            if run.succeeded:
                continue
            code = self.reap(pod, run)
            if code == 0:
                run.succeeded = True
                continue
            if code is not None:
                if (pod.spec.restart_policy or "Always") == "Never":
                    self.failed_reason = f"init container {run.spec.name} failed with exit code {code}"
                    return False
                self.schedule_restart(pod, run)
            if not run.running and time.monotonic() >= run.next_start:
                self.start_container(pod, run)
            return False
        return True

    def sync_container(self, pod: Any, run: ContainerRun) -> None:
        code = self.reap(pod, run)
        if code is not None:
            if self.should_restart(pod, code):
                self.schedule_restart(pod, run)
            else:
                run.next_start = float("inf")
        if not run.running and run.terminated is None and time.monotonic() >= run.next_start:
            self.start_container(pod, run)
        if run.running:
            self.probe(pod, run)

    def probe(self, pod: Any, run: ContainerRun) -> None:
        now = time.monotonic()
        env = {"PATH": self.podlet.base_env.get("PATH", "")}
        c = run.spec
        if run.startup is not None and run.startup.result is not True:
            if run.startup.due(now):
                ok, msg = run_probe(c.startup_probe, c, self.ip, env)
                if run.startup.record(ok, msg, now) is False:
                    self.podlet.event(pod, "Warning", "Unhealthy", f"Startup probe failed: {msg}")
                    self.kill(pod, run, "startup probe failed")
            return
        if run.readiness is not None and run.readiness.due(now):
            before = run.readiness.result
            ok, msg = run_probe(c.readiness_probe, c, self.ip, env)
            after = run.readiness.record(ok, msg, now)
            if not ok and before is not False and after is False:
                self.podlet.event(pod, "Warning", "Unhealthy", f"Readiness probe failed: {msg}")
        if run.liveness is not None and run.liveness.due(now):
            ok, msg = run_probe(c.liveness_probe, c, self.ip, env)
            if run.liveness.record(ok, msg, now) is False:
                self.podlet.event(pod, "Warning", "Unhealthy", f"Liveness probe failed: {msg}")
                self.kill(pod, run, "liveness probe failed")

    def grace_seconds(self, pod: Any) -> int:
        if pod.metadata.deletion_grace_period_seconds is not None:
            return pod.metadata.deletion_grace_period_seconds
        g = pod.spec.termination_grace_period_seconds
        return 30 if g is None else g

    def kill(self, pod: Any, run: ContainerRun, why: str) -> None:
        """Stop one container (probe failure): SIGTERM, grace period, SIGKILL."""
        if not run.running:
            return
        run.killing = why
        self.podlet.event(pod, "Normal", "Killing", f"Stopping container {run.spec.name}: {why}")
        self.stop_processes([run], self.grace_seconds(pod))

    def kill_all(self, grace: float) -> None:
        self.stop_processes([r for r in self.init + self.containers if r.running], grace)

    @staticmethod
    def stop_processes(runs: list[ContainerRun], grace: float) -> None:
        """SIGTERM each main process (as a container runtime signals PID 1), wait up to
        `grace` seconds, then SIGKILL whatever is left of each container's process group."""
        for r in runs:
            try:
                r.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(r.running for r in runs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for r in runs:
            if r.proc is not None:
                try:
                    os.killpg(r.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                r.proc.wait(5)

    def terminate(self, pod: Any) -> None:
        """Graceful deletion: SIGTERM, grace period, SIGKILL, final status, remove the Pod."""
        grace = self.grace_seconds(pod)
        running = [r for r in self.init + self.containers if r.running]
        if running:
            self.podlet.event(
                pod, "Normal", "Killing", f"Stopping containers {', '.join(r.spec.name for r in running)}"
            )
            for r in running:
                r.killing = "pod deleted"
        self.kill_all(grace)
        for r in self.init + self.containers:
            self.reap(pod, r)
            r.next_start = float("inf")
        try:
            self.push_status(pod)
        except ApiException:
            pass
        try:
            self.api.delete_namespaced_pod(
                pod.metadata.name,
                pod.metadata.namespace,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("%s: final delete failed: %s", self.name, e.reason)

    def cleanup(self) -> None:
        self.podlet.ips.release(self.uid)
        self.podlet.tokens.forget(self.uid)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- status -------------------------------------------------------------------------------

    def container_status(self, run: ContainerRun) -> dict:
        c = run.spec
        status: dict[str, Any] = {
            "name": c.name,
            "image": c.image or "",
            "imageID": "",
            "ready": run.ready,
            "started": run.started,
            "restartCount": run.restart_count,
        }
        if run.running:
            status["state"] = {"running": {"startedAt": run.started_at}}
            status["containerID"] = f"podlet://{run.proc.pid}"  # type: ignore[union-attr]
        elif run.terminated is not None:
            status["state"] = {"terminated": run.terminated}
            status["containerID"] = run.terminated["containerID"]
        else:
            reason, message = run.waiting
            status["state"] = {
                "waiting": {"reason": reason or "ContainerCreating", **({"message": message} if message else {})}
            }
        status["lastState"] = {"terminated": run.last_state} if run.last_state else {}
        return status

    def phase(self, pod: Any) -> str:
        if self.failed_reason:
            return "Failed"
        if not all(r.succeeded for r in self.init):
            return "Pending"
        if any(r.running for r in self.containers):
            return "Running"
        if all(r.terminated is not None for r in self.containers):
            return "Succeeded" if all(r.terminated["exitCode"] == 0 for r in self.containers) else "Failed"  # type: ignore[index]
        if any(r.restart_count > 0 for r in self.containers):
            return "Running"  # between restarts
        return "Pending"

    def set_condition(self, name: str, ok: bool, reason: str | None = None) -> None:
        status = "True" if ok else "False"
        cur = self.conditions.get(name)
        if cur is None or cur.status != status or cur.reason != reason:
            self.conditions[name] = Condition(status, reason=reason)

    def status(self, pod: Any) -> dict:
        ready_to_start = self.volumes_ready
        initialized = all(r.succeeded for r in self.init)
        containers_ready = initialized and all(r.ready for r in self.containers)
        current = {c.type: c.status for c in (pod.status.conditions or [])} if pod.status else {}
        gates_ok = all(current.get(g.condition_type) == "True" for g in pod.spec.readiness_gates or [])
        self.set_condition("PodReadyToStartContainers", ready_to_start)
        self.set_condition("Initialized", initialized, None if initialized else "ContainersNotInitialized")
        self.set_condition("ContainersReady", containers_ready, None if containers_ready else "ContainersNotReady")
        self.set_condition("Ready", containers_ready and gates_ok, None if containers_ready else "ContainersNotReady")
        conditions = []
        for name, cond in self.conditions.items():
            entry = {"type": name, "status": cond.status, "lastTransitionTime": cond.since, "lastProbeTime": None}
            if cond.reason:
                entry["reason"] = cond.reason
            conditions.append(entry)
        status: dict[str, Any] = {
            "phase": self.phase(pod),
            "conditions": conditions,
            "hostIP": self.podlet.host_ip,
            "hostIPs": [{"ip": self.podlet.host_ip}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [self.container_status(r) for r in self.containers],
        }
        if self.init:
            status["initContainerStatuses"] = [self.container_status(r) for r in self.init]
        if self.failed_reason:
            status["reason"], status["message"] = "Failed", self.failed_reason
        elif self.volume_error:
            status["message"] = self.volume_error
        return status

    def push_status(self, pod: Any) -> None:
        status = self.status(pod)
        if status == self.last_status:
            return
        self.api.patch_namespaced_pod_status(
            pod.metadata.name,
            pod.metadata.namespace,
            {"status": status},
            _content_type="application/strategic-merge-patch+json",
        )
        self.last_status = status
