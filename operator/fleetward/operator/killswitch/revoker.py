"""The kill switch's revocation path, on a thread and event loop of its own (SPEC §7:
a covered agent's tokens refused within 1 s of the engage being accepted).

Why a thread: the rest of the operator shares Kopf's one event loop, and after a release
of 1000 Agents that loop works through 1000 reconciles for seconds; an engage arriving
then waited behind them (docs/bench/killswitch.md: 1.1 s from the webhook's stamp to the
keys withdrawn). On this thread, with its own API connections:

- the trust-bundle writer: every publish and withdraw of the operator goes through it;
- its own watches of KillSwitches and of the Agents' metadata (names and labels only): an
  engaged switch withdraws the keys of the Agents it covers as soon as the watch delivers
  it, before Kopf's handler has started. The handler then does the rest (Kafka, halt,
  drain, status); its own revoke finds the keys gone;
- the admission webhook (killswitch/admission.py), so that admitting an engage does not
  wait for the busy loop either.

While this thread's view says a switch covers an agent, no key is published for it (the
writer refuses, and the reconcile that asked retries), whatever Kopf's view says: the two
views are fed by different watches and may disagree for a moment, and a key must never
come back in that moment.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from fleetward.operator.credentials import TrustBundle
from fleetward.operator.killswitch.scope import ENGAGED_AT, affected, agent_id, involves, is_engaged
from fleetward.operator.kube import Kube, KubeError
from fleetward.operator.settings import OperatorSettings

from fleetward.api.scope import revokes

log = logging.getLogger("fleetward.operator.revoker")
T = TypeVar("T")


@dataclass(frozen=True)
class Revocation:
    """Keys withdrawn for one engagement of a switch: when, and whose."""

    engaged_at: str
    done_at: float
    agents: frozenset[str]


def _seconds(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class SwitchView:
    """The revoker's picture of the world, from its own watches (pure: no I/O)."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.agents: dict[str, dict[str, Any]] = {}
        """namespace/name -> {"metadata": {namespace, name, labels, deletionTimestamp}}"""
        self.switches: dict[str, dict[str, Any]] = {}
        self.blocked: frozenset[str] = frozenset()
        """Agents an engaged switch with revokeCredentials covers (replaced whole, so the
        main loop's reads never see it half-updated)."""

    def set_agent(self, obj: dict[str, Any], deleted: bool = False) -> None:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace")
        if not ns or not self.settings.owns_namespace(ns):
            return
        key = f"{ns}/{meta['name']}"
        if deleted:
            self.agents.pop(key, None)
            return
        self.agents[key] = {
            "metadata": {
                "namespace": ns,
                "name": meta["name"],
                "labels": dict(meta.get("labels") or {}),
                "deletionTimestamp": meta.get("deletionTimestamp"),
            }
        }

    def set_switch(self, obj: dict[str, Any], deleted: bool = False) -> None:
        name = obj["metadata"]["name"]
        if deleted:
            self.switches.pop(name, None)
        else:
            self.switches[name] = obj

    def by_namespace(self) -> dict[str, list[dict[str, Any]]]:
        """The Agents in the shape of Kopf's `agents_by_namespace` index."""
        out: dict[str, list[dict[str, Any]]] = {}
        for a in self.agents.values():
            out.setdefault(a["metadata"]["namespace"], []).append(a)
        return out

    def engaged(self) -> list[tuple[str, bool]]:
        """(name, engaged) of every switch this installation handles, for
        `fleetward_kill_switch_active`: read from the watched objects when scraped, so every
        replica reports what the API server holds, whichever replica acted (a value set by
        the handler that acted went stale on the others after a failover)."""
        agents = list(self.agents.values())
        switches = list(self.switches.values())  # the revoker thread may change the dict
        return sorted((s["metadata"]["name"], is_engaged(s)) for s in switches if involves(self.settings, s, agents))

    def revoking(self) -> dict[str, tuple[str, frozenset[str]]]:
        """Switch name -> (its engagement stamp, the agents whose keys it withdraws)."""
        agents = list(self.agents.values())
        out = {}
        for name, switch in self.switches.items():
            if not revokes(switch):
                continue
            meta = switch["metadata"]
            stamp = (meta.get("annotations") or {}).get(ENGAGED_AT) or meta.get("creationTimestamp") or ""
            out[name] = (stamp, frozenset(agent_id(a) for a in affected(switch, agents)))
        return out

    def refresh_blocked(self) -> dict[str, tuple[str, frozenset[str]]]:
        revoking = self.revoking()
        self.blocked = frozenset().union(*(ids for _, ids in revoking.values()))
        return revoking


