"""TrustBundle: the set of agent keys a tool service currently trusts, kept current by a
push/watch source so that a key removed from the bundle is refused within a second.

Sources (see fleetward.toolkit.sources):
- ConfigMap `fleetward-trust-bundle` watched through the Kubernetes API — production.
- a local file watched by mtime every 100 ms — tests and non-Kubernetes use.
- a static JWKS — tests and fixed setups.

Failure policy (decided here because revocation depends on it):
- Before the first successful load, every token is refused (`trust_bundle_unavailable`).
- A document that is not a JWKS at all fails closed at once: we cannot tell which keys the
  writer meant to revoke. Single malformed entries are dropped, the rest stays trusted.
- A deleted ConfigMap/file means "no trusted keys" (everything refused as revoked/unknown).
- If the source becomes unreachable (watch broken, API server down), the last known keys
  stay usable for `max_staleness` seconds (default 10 s) while the source reconnects with
  backoff; after that every token is refused until the source is back. Revocations are
  writes to the same API server, so a short grace does not hide a revocation the API
  server accepted from a service that can still reach it; the bound caps the exposure when
  only the service is cut off.

Kill switches (fleetward.toolkit.killswitches): with a KillSwitch source beside the
ConfigMap (the default for `from_configmap`), a key whose agent an engaged switch covers is
refused as revoked the moment the switch reaches this process, before the operator's
withdrawal reaches the ConfigMap. That view only ever removes trust; it is ignored before
its first listing and once its watch has failed for longer than `max_staleness`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from fleetward.toolkit.errors import RefusalReason, TokenRefused
from fleetward.toolkit.jwks import InvalidJwks, TrustedKey, parse_jwks

log = logging.getLogger("fleetward.toolkit.bundle")

DEFAULT_CONFIGMAP = "fleetward-trust-bundle"
DEFAULT_NAMESPACE = "fleetward-system"
JWKS_KEY = "jwks.json"
DEFAULT_MAX_STALENESS = 10.0
_RETIRED_MEMORY = 100_000  # kids remembered as revoked (kids are never reused), bounded


class BundleSource(Protocol):
    """Feeds a TrustBundle: calls bundle.load(...) on every change and
    bundle.source_down(...)/source_up() when it loses/regains its origin."""

    description: str

    def start(self, bundle: TrustBundle) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class BundleChange:
    added: frozenset[str]
    removed: frozenset[str]
    total: int


class TrustBundle:
    def __init__(
        self,
        source: BundleSource | None = None,
        *,
        kill_switches: BundleSource | None = None,
        max_staleness: float = DEFAULT_MAX_STALENESS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 seconds, got {max_staleness}")
        self.source = source
        self.kill_switch_source = kill_switches
        self.max_staleness = max_staleness
        self._clock = clock
        self._keys: dict[str, TrustedKey] = {}
        self._retired: OrderedDict[str, None] = OrderedDict()
        self._loaded = False
        self._invalid: str | None = None
        self._down_since: float | None = None
        self._down_error: str | None = None
        self._switches: dict[str, Mapping[str, Any]] | None = None
        """KillSwitches by name, as last listed/watched; None before the first listing."""
        self._switches_down_since: float | None = None
        self._switches_error: str | None = None
        self._covered: dict[str, str] = {}
        """kid -> the switch covering its agent, for the keys now in the bundle."""
        self._callbacks: list[Callable[[BundleChange], None]] = []
        self._cond = threading.Condition()
        self._started = False

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_jwks(cls, document: str | bytes | Mapping[str, Any]) -> TrustBundle:
        """A fixed bundle (tests, or a setup that restarts the service to change keys)."""
        bundle = cls()
        bundle.load(document)
        return bundle

    @classmethod
    def from_file(
        cls, path: str | Path, *, poll_interval: float = 0.1, max_staleness: float = DEFAULT_MAX_STALENESS
    ) -> TrustBundle:
        from fleetward.toolkit.sources import FileSource

        return cls(FileSource(Path(path), poll_interval=poll_interval), max_staleness=max_staleness)

    @classmethod
    def from_configmap(
        cls,
        namespace: str = DEFAULT_NAMESPACE,
        name: str = DEFAULT_CONFIGMAP,
        *,
        api_client: Any = None,
        key: str = JWKS_KEY,
        max_staleness: float = DEFAULT_MAX_STALENESS,
        watch_kill_switches: bool = True,
    ) -> TrustBundle:
        """Watches the ConfigMap through the Kubernetes API, and the KillSwitches unless
        `watch_kill_switches` is False. `api_client` defaults to the in-cluster
        configuration, or KUBECONFIG outside a cluster."""
        from fleetward.toolkit.killswitches import KillSwitchSource
        from fleetward.toolkit.sources import ConfigMapSource

        # Without `api_client`, each source loads the configuration when started.
        return cls(
            ConfigMapSource(namespace, name, key=key, api_client=api_client),
            kill_switches=KillSwitchSource(api_client=api_client) if watch_kill_switches else None,
            max_staleness=max_staleness,
        )

    def _sources(self) -> list[BundleSource]:
        return [s for s in (self.source, self.kill_switch_source) if s is not None]

    def start(self) -> Self:
        if self._sources() and not self._started:
            self._started = True
            for source in self._sources():
                source.start(self)
        return self

    def stop(self) -> None:
        if self._sources() and self._started:
            self._started = False
            for source in self._sources():
                source.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fed by sources ------------------------------------------------------------------

    def load(self, document: str | bytes | Mapping[str, Any] | None) -> bool:
        """A new bundle document; None means the bundle no longer exists (trust nothing).
        Returns False when the document was rejected as a whole (the bundle now fails closed)."""
        if document is None:
            self.replace({})
            return True
        try:
            parsed = parse_jwks(document)
        except InvalidJwks as e:
            with self._cond:
                # A file source re-reads an invalid document every poll (a writer may still be
                # finishing it): the same rejection is logged once, not ten times a second.
                repeated = self._invalid == str(e)
                self._invalid = str(e)
                self._loaded = True
                self._cond.notify_all()
            if not repeated:
                log.error("trust bundle rejected, refusing every token until a valid one arrives: %s", e)
            return False
        for problem in parsed.problems:
            log.error("trust bundle entry: %s", problem)
        self.replace(parsed.keys)
        return True

    def replace(self, keys: Mapping[str, TrustedKey]) -> None:
        with self._cond:
            before_keys, before = set(self._keys), self._effective()
            self._keys = dict(keys)
            self._loaded = True
            self._invalid = None
            self._cover()
            for kid in before_keys - set(keys):
                self._retired[kid] = None
                self._retired.move_to_end(kid)
            for kid in set(keys) - before_keys:
                self._retired.pop(kid, None)
            while len(self._retired) > _RETIRED_MEMORY:
                self._retired.popitem(last=False)
        self._changed(before)

    def set_kill_switches(self, switches: Mapping[str, Mapping[str, Any]] | None) -> None:
        """The KillSwitches as now listed/watched (None: no view). Keys their engaged
        switches cover are refused from now on."""
        with self._cond:
            before = self._effective()
            self._switches = dict(switches) if switches is not None else None
            self._cover()
        self._changed(before)

    def kill_switch_source_down(self, error: str) -> None:
        with self._cond:
            if self._switches_down_since is None:
                self._switches_down_since = self._clock()
                log.warning(
                    "kill switch watch lost (%s); what it last saw stays in force for %.0f s, then only the "
                    "trust bundle decides",
                    error,
                    self.max_staleness,
                )
            self._switches_error = error

    def kill_switch_source_up(self) -> None:
        with self._cond:
            self._switches_down_since = None
            self._switches_error = None

    def _cover(self) -> None:
        """Recompute which bundle keys the switches cover. Caller holds the lock."""
        from fleetward.toolkit.killswitches import covering_switch

        switches = self._switches or {}
        engaged = {n: s for n, s in switches.items() if (s.get("spec") or {}).get("engaged")}
        self._covered = {}
        if engaged:
            for kid, key in self._keys.items():
                name = covering_switch(engaged, key)
                if name is not None:
                    self._covered[kid] = name

    def _switch_view_usable(self) -> bool:
        """Caller holds the lock."""
        if self._switches is None:
            return False
        down = self._switches_down_since
        return down is None or self._clock() - down <= self.max_staleness

    def _covering(self, kid: str) -> str | None:
        """The switch that revokes this kid, if the switch view may be used. Caller holds the lock."""
        return self._covered.get(kid) if self._covered and self._switch_view_usable() else None

    def _effective(self) -> set[str]:
        """The kids trusted now. Caller holds the lock."""
        if self._covered and self._switch_view_usable():
            return {kid for kid in self._keys if kid not in self._covered}
        return set(self._keys)

    def _changed(self, before: set[str]) -> None:
        """Tell the callbacks what changed in the trusted set since `before`."""
        with self._cond:
            after = self._effective()
            change = BundleChange(added=frozenset(after - before), removed=frozenset(before - after), total=len(after))
            callbacks = list(self._callbacks)
            self._cond.notify_all()
        if change.added or change.removed:
            log.info("trust bundle: %d keys trusted (+%d -%d)", change.total, len(change.added), len(change.removed))
            for callback in callbacks:
                try:
                    callback(change)
                except Exception:
                    log.exception("trust bundle on_change callback failed")

    def source_down(self, error: str) -> None:
        with self._cond:
            if self._down_since is None:
                self._down_since = self._clock()
                log.warning(
                    "trust bundle source lost (%s); last known keys stay trusted for %.0f s", error, self.max_staleness
                )
            self._down_error = error
            self._cond.notify_all()

    def source_up(self) -> None:
        with self._cond:
            if self._down_since is not None:
                log.info("trust bundle source back after %.1f s", self._clock() - self._down_since)
            self._down_since = None
            self._down_error = None
            self._cond.notify_all()

    # -- read side -----------------------------------------------------------------------

    def _unavailable_reason(self) -> str | None:
        """Why no token can be accepted now (None when the bundle is usable). Caller holds the lock."""
        if not self._loaded:
            return "trust bundle not loaded yet"
        if self._invalid is not None:
            return f"trust bundle invalid: {self._invalid}"
        if self._down_since is not None:
            stale_for = self._clock() - self._down_since
            if stale_for > self.max_staleness:
                return f"trust bundle source unreachable for {stale_for:.0f} s ({self._down_error})"
        return None

    def ready(self) -> bool:
        """Loaded, valid, and not stale beyond max_staleness: tokens can be accepted."""
        with self._cond:
            return self._unavailable_reason() is None

    def wait_ready(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._unavailable_reason() is None, timeout)

    def lookup(self, kid: str) -> TrustedKey:
        """The trusted key with this kid; TokenRefused (unknown_key, revoked,
        trust_bundle_unavailable) otherwise."""
        with self._cond:
            unavailable = self._unavailable_reason()
            if unavailable is not None:
                raise TokenRefused(RefusalReason.TRUST_BUNDLE_UNAVAILABLE, unavailable)
            key = self._keys.get(kid)
            if key is not None:
                switch = self._covering(kid)
                if switch is None:
                    return key
                raise TokenRefused(
                    RefusalReason.REVOKED,
                    f"key {kid!r} of agent {key.agent or '(unbound)'} is revoked by kill switch {switch!r}",
                )
            if kid in self._retired:
                raise TokenRefused(RefusalReason.REVOKED, f"key {kid!r} was removed from the trust bundle")
        raise TokenRefused(RefusalReason.UNKNOWN_KEY, f"key {kid!r} is not in the trust bundle")

    def trusted_keys(self) -> dict[str, TrustedKey]:
        """The keys trusted now: the bundle's, less those an engaged KillSwitch covers."""
        with self._cond:
            effective = self._effective()
            return {kid: key for kid, key in self._keys.items() if kid in effective}

    def on_change(self, callback: Callable[[BundleChange], None]) -> None:
        """Called (from the source's thread) after every change of the key set."""
        with self._cond:
            self._callbacks.append(callback)

    def status(self) -> dict[str, Any]:
        """For health endpoints and logs."""
        with self._cond:
            reason = self._unavailable_reason()
            return {
                "ready": reason is None,
                "reason": reason,
                "keys": len(self._effective()),
                "bundleKeys": len(self._keys),
                "source": self.source.description if self.source else "static",
                "sourceDown": self._down_error,
                "killSwitches": self._kill_switch_status(),
            }

    def _kill_switch_status(self) -> str:
        """Caller holds the lock."""
        if self.kill_switch_source is None and self._switches is None:
            return "not watched"
        if self._switches is None:
            return f"not listed yet{f' ({self._switches_error})' if self._switches_error else ''}"
        covered = len(self._covered) if self._switch_view_usable() else 0
        state = "watching" if self._switches_error is None else f"watch failing ({self._switches_error})"
        if not self._switch_view_usable():
            state += ", ignored: stale beyond max_staleness"
        return f"{state}; {covered} bundle keys covered by an engaged switch"
