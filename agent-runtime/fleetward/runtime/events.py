"""Session events out (SPEC §6): validated `SessionEvent` envelopes on the events topic,
key = session id, header `traceparent`.

Every event has a deterministic key within its run (e.g. `<run>/tool_call/<call id>`).
The first emission of a key allocates the session's next sequence number and fixes the
envelope (id and content) in the ledger; then the envelope is produced and marked
published. When a step is replayed after a crash, its events come again under the same
keys: a published one is not produced again, an unpublished one goes out with the
sequence and id it was given. The only duplicate left is a crash between Kafka's
acknowledgement and the ledger update, and that duplicate has the same `id` and
`sequence`, so a consumer can drop it.

An `escalated` event is also copied, as it is, to the alerts topic (when one is given): the
human queue's tooling reads the alerts topic, not every session (SPEC §6). The copy is sent
after the events-topic record and is at most once (a crash between the two loses it; the
session still shows the escalation).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from fleetward.runtime.kafka import AsyncProducer
from fleetward.runtime.persistence import Ledger
from fleetward.runtime.telemetry import EVENTS_PUBLISHED

from fleetward.api.envelopes import EventType, SessionEvent, WireModel

log = logging.getLogger("fleetward.runtime.events")

_EVENT_NAMESPACE = uuid.UUID("6f1d2c8e-3b7a-4f0e-9a51-0c2d7f4e8b13")


def event_id(event_key: str) -> str:
    """The envelope id of an event key: the same on every replay."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, event_key))


class EventPublisher:
    def __init__(
        self, producer: AsyncProducer, ledger: Ledger, topic: str, agent: str, *, alerts_topic: str | None = None
    ) -> None:
        self.producer = producer
        self.ledger = ledger
        self.topic = topic
        self.agent = agent
        self.alerts_topic = alerts_topic

    async def emit(
        self,
        key: str,
        type: EventType,
        *,
        session_id: str,
        run_id: str,
        trace_id: str,
        data: WireModel | Mapping[str, Any],
        traceparent: str | None = None,
    ) -> SessionEvent | None:
        """Publish the event `key` once; returns it (None when it had been published before)."""
        existing = await self.ledger.event_by_key(key)
        if existing is not None and existing["published"]:
            return None
        if existing is not None and existing["envelope"]:
            envelope = existing["envelope"]
            event = SessionEvent.parse(envelope)
        else:
            sequence = await self.ledger.allocate_event(session_id, key)
            event = SessionEvent.new(
                type,
                session_id=session_id,
                agent=self.agent,
                run_id=run_id,
                trace_id=trace_id,
                sequence=sequence,
                data=data,
            )
            event = event.model_copy(update={"id": event_id(key)})
            await self.ledger.store_envelope(key, event.to_json())
            stored = await self.ledger.event_by_key(key)
            envelope = stored["envelope"] if stored else event.to_json()
            event = SessionEvent.parse(envelope)
        headers = {"traceparent": traceparent} if traceparent else {}
        headers["fleetward-event-type"] = event.type
        await self.producer.send(self.topic, envelope, key=session_id, headers=headers)
        await self.ledger.mark_published(key)
        EVENTS_PUBLISHED.labels(self.agent, event.type).inc()
        if event.type == "escalated" and self.alerts_topic:
            try:
                await self.producer.send(
                    self.alerts_topic,
                    envelope,
                    key=session_id,
                    headers={**headers, "fleetward-alert-type": "escalated"},
                )
            except Exception as e:  # the session has the escalation; say loudly the queue may not
                log.error("could not copy escalation %s of session %s to the alerts topic: %s", key, session_id, e)
        log.info(
            "event %s #%d",
            event.type,
            event.sequence,
            extra={
                "fw": {"sessionId": session_id, "runId": run_id, "eventType": event.type, "sequence": event.sequence}
            },
        )
        return event
