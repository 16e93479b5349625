"""What the operator's handlers share: settings, the API client, the trust bundle writer,
the Kafka admin, per-Agent locks and the last status written. One instance per
operator process, kept in Kopf's `memo`."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fleetward.operator.audit import OperatorAudit
from fleetward.operator.kafka import KafkaAdmin
from fleetward.operator.killswitch.control import ControlChannel
from fleetward.operator.killswitch.revoker import Revoker
from fleetward.operator.kube import Kube
from fleetward.operator.peering import Peering
from fleetward.operator.settings import OperatorSettings

AgentKey = tuple[str, str]  # (namespace, name)


@dataclass
class OperatorContext:
    settings: OperatorSettings
    kube: Kube
    bundle: Revoker
    """The trust-bundle writer, on the revoker's own thread (killswitch/revoker.py)."""
    kafka: KafkaAdmin
    control: ControlChannel
    audit: OperatorAudit
    reconcile_slots: asyncio.Semaphore
    locks: defaultdict[AgentKey, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    statuses: dict[AgentKey, dict[str, Any]] = field(default_factory=dict)
    """The status last written per Agent: lets cheap events (a Deployment's readiness)
    update one condition without re-reading or re-reconciling the Agent."""
    applied: dict[AgentKey, tuple[str, str]] = field(default_factory=dict)
    """(uid, fingerprint of the desired objects) this process last applied per Agent: lets a
    handler that re-runs for an unchanged Agent skip the writes (Kopf runs the creation
    handler again when its own annotation patch is slow to come back under load). The
    drift timer and every other caller apply regardless."""
    reconciled_generation: dict[AgentKey, tuple[str, int]] = field(default_factory=dict)
    """(uid, generation) of the newest Agent body reconciled per Agent. Wake-ups through an
    index (an SOP, Guardrail, KillSwitch or Deployment change) carry the body the index
    holds, which can be older than one already reconciled: that reconcile reads the Agent
    again rather than roll it back to an older spec until its next event."""
    shared_topics_ready: asyncio.Event = field(default_factory=asyncio.Event)
    deleted: set[str] = field(default_factory=set)
    """uids of Agents whose cleanup ran: nothing may be issued for them again."""
    unconfirmed: set[AgentKey] = field(default_factory=set)
    """Agents whose status in `statuses` may not be the live one: another replica acted
    while this one stood by. Their next status is written even when it equals the cached
    one (after a failover a stale status otherwise survived until something changed)."""
    installation_secrets: dict[str, tuple[float, asyncio.Future[dict[str, Any] | None]]] = field(default_factory=dict)
    """Secrets of the installation namespace every Agent copies (the PostgreSQL DSN, the PII
    hash key) by name: (read at, the read). One read serves every reconcile for a few
    seconds: at 1000 Agents a GET each would be a thousand reads of one object."""
    peering: Peering | None = None
    """The background loops' gate (peering.py); None when standalone: always acts."""
    peering_changes_seen: int = 0

    async def acting(self) -> bool:
        """Whether this replica runs the installation's background work now."""
        if self.peering is None:
            return True
        acts = await self.peering.active()
        if self.peering.changes != self.peering_changes_seen:
            self.peering_changes_seen = self.peering.changes
            self.distrust_what_was_written()
        return acts

    def distrust_what_was_written(self) -> None:
        """Another replica may have written since this one last did: until its next
        reconcile, an Agent's cached status is not built on (Deployment events wait for that
        reconcile, which starts from the live status) and its next status is written even
        when equal; and the next apply is made rather than skipped as unchanged."""
        self.unconfirmed = set(self.statuses)
        self.applied.clear()

    @classmethod
    async def create(cls, settings: OperatorSettings, kubeconfig: str | None = None) -> OperatorContext:
        kube = await Kube.connect(kubeconfig, concurrency=settings.api_connections)
        # The trust bundle, the kill switch's own watches and the admission webhook run on a
        # thread with its own loop and connections: an engage never waits behind the
        # reconciles (after a release of 1000 Agents, seconds of them).
        bundle = Revoker(settings, kubeconfig)
        await bundle.start()
        return cls(
            settings=settings,
            kube=kube,
            bundle=bundle,
            kafka=KafkaAdmin(settings.kafka),
            control=ControlChannel(settings),
            audit=await asyncio.to_thread(OperatorAudit.open, settings),
            reconcile_slots=asyncio.Semaphore(settings.max_concurrent_reconciles),
        )

    async def close(self) -> None:
        await self.bundle.stop()
        self.control.close()
        self.audit.close()
        await self.kube.close()
