"""The audit topic mirror: records go to Kafka after their database commit, never before.

Kafka being down never loses or blocks an audit record: the database row stands, the
`fw_audit_mirror` cursor stays behind, and the mirror catches up when Kafka is back. The
topic gets every record at least once, in sequence order (one partition: key = chain
id; one mirror at a time; idempotent producer). A duplicate is possible only when the
process dies between Kafka's acknowledgement and the cursor update: consumers drop a
record whose sequence they have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fleetward.api.envelopes import canonical_json

log = logging.getLogger("fleetward.audit.mirror")

DEFAULT_TOPIC = "fleetward.audit"


class KafkaMirror:
    """By default a producer of its own (idempotent, acks=all, bounded message timeout): a
    batch is settled by its own delivery reports before the next one is sent, so no late
    retry of an old batch can land after a newer one. A caller's confluent_kafka Producer
    can be passed instead (`producer=`); it should be idempotent too."""

    def __init__(
        self,
        kafka: Mapping[str, Any] | None,
        topic: str = DEFAULT_TOPIC,
        *,
        delivery_timeout: float = 10.0,
        producer: Any = None,
    ) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.delivery_timeout = delivery_timeout
        if producer is not None:
            # The caller's producer: its message.timeout.ms bounds the wait for a report.
            self._producer = producer
            return
        if not kafka or not kafka.get("bootstrap.servers"):
            raise ValueError("kafka: bootstrap.servers is required to mirror the audit log")
        self._producer = Producer(
            {
                **kafka,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": int(delivery_timeout * 1000),
            }
        )

    def publish(self, docs: Sequence[Mapping[str, Any]]) -> int:
        """Produce the records in order and wait for every delivery report; returns how many
        from the start of `docs` are durably in Kafka."""
        results: list[str | None] = ["pending"] * len(docs)

        def report(index: int):
            def on_delivery(err: Any, _msg: Any) -> None:
                results[index] = None if err is None else str(err)

            return on_delivery

        for i, doc in enumerate(docs):
            while True:
                try:
                    self._producer.produce(
                        self.topic, canonical_json(doc), key=str(doc["chain"]).encode(), on_delivery=report(i)
                    )
                    break
                except BufferError:  # local queue full: serve delivery reports, then retry
                    self._producer.poll(0.1)
        # Every produced record gets exactly one report, at the latest after message.timeout.ms.
        remaining = self._producer.flush(self.delivery_timeout + 5)
        while remaining and any(r == "pending" for r in results):  # a caller's producer may wait longer
            remaining = self._producer.flush(self.delivery_timeout)
        delivered = 0
        for outcome in results:
            if outcome is not None:
                break
            delivered += 1
        if delivered < len(docs):
            first = results[delivered]
            log.warning(
                "audit mirror: %d of %d records reached %s; retrying from sequence %s later (%s)",
                delivered,
                len(docs),
                self.topic,
                docs[delivered]["sequence"],
                "no delivery report yet" if first == "pending" or remaining else first,
            )
        return delivered

    def close(self, timeout: float = 5.0) -> None:
        self._producer.flush(timeout)
