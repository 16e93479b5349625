"""Agent credentials: a per-agent Ed25519 signing key (private half in the agent's
credentials Secret, public half in the trust bundle), plus its Kafka SCRAM password.

The trust bundle is one ConfigMap (a JWKS of every active agent key) in the
installation namespace. Verifiers (tool services through `fleetward.toolkit`, the
gateway) WATCH it through the API server, so a key removed here is refused within a
watch event's latency — not after a mounted volume's sync period (SPEC §7).
Writes are batched: many Agents reconciled at once become one ConfigMap update.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleetward.operator.desired.agent import (
    KAFKA_PASSWORD,
    KAFKA_USERNAME,
    KEY_ID,
    SIGNING_KEY,
    AgentRef,
    credentials_secret_name,
    kafka_principal,
)
from fleetward.operator.kube import Kube, KubeError

log = logging.getLogger("fleetward.operator.credentials")
JWKS_KEY = "jwks.json"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_key_id(namespace: str, agent: str) -> str:
    """A key id that is never reused: the agent plus 64 random bits. A revoked key's id
    therefore never comes back (SPEC §7: fresh credentials on release)."""
    return f"{namespace}.{agent}.{secrets.token_hex(8)}"


def public_jwk(private_pem: bytes, kid: str, agent: str) -> dict[str, Any]:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an Ed25519 key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": kid, "alg": "EdDSA", "use": "sig", "agent": agent}


@dataclass(frozen=True)
class AgentCredentials:
    key_id: str
    jwk: dict[str, Any]
    kafka_username: str
    kafka_password: str


def _decode(secret: dict[str, Any], key: str) -> bytes | None:
    value = (secret.get("data") or {}).get(key)
    return base64.b64decode(value) if value else None


def _parse(secret: dict[str, Any], ref: AgentRef) -> AgentCredentials | None:
    pem, kid = _decode(secret, SIGNING_KEY), _decode(secret, KEY_ID)
    user, password = _decode(secret, KAFKA_USERNAME), _decode(secret, KAFKA_PASSWORD)
    if not (pem and kid and user and password):
        return None
    try:
        jwk = public_jwk(pem, kid.decode(), f"{ref.namespace}/{ref.name}")
    except ValueError:
        return None
    return AgentCredentials(kid.decode(), jwk, user.decode(), password.decode())


def _new_secret(ref: AgentRef) -> dict[str, Any]:
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    values = {
        SIGNING_KEY: pem,
        KEY_ID: new_key_id(ref.namespace, ref.name).encode(),
        KAFKA_USERNAME: kafka_principal(ref.namespace, ref.name).encode(),
        KAFKA_PASSWORD: secrets.token_urlsafe(24).encode(),
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": ref.metadata(credentials_secret_name(ref.name), "credentials"),
        "data": {k: base64.b64encode(v).decode() for k, v in values.items()},
    }


async def ensure_credentials(kube: Kube, ref: AgentRef, *, probably_new: bool = False) -> AgentCredentials:
    """The agent's credentials, created once. The Secret is the record: reconciling again
    reuses it; a Secret that is missing or unusable is replaced by a fresh key.

    `probably_new` (an Agent never reconciled): create first and read only on a conflict,
    one API call instead of two for each of a thousand Agents applied at once."""
    name = credentials_secret_name(ref.name)
    if probably_new:
        try:
            created = await kube.create(_new_secret(ref))
            parsed = _parse(created, ref)
            assert parsed is not None
            return parsed
        except KubeError as e:
            if e.status != 409:
                raise
    for _ in range(3):
        secret = await kube.get("Secret", ref.namespace, name)
        if secret is not None:
            meta = secret["metadata"]
            owned = any(o.get("uid") == ref.uid for o in meta.get("ownerReferences") or [])
            parsed = _parse(secret, ref) if owned and not meta.get("deletionTimestamp") else None
            if parsed is not None:
                return parsed
            # Unusable, or left by a deleted Agent of the same name: that key was revoked
            # with its Agent and is never trusted again.
            log.warning("credentials Secret %s/%s is not this Agent's; issuing a new key", ref.namespace, name)
            await kube.delete("Secret", ref.namespace, name)
        try:
            created = await kube.create(_new_secret(ref))
        except KubeError as e:
            if e.status == 409:  # a concurrent reconcile created it: read that one
                continue
            raise
        parsed = _parse(created, ref)
        assert parsed is not None
        return parsed
    raise KubeError(409, "Conflict", f"credentials Secret {ref.namespace}/{name} keeps changing", name)


async def revoke_credentials(kube: Kube, ref: AgentRef) -> bool:
    """Delete the credentials Secret (the trust-bundle entry is removed separately)."""
    return await kube.delete("Secret", ref.namespace, credentials_secret_name(ref.name))


class KeyBlocked(KubeError):
    """A publish refused because a kill switch covers the agent (the reconcile that asked
    started before the switch engaged, or before it was released: it is retried, and then
    knows which is the case)."""

    def __init__(self, agent: str):
        super().__init__(409, "Blocked", f"agent {agent} is covered by an engaged kill switch", agent)


class TrustBundle:
    """The JWKS ConfigMap, written by one task that batches concurrent changes.

    `publish(agent, jwk)` / `withdraw(agent)` return once the change is in the API server.
    The bundle holds at most one key per agent: publishing a new key replaces the old one.
    A publish for a blocked agent is not written and raises KeyBlocked.
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        *,
        batch_window: float = 0.02,
        busy_window: float = 0.3,
        switch_blocked: Callable[[str], bool] = lambda agent: False,
    ):
        self.kube, self.namespace, self.name = kube, namespace, name
        self.batch_window, self.busy_window = batch_window, busy_window
        self._written_at = 0.0
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._waiters: list[tuple[str | None, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.keys: dict[str, dict[str, Any]] = {}
        """Last written bundle: agent -> jwk."""
        self.blocked: set[str] = set()
        """Agents the Kopf handlers know a kill switch covers: a publish for them is dropped
        by the writer, so a reconcile that started before the switch engaged cannot put a
        key back."""
        self.switch_blocked = switch_blocked
        """The same from the revoker's own watches (it may know sooner, or later, than Kopf):
        an agent is blocked while either says so."""
        self._last: dict[str, Any] | None = None
        """The ConfigMap as our last write (or read) returned it."""
        self._first_pending = 0.0
        self.last_write: dict[str, Any] = {}
        """Where the last write's time went (queued, read, write), for the revoker's log."""

    def is_blocked(self, agent: str) -> bool:
        return agent in self.blocked or self.switch_blocked(agent)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="trust-bundle-writer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def publish(self, agent: str, jwk: dict[str, Any]) -> None:
        # No shortcut from what this process last wrote: the ConfigMap may have been edited,
        # deleted or changed by another replica since; _write reads it and skips no-ops.
        await self._change(agent, jwk)

    async def withdraw(self, agent: str) -> None:
        await self._change(agent, None)

    def block(self, agent: str) -> None:
        self.blocked.add(agent)

    def unblock(self, agent: str) -> None:
        self.blocked.discard(agent)

    async def revoke(self, agents: list[str]) -> None:
        """Block and withdraw many agents in one write (the kill switch's fast path)."""
        self.blocked.update(agents)
        await self.withdraw_many(agents)

    async def withdraw_many(self, agents: list[str]) -> None:
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._first_pending = self._first_pending or time.monotonic()
        for agent in agents:
            self._pending[agent] = None
        self._waiters.append((None, fut))
        self._wake.set()
        self._urgent.set()
        await fut

    async def prune(self, keep: set[str]) -> list[str]:
        """Withdraw every agent not in `keep` (Agents deleted while the operator was down)."""
        await self.load()
        gone = [a for a in self.keys if a not in keep]
        for agent in gone:
            await self.withdraw(agent)
        return gone

    async def _change(self, agent: str, jwk: dict[str, Any] | None) -> None:
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._first_pending = self._first_pending or time.monotonic()
        self._pending[agent] = jwk
        self._waiters.append((agent if jwk is not None else None, fut))
        self._wake.set()
        if jwk is None:
            self._urgent.set()
        await fut

    async def load(self) -> dict[str, dict[str, Any]]:
        cm = await self.kube.get("ConfigMap", self.namespace, self.name)
        self.keys = self._keys_of(cm)
        return self.keys

    @staticmethod
    def _keys_of(cm: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        if not cm:
            return {}
        try:
            jwks = json.loads((cm.get("data") or {}).get(JWKS_KEY) or "{}")
        except ValueError:
            log.error("trust bundle %s is not JSON; rewriting it from the Agents' credentials", JWKS_KEY)
            return {}
        return {k["agent"]: k for k in jwks.get("keys", []) if isinstance(k, dict) and "agent" in k}

    def _window(self) -> float:
        """How long a change waits for others to join its write. Alone (nothing written in
        the last second), the short window: a single publish or a kill switch's withdrawal
        goes out at once. During a burst of publishes (1000 Agents applied at once) the
        longer one, so the ~250 KB bundle is rewritten a few times a second rather than for
        every few keys; withdrawals never wait for it."""
        busy = time.monotonic() - self._written_at < 1.0
        only_publishes = all(jwk is not None for jwk in self._pending.values())
        return self.busy_window if busy and only_publishes else self.batch_window

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            window = self._window()
            if window > self.batch_window:  # a withdrawal arriving meanwhile ends the wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), window)
            await asyncio.sleep(self.batch_window)  # let concurrent reconciles join this write
            self._urgent.clear()
            self._wake.clear()
            pending, waiters = self._pending, self._waiters
            self._pending, self._waiters = {}, []
            first, self._first_pending = self._first_pending, 0.0
            # Where a write's time goes (the revoker logs it): queued behind the batch window
            # and the previous write, reading, writing.
            self.last_write = {"queued_s": round(time.monotonic() - first, 3) if first else 0.0}
            try:
                refused = await self._write(pending)
                self._written_at = time.monotonic()
            except Exception as e:  # every waiter sees the failure and retries its reconcile
                for _, fut in waiters:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for agent, fut in waiters:
                if fut.done():
                    continue
                if agent is not None and agent in refused:
                    fut.set_exception(KeyBlocked(agent))
                else:
                    fut.set_result(None)

    def _body(self, keys: dict[str, dict[str, Any]], base: dict[str, Any] | None) -> dict[str, Any]:
        jwks = {"keys": sorted(keys.values(), key=lambda k: k["kid"])}
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {
                "app.kubernetes.io/part-of": "fleetward",
                "app.kubernetes.io/managed-by": "fleetward",
                "app.kubernetes.io/component": "trust-bundle",
            },
        }
        if base is not None:
            meta["resourceVersion"] = base["metadata"]["resourceVersion"]
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {JWKS_KEY: json.dumps(jwks, sort_keys=True, separators=(",", ":"))},
        }

    async def _write(self, pending: dict[str, dict[str, Any] | None]) -> set[str]:
        """Returns the agents whose publish was refused (blocked)."""
        # Read-modify-write with the resourceVersion, retried on conflict: the ConfigMap is
        # shared state, and a blind apply could drop a key another writer just added. The
        # read starts from the object our last write returned (a round trip and a parse of
        # ~250 KB fewer at 1000 agents, on the revocation path too); the PUT's
        # resourceVersion proves it current, and a 409 reads it afresh. A change that looks
        # like a no-op against that copy is confirmed with a fresh read before it is skipped.
        cm, fresh = self._last, False
        t0 = time.monotonic()
        for attempt in range(10):
            if cm is None or attempt > 0:
                cm, fresh = await self.kube.get("ConfigMap", self.namespace, self.name), True
            keys = self._keys_of(cm)
            refused: set[str] = set()
            for agent, jwk in pending.items():
                if jwk is None or self.is_blocked(agent):
                    keys.pop(agent, None)
                    if jwk is not None:
                        refused.add(agent)
                else:
                    keys[agent] = jwk
            if cm is not None and keys == self._keys_of(cm):
                if not fresh:
                    cm, fresh = await self.kube.get("ConfigMap", self.namespace, self.name), True
                    if cm is None or keys != self._keys_of(cm):
                        cm = None  # it changed: start over from this fresh read
                        continue
                self._last, self.keys = cm, keys
                return refused
            try:
                body = self._body(keys, cm)
                t1 = time.monotonic()
                written = await (self.kube.replace(body) if cm is not None else self.kube.create(body))
                self._last, self.keys = written, keys
                self.last_write.update(
                    read_s=round(t1 - t0, 3), write_s=round(time.monotonic() - t1, 3), attempts=attempt + 1
                )
                return refused
            except KubeError as e:
                self._last = None
                if e.status != 409:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise KubeError(409, "Conflict", "the trust bundle kept changing under the writer", self.name)
