"""Where a TrustBundle gets its keys: the trust-bundle ConfigMap watched through the
Kubernetes API (production), or a local file watched by mtime (tests, non-Kubernetes).
The KillSwitches, watched beside it, are in fleetward.toolkit.killswitches.

Why a watch and not the ConfigMap mounted as a volume: the kubelet refreshes mounted
ConfigMaps only every sync period plus cache TTL (a minute or more), far outside the
1-second revocation target; a watch delivers the change in milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetward.toolkit.bundle import TrustBundle

log = logging.getLogger("fleetward.toolkit.sources")

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class SourceConfigError(RuntimeError):
    """The source cannot even be set up (e.g. no Kubernetes configuration at all)."""


def kube_api_client() -> Any:
    """In-cluster configuration when running in a pod, KUBECONFIG (or ~/.kube/config) otherwise."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_TOKEN.exists():
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(client_configuration=cfg)
    except config.ConfigException as e:
        raise SourceConfigError(
            f"no Kubernetes API configuration for the trust-bundle watch ({e}); run in a pod, "
            "set KUBECONFIG, or use a file trust bundle outside Kubernetes"
        ) from e
    return client.ApiClient(cfg)


class Backoff:
    """Exponential backoff with jitter for reconnects (0.2 s doubling to 5 s)."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first, self.cap, self.current = first, cap, first

    def reset(self) -> None:
        self.current = self.first

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.cap, self.current * 2)
        return delay


class FileSource:
    """A JWKS file, checked every `poll_interval` seconds (100 ms by default), for tests
    and setups without Kubernetes; production uses ConfigMapSource.

    Change detection uses (inode, size, mtime, ctime), so writers should replace the file
    atomically (write a temporary file, then rename it over the old one). A missing file
    means no trusted keys; an unreadable directory counts as the source being down.
    """

    def __init__(self, path: Path, poll_interval: float = 0.1) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.description = f"file {path}"
        self._bundle: TrustBundle | None = None
        self._last: tuple[int, ...] | None = None
        self._last_valid = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, bundle: TrustBundle) -> None:
        self._bundle = bundle
        self._stopping.clear()
        self._check()  # loaded before start() returns: a file is always at hand
        self._thread = threading.Thread(target=self._run, name="trust-bundle-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_interval):
            try:
                self._check()
            except Exception:  # never let the watcher die: a dead watcher would freeze the keys
                log.exception("trust bundle file check failed")

    def _check(self) -> None:
        assert self._bundle is not None
        try:
            st = os.stat(self.path)
            signature: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            signature = ()
        except OSError as e:
            self._bundle.source_down(f"{self.path}: {e.strerror}")
            return
        # An invalid document is re-read every poll: a writer that is not atomic may
        # still be finishing within the same timestamp tick.
        if signature == self._last and self._last_valid:
            self._bundle.source_up()
            return
        if not signature:
            self._last, self._last_valid = signature, self._bundle.load(None)
        else:
            try:
                text = self.path.read_bytes()
            except FileNotFoundError:
                self._last, self._last_valid = (), self._bundle.load(None)
            except OSError as e:
                self._bundle.source_down(f"{self.path}: {e.strerror}")
                return
            else:
                self._last, self._last_valid = signature, self._bundle.load(text)
        self._bundle.source_up()


class KubeWatchSource:
    """One kind of object listed, then watched through the Kubernetes API, on a thread.

    The watch resumes from the last resourceVersion when the server ends it (every
    `watch_timeout` seconds); on 410 Gone it re-lists; on any error it reports the source
    down, backs off (0.2 s doubling to 5 s) and re-lists. Subclasses say what to list and
    what a listing or an event means; this class owns the loop."""

    description = "kubernetes watch"
    thread_name = "kube-watch"

    def __init__(self, *, api_client: Any = None, watch_timeout: int = 60) -> None:
        self.watch_timeout = watch_timeout
        self._api_client = api_client
        self._bundle: TrustBundle | None = None
        self._stopping = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None

    # -- for subclasses -------------------------------------------------------------------

    def _connect(self, api_client: Any) -> None:
        """Make the API object `_list_call` uses."""

    def _list_call(self, **kwargs: Any) -> Any:
        """The list function of the API (also what watch.Watch().stream calls)."""
        raise NotImplementedError

    def _listed(self, items: list[dict[str, Any]]) -> None:
        """A full listing: the source's state is exactly these items."""

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        """ADDED, MODIFIED or DELETED."""

    def _up(self) -> None: ...

    def _down(self, error: str) -> None: ...

    # -- the loop -------------------------------------------------------------------------

    def start(self, bundle: TrustBundle) -> None:
        self._bundle = bundle
        self._connect(self._api_client or kube_api_client())
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        thread, deadline = self._thread, time.monotonic() + 10
        # Repeated: a watch that is just being opened resets its own stop flag.
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            watch = self._watch
            if watch is not None:
                watch.stop()  # shuts the socket down, so the blocked read returns now
            thread.join(timeout=0.1)
        self._thread = None

    def _list(self) -> str:
        """Current state; returns the resourceVersion to watch from."""
        resp = self._list_call(_preload_content=False, _request_timeout=(5, 15))
        body = json.loads(resp.data)
        self._listed(body.get("items") or [])
        return body["metadata"]["resourceVersion"]

    def _watch_from(self, resource_version: str) -> str:
        """One watch request; returns the resourceVersion to resume from when the server ends it."""
        from kubernetes import watch

        self._watch = w = watch.Watch()
        if self._stopping.is_set():
            return resource_version
        try:
            for event in w.stream(
                self._list_call,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout,
                _request_timeout=(5, self.watch_timeout + 10),
            ):
                kind, obj = event["type"], event["raw_object"]
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._event(kind, obj)
                resource_version = obj.get("metadata", {}).get("resourceVersion") or resource_version
        finally:
            self._watch = None
        return resource_version

    def _run(self) -> None:
        from kubernetes.client.rest import ApiException

        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                resource_version = self._list()
                self._up()
                backoff.reset()
                while not self._stopping.is_set():
                    resource_version = self._watch_from(resource_version)
            except ApiException as e:
                if self._stopping.is_set():
                    break
                if e.status == 410:  # our resourceVersion is too old: re-list, no backoff needed
                    log.info("%s: watch expired (410); re-listing", self.description)
                    continue
                self._failed(f"API error {e.status} {e.reason}{self._hint(e.status)}", backoff)
            except Exception as e:  # any failure: report the source down and retry; never die
                if self._stopping.is_set():
                    break
                self._failed(f"{type(e).__name__}: {e}", backoff)

    def _hint(self, status: int | None) -> str:
        return ""

    def _failed(self, error: str, backoff: Backoff) -> None:
        self._down(error)
        delay = backoff.next()
        log.warning("%s: list/watch failed (%s); retrying in %.1f s", self.description, error, delay)
        self._stopping.wait(delay)


