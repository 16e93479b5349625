"""Kafka plumbing shared by intake, events and control: an asyncio-friendly producer that
waits for the broker's acknowledgement of each record, and consumer settings.

confluent-kafka (librdkafka) is thread-safe; its callbacks run on the thread that polls.
The producer is polled by one background thread that hands delivery reports back to the
event loop, so `await producer.send(...)` returns once the record is durable in Kafka
(acks=all, idempotent producer: retries neither duplicate nor reorder records).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer


class AsyncProducer:
    def __init__(self, client_config: Mapping[str, str], *, client_id: str) -> None:
        self._producer = Producer(
            {
                **client_config,
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                # Every send is awaited before the run goes on, so a session never has two
                # records to batch: lingering only delayed each event (4-6 per request) by 2 ms.
                # Records of concurrent runs still share a request while one is in flight.
                "linger.ms": 0,
                "message.timeout.ms": 30000,
            }
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="kafka-producer-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    async def send(
        self, topic: str, value: bytes | str, *, key: str | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, int]:
        """Produce one record and wait for its acknowledgement; returns (partition, offset)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, int]] = loop.create_future()

        def report(err: KafkaError | None, msg: Any) -> None:
            def settle() -> None:
                if done.done():
                    return
                if err is not None:
                    done.set_exception(KafkaException(err))
                else:
                    done.set_result((msg.partition(), msg.offset()))

            loop.call_soon_threadsafe(settle)

        payload = value.encode() if isinstance(value, str) else value
        hdrs = [(k, v.encode()) for k, v in (headers or {}).items()]
        while True:
            try:
                self._producer.produce(topic, payload, key=key, headers=hdrs, on_delivery=report)
                break
            except BufferError:  # local queue full: let the poll thread drain it
                await asyncio.sleep(0.05)
        return await done

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued; returns the number of records still undelivered."""
        self._stop.set()
        self._thread.join(timeout=2)
        return self._producer.flush(timeout)


def header_value(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for key, value in headers or []:
        if key == name and value is not None:
            return value.decode(errors="replace")
    return None
