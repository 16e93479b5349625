"""A small asyncio client for the Kubernetes API: server-side apply, get, delete, status.

Why not the `kubernetes` package for these calls: it is synchronous (a thread per call)
and turns every response into model objects, which at 1000 Agents is most of the
operator's CPU. Here bodies stay plain dicts and calls share one aiohttp session.
Credentials and TLS still come from the `kubernetes` package's loaders (in-cluster
service-account token, or KUBECONFIG), so authentication behaves exactly like kubectl.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

FIELD_MANAGER = "fleetward"
log = logging.getLogger("fleetward.operator.kube")


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status, `reason` the API's reason."""

    def __init__(self, status: int, reason: str, message: str, path: str):
        super().__init__(f"{status} {reason}: {message} ({path})")
        self.status, self.reason, self.message, self.path = status, reason, message, path

    @property
    def transient(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the API (the few kinds the operator manages)."""

    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace is not None:  # None: across all namespaces (lists)
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


KINDS: dict[str, Kind] = {
    "ServiceAccount": Kind("v1", "serviceaccounts"),
    "Secret": Kind("v1", "secrets"),
    "Pod": Kind("v1", "pods"),
    "ConfigMap": Kind("v1", "configmaps"),
    "Service": Kind("v1", "services"),
    "Namespace": Kind("v1", "namespaces", namespaced=False),
    "Event": Kind("v1", "events"),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "Deployment": Kind("apps/v1", "deployments"),
    "PodDisruptionBudget": Kind("policy/v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": Kind("autoscaling/v2", "horizontalpodautoscalers"),
    "Agent": Kind("fleetward.dev/v1alpha1", "agents"),
    "SOP": Kind("fleetward.dev/v1alpha1", "sops"),
    "Guardrail": Kind("fleetward.dev/v1alpha1", "guardrails"),
    "KillSwitch": Kind("fleetward.dev/v1alpha1", "killswitches", namespaced=False),
}


# Fields of a PersistentVolumeClaim's spec that are fixed once it exists (the size may only
# grow, and only where its StorageClass allows expansion).
CLAIM_FIXED_FIELDS = ("accessModes", "storageClassName", "resources", "volumeMode", "selector")


def with_live_claim_spec(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """The desired claim with the live claim's fixed spec fields: what an apply may still
    change on an existing claim (its labels and owner) without being refused for a size
    or class the settings changed since the claim was created."""
    live_spec = live.get("spec") or {}
    spec = {k: v for k, v in (desired.get("spec") or {}).items() if k not in CLAIM_FIXED_FIELDS}
    spec.update({k: live_spec[k] for k in CLAIM_FIXED_FIELDS if k in live_spec})
    return {**desired, "spec": spec}


def kind_of(obj: dict[str, Any]) -> Kind:
    kind = KINDS.get(obj["kind"])
    if kind is None or kind.api_version != obj["apiVersion"]:
        raise ValueError(f"the operator does not manage {obj['apiVersion']}/{obj['kind']}")
    return kind


TOO_MANY_REQUESTS_RETRIES = 10


def _retry_delay(retry_after: str | None, attempt: int) -> float:
    """Seconds before resending a refused request: the server's Retry-After (whole seconds,
    capped at 10), else a short backoff; jittered so that refused callers do not return
    together."""
    try:
        base = min(10.0, max(0.1, float(retry_after))) if retry_after else 0.2 * 2 ** min(attempt, 5)
    except ValueError:
        base = 1.0
    return base * random.uniform(1.0, 1.5)


class Kube:
    """Async API client. Create with `await Kube.connect()`; close with `await kube.close()`."""

    def __init__(self, configuration: k8s_client.Configuration, concurrency: int = 32):
        self._cfg = configuration
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(concurrency)
        self._token_read_at = 0.0

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, concurrency: int = 32) -> Kube:
        cfg = k8s_client.Configuration()
        try:
            if kubeconfig:
                k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
            else:
                k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=cfg)
        kube = cls(cfg, concurrency)
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        if cfg.cert_file and cfg.key_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        if not cfg.verify_ssl:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        kube._session = aiohttp.ClientSession(
            base_url=cfg.host.rstrip("/") + "/",
            connector=aiohttp.TCPConnector(ssl=ctx, limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return kube

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    def _auth_header(self) -> dict[str, str]:
        # The in-cluster loader refreshes the projected token through this hook.
        if self._cfg.refresh_api_key_hook and time.monotonic() - self._token_read_at > 60:
            self._cfg.refresh_api_key_hook(self._cfg)
            self._token_read_at = time.monotonic()
        token = self._cfg.api_key.get("authorization") or self._cfg.api_key.get("BearerToken")
        if not token:
            return {}
        prefix = self._cfg.api_key_prefix.get("authorization", "")
        value = token if token.lower().startswith("bearer ") else f"{prefix or 'Bearer'} {token}"
        return {"Authorization": value}

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        assert self._session is not None, "Kube.connect() first"
        headers = {"Accept": "application/json", **self._auth_header()}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        for attempt in range(TOO_MANY_REQUESTS_RETRIES + 1):
            async with self._limit:
                try:
                    async with self._session.request(
                        method, path.lstrip("/"), data=data, params=params, headers=headers
                    ) as resp:
                        text = await resp.text()
                        if resp.status < 400:
                            return json.loads(text) if text else {}
                        try:
                            status = json.loads(text)
                            reason, message = status.get("reason", ""), status.get("message", text)
                        except ValueError:
                            reason, message = resp.reason or "", text[:500]
                        error = KubeError(resp.status, reason, message, path)
                        retry_after = resp.headers.get("Retry-After")
                except (TimeoutError, aiohttp.ClientError) as e:
                    raise KubeError(0, "Unreachable", f"the API server did not answer: {e!r}", path) from e
            if error.status != 429 or attempt == TOO_MANY_REQUESTS_RETRIES:
                raise error
            # 429: the API server refused the request before doing anything (its priority and
            # fairness queue was full, or its storage was initialising), so any verb may be
            # sent again; client-go does the same. Waiting outside the semaphore leaves the
            # slot to calls that may get through.
            delay = _retry_delay(retry_after, attempt)
            log.info("%s %s: 429 %s; retrying in %.1f s", method, path, error.message[:120], delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- verbs ------------------------------------------------------------------------

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", KINDS[kind].path(namespace, name))
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str | None = None, label_selector: str | None = None) -> list[dict]:
        params = {"labelSelector": label_selector} if label_selector else None
        return (await self.request("GET", KINDS[kind].path(namespace), params=params)).get("items", [])

    async def list_pages(
        self, kind: str, namespace: str | None = None, *, page_size: int = 100
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """A list in pages (limit/continue): a caller that keeps a little of each object
        never holds a thousand whole Agents (several MB of parsed JSON) at once."""
        params = {"limit": str(page_size)}
        while True:
            page = await self.request("GET", KINDS[kind].path(namespace), params=params)
            yield page.get("items", [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return
            params = {"limit": str(page_size), "continue": token}

    async def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply (field manager `fleetward`): the object's fields as we own them.

        A PersistentVolumeClaim whose fixed spec fields differ from the settings now (a
        new size or class) is refused by the API server (422, or 403 for a resize its class
        does not allow); it is applied again with its live spec, so that the reconcile goes
        on and the existing volume, with the state on it, is kept."""
        meta = obj["metadata"]
        path = kind_of(obj).path(meta.get("namespace"), meta["name"])
        params = {"fieldManager": FIELD_MANAGER, "force": "true" if force else "false"}
        try:
            return await self.request(
                "PATCH", path, body=obj, params=params, content_type="application/apply-patch+yaml"
            )
        except KubeError as e:
            if obj["kind"] == "Service" and e.status == 422 and "clusterIP" in e.message:
                # A Service's clusterIP cannot change in place (one made before the metrics
                # Service became headless): replace it; nothing depends on its old address.
                log.warning("%s: replacing the Service (%s)", path, e.message)
                await self.delete("Service", meta.get("namespace"), meta["name"])
                return await self.request(
                    "PATCH", path, body=obj, params=params, content_type="application/apply-patch+yaml"
                )
            if obj["kind"] != "PersistentVolumeClaim" or e.status not in (403, 422):
                raise
            live = await self.get("PersistentVolumeClaim", meta.get("namespace"), meta["name"])
            if live is None:
                raise
            log.warning("%s: keeping the claim's existing spec (%s)", path, e.message)
            body = with_live_claim_spec(obj, live)
            return await self.request(
                "PATCH", path, body=body, params=params, content_type="application/apply-patch+yaml"
            )

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self.request(
            "POST", kind_of(obj).path(meta.get("namespace")), body=obj, params={"fieldManager": FIELD_MANAGER}
        )

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT with the object's resourceVersion: fails with 409 when someone else wrote first."""
        meta = obj["metadata"]
        return await self.request(
            "PUT",
            kind_of(obj).path(meta.get("namespace"), meta["name"]),
            body=obj,
            params={"fieldManager": FIELD_MANAGER},
        )

    async def delete(self, kind: str, namespace: str | None, name: str, *, grace_seconds: int | None = None) -> bool:
        """Delete; False when it was gone already."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        try:
            await self.request("DELETE", KINDS[kind].path(namespace, name), body=options)
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise

    async def scale(self, kind: str, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        """Set spec.replicas alone (merge patch under its own field manager, so the next
        server-side apply of the whole object takes the field back)."""
        return await self.request(
            "PATCH",
            KINDS[kind].path(namespace, name),
            body={"spec": {"replicas": replicas}},
            params={"fieldManager": f"{FIELD_MANAGER}-killswitch"},
            content_type="application/merge-patch+json",
        )

    async def patch(self, kind: str, namespace: str | None, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Merge patch of the object (not its status)."""
        return await self.request(
            "PATCH",
            KINDS[kind].path(namespace, name),
            body=body,
            params={"fieldManager": FIELD_MANAGER},
            content_type="application/merge-patch+json",
        )

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: dict[str, Any]) -> dict:
        """Merge-patch the status subresource (lists inside are replaced whole)."""
        return await self.request(
            "PATCH",
            KINDS[kind].path(namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    # -- list and watch (the revoker thread's own views; Kopf watches everything else) ------

    async def list_with_version(
        self, kind: str, namespace: str | None = None, *, metadata_only: bool = False
    ) -> tuple[list[dict[str, Any]], str]:
        """The items and the list's resourceVersion, to watch from."""
        headers = {"Accept": _METADATA_LIST if metadata_only else "application/json", **self._auth_header()}
        assert self._session is not None, "Kube.connect() first"
        path = KINDS[kind].path(namespace)
        try:
            async with self._session.get(path.lstrip("/"), headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise KubeError(resp.status, resp.reason or "", text[:500], path)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise KubeError(0, "Unreachable", f"the API server did not answer: {e!r}", path) from e
        body = json.loads(text)
        return body.get("items") or [], body["metadata"]["resourceVersion"]

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        resource_version: str,
        *,
        metadata_only: bool = False,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events ({"type", "object"}) from `resource_version` until the server ends
        the watch. Raises KubeError(410) when the version is too old (list again).

        Read in chunks and split on newlines ourselves: a KillSwitch with the results of
        1000 agents in its status is one line of hundreds of KB, over aiohttp's line limit."""
        assert self._session is not None, "Kube.connect() first"
        path = KINDS[kind].path(namespace)
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        headers = {"Accept": _METADATA if metadata_only else "application/json", **self._auth_header()}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout_seconds + 30)
        try:
            async with self._session.get(path.lstrip("/"), params=params, headers=headers, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise KubeError(resp.status, resp.reason or "", (await resp.text())[:500], path)
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            st = event.get("object") or {}
                            code = int(st.get("code") or 500)
                            raise KubeError(code, st.get("reason", ""), st.get("message", ""), path)
                        yield event
        except (TimeoutError, aiohttp.ClientError) as e:
            raise KubeError(0, "Unreachable", f"the watch ended: {e!r}", path) from e


# Server-side reduction to metadata: a watch of 1000 Agents without their specs.
_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
_METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
