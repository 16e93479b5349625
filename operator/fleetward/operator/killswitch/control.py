"""The operator's side of the control topic (SPEC §6 Control): publish `halt` / `resume`
to every runtime and gateway, and collect the acks of one order from control-acks.

Acks are read by a short-lived consumer per order that starts at the order's timestamp
(offsets_for_times), not at the end of the topic: a replacement operator that resumes an
engage after a crash still finds the acks its predecessor was waiting for."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from fleetward.operator.kafka import KafkaUnavailable
from fleetward.operator.settings import OperatorSettings

from fleetward.api.envelopes import ControlAck, ControlMessage, EnvelopeError, parse_ack
from fleetward.api.killswitch import DEFAULT_DRAIN_TIMEOUT_SECONDS

log = logging.getLogger("fleetward.operator.killswitch.control")


@dataclass
class AckBook:
    """The acks of one order (kill switch + generation), by type and instance."""

    kill_switch: str
    generation: int
    acks: dict[tuple[str, str], ControlAck] = field(default_factory=dict)

    def add(self, ack: ControlAck) -> bool:
        if ack.kill_switch != self.kill_switch or ack.generation != self.generation:
            return False
        self.acks[(ack.type, ack.instance)] = ack
        return True

    def instances(self, type_: str, component: str = "runtime") -> set[str]:
        return {i for (t, i), a in self.acks.items() if t == type_ and a.component == component}

    def of(self, type_: str) -> list[ControlAck]:
        return [a for (t, _), a in sorted(self.acks.items()) if t == type_]


class ControlChannel:
    def __init__(self, settings: OperatorSettings):
        self.settings = settings
        self._producer: Producer | None = None

    def _client_config(self) -> dict[str, Any]:
        try:
            return self.settings.kafka.admin_config()
        except ValueError as e:
            raise KafkaUnavailable(str(e)) from e

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(
                {
                    **self._client_config(),
                    "client.id": f"fleetward-operator.{self.settings.installation_id}",
                    "enable.idempotence": True,
                    "message.timeout.ms": int(self.settings.kafka.timeout_seconds * 1000),
                }
            )
        return self._producer

    async def publish(self, order: ControlMessage) -> None:
        """Produce the order and wait until Kafka acknowledged it (KafkaUnavailable if not)."""
        topic = self.settings.topics.control
        result: dict[str, Any] = {}

        def report(err: KafkaError | None, _msg: Any) -> None:
            result["err"] = err

        def send() -> None:
            self.producer.produce(topic, order.to_json(), key=order.kill_switch.encode(), on_delivery=report)
            remaining = self.producer.flush(self.settings.kafka.timeout_seconds)
            if remaining:
                raise KafkaUnavailable(f"the {order.type} order was not acknowledged by Kafka in time")

        try:
            await asyncio.to_thread(send)
        except (KafkaException, BufferError) as e:
            raise KafkaUnavailable(str(e)) from e
        if result.get("err") is not None:
            raise KafkaUnavailable(f"producing the {order.type} order to {topic} failed: {result['err']}")
        log.info("published %s of %s generation %d to %s", order.type, order.kill_switch, order.generation, topic)

    async def collect_acks(
        self,
        book: AckBook,
        *,
        since: float,
        done: Callable[[AckBook], bool],
        timeout: float,
    ) -> bool:
        """Read control-acks from `since` (epoch seconds) into `book` until `done(book)` or
        the timeout; True when done. Raises KafkaUnavailable when Kafka cannot be read."""
        topic = self.settings.topics.control_acks
        consumer = Consumer(
            {
                **self._client_config(),
                "group.id": f"fleetward-operator.acks.{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "socket.timeout.ms": int(self.settings.kafka.timeout_seconds * 1000),
            }
        )
        try:
            await asyncio.to_thread(self._assign_from, consumer, topic, since)
            deadline = time.monotonic() + timeout
            while not done(book):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                messages = await asyncio.to_thread(consumer.consume, 500, min(0.2, left))
                for m in messages:
                    if m.error():
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("control-acks: %s", m.error())
                        continue
                    try:
                        book.add(parse_ack(m.value() or b""))
                    except EnvelopeError as e:
                        log.warning("ignoring an invalid ack at offset %d: %s", m.offset(), e)
            return True
        finally:
            await asyncio.to_thread(consumer.close)

    def _assign_from(self, consumer: Consumer, topic: str, since: float) -> None:
        try:
            md = consumer.list_topics(topic, timeout=self.settings.kafka.timeout_seconds)
            parts = md.topics[topic].partitions if topic in md.topics else {}
            if not parts:
                raise KafkaUnavailable(f"topic {topic} does not exist yet")
            wanted = [TopicPartition(topic, p, int(since * 1000)) for p in parts]
            found = consumer.offsets_for_times(wanted, timeout=self.settings.kafka.timeout_seconds)
        except KafkaException as e:
            raise KafkaUnavailable(str(e.args[0]) if e.args else repr(e)) from e
        # -1 (no message at or after `since`): start at the end, where the acks will land.
        consumer.assign([TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else -1) for tp in found])

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(1)


def scope_is_everything(switch: dict[str, Any]) -> bool:
    scope = (switch.get("spec") or {}).get("scope") or {}
    return not scope.get("namespaces") and scope.get("agentSelector") is None


def order_agents(switch: dict[str, Any], covered: list[str]) -> list[str] | None:
    """The `agents` of an order: [] ("every agent", also ones this operator does not know)
    for an empty scope; the covered agents otherwise; None when a narrowed scope covers
    nothing, so that no order is sent (an empty list would stop every agent)."""
    if scope_is_everything(switch):
        return []
    return covered or None


def new_order(
    type_: str, switch: dict[str, Any], agents: list[str], *, drain_deadline: float | None = None
) -> ControlMessage:
    """An order for `agents`; a halt carries the switch's mode, timeout, reason, whether to
    close sessions, and `drain_deadline` (epoch seconds) when given."""
    spec = switch.get("spec") or {}
    halt = type_ == "halt"
    deadline = datetime.fromtimestamp(drain_deadline, UTC) if halt and drain_deadline is not None else None

    def order(scope: dict[str, Any] | None) -> ControlMessage:
        return ControlMessage.new(
            type_,  # type: ignore[arg-type]
            kill_switch=switch["metadata"]["name"],
            generation=int(switch["metadata"].get("generation") or 1),
            agents=agents,
            scope=scope,
            mode=spec.get("mode", "drain") if halt else None,
            drain_timeout_seconds=int(spec.get("drainTimeoutSeconds", DEFAULT_DRAIN_TIMEOUT_SECONDS)) if halt else None,
            drain_deadline=deadline,
            reason=(spec.get("reason") or None) if halt else None,
            close_sessions=bool((spec.get("actions") or {}).get("closeSessions", True)) if halt else None,
        )

    try:
        return order(spec.get("scope") or {})
    except EnvelopeError as e:
        # The scope is only informational (instances act on `agents`): it must never stop an
        # order. The wire carries the CRD's own Scope model, so only a switch stored under
        # another version's schema can get here.
        log.warning(
            "KillSwitch %s: its scope cannot be carried in the order (%s); sent without it",
            switch["metadata"]["name"],
            e,
        )
        return order(None)
