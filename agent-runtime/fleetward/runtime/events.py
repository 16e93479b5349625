"""Session events out (SPEC §6): validated `SessionEvent` envelopes on the events topic,
key = session id, header `traceparent`.

Every event has a deterministic key within its run (e.g. `<run>/tool_call/<call id>`).
The first emission of a key allocates the session's next sequence number and fixes the
envelope (id and content) in the ledger, in one statement (Ledger.record_event); then the
envelope is produced and marked published. When a step is replayed after a crash, its events come again under the same
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

_SEQUENCE_SENTINEL = 8_646_911_284_551_352_321
"""A sequence no session reaches: the envelope is serialized with it, and the ledger puts
the allocated sequence in its place as it stores the envelope (Ledger.record_event)."""
_SEQUENCE_MARKER = f'"sequence":{_SEQUENCE_SENTINEL}'


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

        def build(sequence: int) -> SessionEvent:
            event = SessionEvent.new(
                type,
                session_id=session_id,
                agent=self.agent,
                run_id=run_id,
                trace_id=trace_id,
                sequence=sequence,
                data=data,
            )
            return event.model_copy(update={"id": event_id(key)})

        # The first emission (the usual case) costs one ledger write here: the sequence is
        # allocated and the envelope stored by one statement. Only a replay reads the ledger.
        event = build(_SEQUENCE_SENTINEL)
        template = event.to_json()
        row = None
        if template.count(_SEQUENCE_MARKER) == 1:
            row = await self.ledger.record_event(session_id, key, template, _SEQUENCE_MARKER)
        else:  # the data happens to hold the sentinel: the two-step way
            existing = await self.ledger.event_by_key(key)
            if existing is None:
                sequence = await self.ledger.allocate_event(session_id, key)
                await self.ledger.store_envelope(key, build(sequence).to_json())
        if row is not None:
            envelope = row["envelope"]
            event = event.model_copy(update={"sequence": int(row["sequence"])})
        else:  # recorded before: a replayed step, or a row allocated without an envelope
            existing = await self.ledger.event_by_key(key)
            if existing is None:
                raise RuntimeError(f"event {key} of session {session_id} is not in the ledger")
            if existing["published"]:
                return None
            if not existing["envelope"]:
                await self.ledger.store_envelope(key, build(int(existing["sequence"])).to_json())
                existing = await self.ledger.event_by_key(key)
                assert existing is not None
            envelope = existing["envelope"]
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
