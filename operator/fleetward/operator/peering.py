"""Whether this replica is the one that acts, for the operator's own background loops.

Kopf pauses a replica's handlers when its peering object shows a live peer of higher
priority, but the operator's background loops (housekeeping, the gateway apply) are plain
tasks started at start-up, and Kopf has no public "am I the active peer". Without a gate a
standby replica ran them too (idempotent writes, but writes the issue says only one replica
makes). `Peering.active()` reads the same peering object(s) Kopf keeps and applies Kopf's
rule (kopf/_core/engines/peering.py): this replica acts when its own keep-alive is there and
no other live peer has a priority above or equal to its own (Kopf pauses every replica of an
equal priority). Until its keep-alive is there it waits: a replica that just started has not
yet seen the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fleetward.operator.kube import Kube, KubeError

log = logging.getLogger("fleetward.operator.peering")


@dataclass(frozen=True)
class PeerIdentity:
    """How this replica appears in the peering object (passed to kopf.run as well)."""

    identity: str
    priority: int


def _alive(entry: Mapping[str, Any], now: datetime) -> bool:
    try:
        seen = datetime.fromisoformat(str(entry["lastseen"]))
        lifetime = float(entry.get("lifetime", 60))
    except (KeyError, TypeError, ValueError):
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=UTC)
    return seen + timedelta(seconds=lifetime) > now


def decide(status: Mapping[str, Any] | None, me: PeerIdentity, now: datetime) -> tuple[bool, str]:
    """(acts, why) for one peering object's `status` (peer id -> priority, lastseen, lifetime)."""
    peers = dict(status or {})
    own = peers.pop(me.identity, None)
    if not isinstance(own, Mapping) or not _alive(own, now):
        return False, "its own keep-alive is not in the peering object yet"
    for identity, entry in sorted(peers.items()):
        if not isinstance(entry, Mapping) or not _alive(entry, now):
            continue
        try:
            priority = int(entry.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if priority > me.priority:
            return False, f"replica {identity} (priority {priority}) acts"
        if priority == me.priority:
            return False, f"replica {identity} has the same priority {priority}; Kopf pauses both"
    return True, f"no live replica of a higher priority than {me.priority}"


@dataclass(frozen=True)
class PeeringObject:
    """Where Kopf keeps one peering: a ClusterKopfPeering, or a KopfPeering in a namespace."""

    name: str
    namespace: str | None = None

    @property
    def path(self) -> str:
        if self.namespace is None:
            return f"/apis/kopf.dev/v1/clusterkopfpeerings/{self.name}"
        return f"/apis/kopf.dev/v1/namespaces/{self.namespace}/kopfpeerings/{self.name}"


class Peering:
    """The gate of the background loops; logs when this replica starts or stops acting."""

    def __init__(self, kube: Kube, me: PeerIdentity, objects: Sequence[PeeringObject]) -> None:
        self.kube = kube
        self.me = me
        self.objects = list(objects)
        self.acting: bool | None = None
        self.changes = 0
        """How often the decision changed since the first one: while this replica stood by,
        another acted, so what it remembers having written may no longer be live."""

    @classmethod
    def of(cls, kube: Kube, me: PeerIdentity, name: str, namespaces: Sequence[str] | None) -> Peering:
        """Cluster-wide operators share a ClusterKopfPeering; a namespaced one has a KopfPeering
        per namespace it serves, as Kopf does. A namespace pattern (Kopf resolves globs as
        namespaces come and go) is not followed here: with only patterns, the loops act on
        every replica, as before this gate, and say so."""
        if not namespaces:
            return cls(kube, me, [PeeringObject(name)])
        exact = [ns for ns in namespaces if not any(c in ns for c in "*?[")]
        if len(exact) < len(namespaces):
            log.warning(
                "namespace patterns in watchNamespaces: the background loops follow the peering of %s only",
                ", ".join(exact) or "no namespace (they run on every replica)",
            )
        return cls(kube, me, [PeeringObject(name, ns) for ns in exact])

    async def active(self) -> bool:
        """Whether this replica acts now; on an API error, what it last knew."""
        now = datetime.now(UTC)
        acts, why = True, "alone"
        try:
            for obj in self.objects:
                try:
                    body = await self.kube.request("GET", obj.path)
                except KubeError as e:
                    if e.status == 404:  # Kopf runs without it (and says so): nothing to defer to
                        continue
                    raise
                acts, why = decide(body.get("status"), self.me, now)
                if not acts:
                    break
        except KubeError as e:
            log.warning("could not read the peering object: %s; keeping the last decision", e)
            return bool(self.acting)
        if acts != self.acting:
            if acts:
                log.info("this replica acts (%s): housekeeping and the gateway apply run here", why)
            else:
                log.info("standing by (%s): housekeeping and the gateway apply pause here", why)
            if self.acting is not None:
                self.changes += 1
            self.acting = acts
        return acts