class ConfigMapSource(KubeWatchSource):
    """The trust-bundle ConfigMap, listed then watched through the Kubernetes API.

    RBAC needed: get/list/watch on this one ConfigMap (a Role with resourceNames works:
    the field selector names it).
    """

    thread_name = "trust-bundle-watch"

    def __init__(self, namespace: str, name: str, *, key: str, api_client: Any = None, watch_timeout: int = 60) -> None:
        super().__init__(api_client=api_client, watch_timeout=watch_timeout)
        self.namespace, self.name, self.key = namespace, name, key
        self.description = f"configmap {namespace}/{name} key {key}"

    def _connect(self, api_client: Any) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)

    def _list_call(self, **kwargs: Any) -> Any:
        return self._core.list_namespaced_config_map(
            self.namespace, field_selector=f"metadata.name={self.name}", **kwargs
        )

    def _listed(self, items: list[dict[str, Any]]) -> None:
        self._apply(items[0] if items else None)

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self._apply(None if kind == "DELETED" else obj)

    def _up(self) -> None:
        assert self._bundle is not None
        self._bundle.source_up()

    def _down(self, error: str) -> None:
        assert self._bundle is not None
        self._bundle.source_down(error)

    def _apply(self, obj: dict[str, Any] | None) -> None:
        assert self._bundle is not None
        if obj is None:
            log.warning("trust bundle ConfigMap %s/%s is gone: no key is trusted", self.namespace, self.name)
            self._bundle.load(None)
            return
        document = (obj.get("data") or {}).get(self.key)
        if document is None:
            log.warning(
                "trust bundle ConfigMap %s/%s has no key %r: no key is trusted", self.namespace, self.name, self.key
            )
        self._bundle.load(document)