class Revoker:
    """Owns the thread. The main loop uses it like a TrustBundle (publish, withdraw,
    revoke, load, block, unblock) and asks `revoked_for` when reporting an engage."""

    def __init__(self, settings: OperatorSettings, kubeconfig: str | None = None) -> None:
        self.settings = settings
        self._kubeconfig = kubeconfig
        self.view = SwitchView(settings)
        self.revocations: dict[str, Revocation] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleetward-revoker", daemon=True)
        self._bundle: TrustBundle | None = None
        self._kubes: list[Kube] = []
        self._tasks: list[asyncio.Task] = []
        self._webhook: Any = None
        self._synced: set[str] = set()
        self._seen_at: dict[tuple[str, str], float] = {}
        self._changed = asyncio.Event()  # created unbound; used on the thread only

    # -- the main loop's side ---------------------------------------------------------------

    async def start(self) -> None:
        # The thread needs the GIL for every step (a watch event, a response read in
        # pieces) while Kopf's loop may be busy in Python code: the default switch interval
        # (5 ms) is a wait per step, 1 ms makes the loop hand the GIL over sooner.
        sys.setswitchinterval(0.001)
        self._thread.start()
        await self._call(self._setup())

    async def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            await asyncio.wait_for(self._call(self._teardown()), 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 5)

    def _call(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    @property
    def bundle(self) -> TrustBundle:
        assert self._bundle is not None, "Revoker.start() first"
        return self._bundle

    @property
    def keys(self) -> dict[str, dict[str, Any]]:
        return self.bundle.keys

    async def publish(self, agent: str, jwk: dict[str, Any]) -> None:
        await self._call(self.bundle.publish(agent, jwk))

    async def withdraw(self, agent: str) -> None:
        await self._call(self.bundle.withdraw(agent))

    async def revoke(self, agents: list[str]) -> None:
        await self._call(self.bundle.revoke(agents))

    async def load(self) -> dict[str, dict[str, Any]]:
        return await self._call(self.bundle.load())

    # Run on the thread, in order with the publishes queued after them.
    def block(self, agent: str) -> None:
        self._loop.call_soon_threadsafe(self.bundle.block, agent)

    def unblock(self, agent: str) -> None:
        self._loop.call_soon_threadsafe(self.bundle.unblock, agent)

    def revoked_for(self, switch: str, engaged_at: str, agents: list[str]) -> float | None:
        """When this thread had withdrawn the keys of all `agents` for this engagement, or
        None when it has not (yet): the engage then reports its own time."""
        done = self.revocations.get(switch)
        if done is None or done.engaged_at != engaged_at or not set(agents) <= done.agents:
            return None
        return done.done_at

    # -- the thread's side ------------------------------------------------------------------

    async def _setup(self) -> None:
        settings = self.settings
        namespaces: list[str | None] = list(settings.watch_namespaces) or [None]
        writer = await Kube.connect(self._kubeconfig, concurrency=2)
        # Watches hold their connection for minutes: their own pool, so writes never wait.
        watcher = await Kube.connect(self._kubeconfig, concurrency=len(namespaces) + 2)
        self._kubes = [writer, watcher]
        self._changed = asyncio.Event()
        self._bundle = TrustBundle(
            writer, settings.namespace, settings.trust_bundle_name, switch_blocked=self._switch_blocked
        )
        self._bundle.start()
        self._tasks = [
            asyncio.create_task(self._watch(watcher, "KillSwitch", None, self._set_switch, "switches")),
            *(
                asyncio.create_task(
                    self._watch(watcher, "Agent", ns, self.view.set_agent, f"agents:{ns or '*'}", metadata_only=True)
                )
                for ns in namespaces
            ),
            asyncio.create_task(self._revoke_on_change()),
        ]
        if settings.webhook.enabled:
            from fleetward.operator.killswitch.admission import serve

            self._webhook = await serve(settings, self._indexes)

    async def _teardown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._webhook is not None:
            await self._webhook.cleanup()
        if self._bundle is not None:
            await self._bundle.stop()
        for kube in self._kubes:
            await kube.close()

    def _set_switch(self, obj: dict[str, Any], deleted: bool = False) -> None:
        self.view.set_switch(obj, deleted)
        meta = obj.get("metadata") or {}
        stamp = (meta.get("annotations") or {}).get(ENGAGED_AT)
        if stamp and not deleted and is_engaged(obj):
            self._seen_at.setdefault((meta["name"], stamp), time.time())  # for the log line

    def _switch_blocked(self, agent: str) -> bool:
        return agent in self.view.blocked

    def _indexes(self) -> dict[str, Any]:
        """For the webhook's finalizer decision; empty until every Agent watch has listed."""
        agent_watches = {w for w in self._synced if w.startswith("agents:")}
        expected = len(self.settings.watch_namespaces) or 1
        if len(agent_watches) < expected:
            return {}
        return {"agents_by_namespace": self.view.by_namespace()}

    async def _watch(
        self,
        kube: Kube,
        kind: str,
        namespace: str | None,
        apply: Callable[..., None],
        name: str,
        *,
        metadata_only: bool = False,
    ) -> None:
        """List, then watch from the list's version; on 410 list again; on errors back off
        (0.2 s doubling to 5 s) and list again. Never ends but by cancellation."""
        delay = 0.2
        while True:
            try:
                items, version = await kube.list_with_version(kind, namespace, metadata_only=metadata_only)
                for item in items:
                    apply(item)
                self._forget_missing(kind, namespace, items)
                self._synced.add(name)
                self._changed.set()
                delay = 0.2
                while True:
                    async for event in kube.watch(kind, namespace, version, metadata_only=metadata_only):
                        obj = event.get("object") or {}
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        if event["type"] == "BOOKMARK":
                            continue
                        apply(obj, deleted=event["type"] == "DELETED")
                        self._changed.set()
            except asyncio.CancelledError:
                raise
            except KubeError as e:
                if e.status != 410:
                    log.warning("revoker: %s watch failed (%s); listing again in %.1f s", name, e, delay)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("revoker: %s watch failed; listing again in %.1f s", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _forget_missing(self, kind: str, namespace: str | None, items: list[dict[str, Any]]) -> None:
        """After a re-list: objects deleted while the watch was down are gone from the view."""
        if kind == "KillSwitch":
            live = {i["metadata"]["name"] for i in items}
            for name in [n for n in self.view.switches if n not in live]:
                self.view.switches.pop(name)
            return
        live = {f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in items}
        for key in [k for k in self.view.agents if (namespace is None or k.startswith(f"{namespace}/"))]:
            if key not in live:
                self.view.agents.pop(key)

    async def _revoke_on_change(self) -> None:
        """After every change of the view: withdraw the keys of agents newly covered."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            if "switches" not in self._synced:
                continue
            revoking = self.view.refresh_blocked()
            for name in [n for n in self.revocations if n not in revoking]:
                self.revocations.pop(name)  # released or deleted
            self._seen_at = {k: v for k, v in self._seen_at.items() if k[0] in revoking}
            for name, (stamp, agents) in revoking.items():
                done = self.revocations.get(name)
                fresh = agents if done is None or done.engaged_at != stamp else agents - done.agents
                if not fresh:
                    continue
                try:
                    await self.bundle.withdraw_many(sorted(fresh))
                except Exception as e:  # Kopf's engage handler revokes too, and retries
                    log.warning("revoker: withdrawing the keys covered by %s failed: %s", name, e)
                    self._changed.set()
                    await asyncio.sleep(0.2)
                    continue
                now = time.time()
                known = done.agents if done is not None and done.engaged_at == stamp else frozenset()
                self.revocations[name] = Revocation(stamp, now, known | fresh)
                accepted = _seconds(stamp) or now
                log.info(
                    "kill switch %s: revoker withdrew the keys of %d agent(s) (engage stamped %s; seen here "
                    "%+.3f s, keys withdrawn %+.3f s after it; trust-bundle write %s)",
                    name,
                    len(fresh),
                    stamp,
                    self._seen_at.get((name, stamp), now) - accepted,
                    now - accepted,
                    self.bundle.last_write,
                )
