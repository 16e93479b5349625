"""Kafka stopped and restarted under load loses no event for a resuming client (issue 8).

The session-wide `kafka` fixture cannot be restarted mid-session, so this module runs its OWN
broker (fleetward.devcluster's `Kafka`, own data dir and ports) and a gateway against it. A
producer keeps producing one session's events the whole time; a client follows the session.
The broker is stopped twice, first with SIGTERM then with SIGKILL; each time the gateway must
stay up with `/readyz` false, the client stays connected, then disconnects; the broker restarts
on the same data dir and port; the client resumes with `?since=<its last position>` and must
receive every event the producer got acked, exactly once and in order."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from websockets.exceptions import ConnectionClosed

from fleetward.devcluster import layout
from fleetward.devcluster.services import Kafka
from tests.gateway_support import GatewayProcess, Topics, event

SECRET = "kafka-restart-test-secret-0123456789-abcd"
SESSION = "restart-s1"
ROUTER = "support/router"
# Upper bounds of the waits (each wait ends as soon as its condition holds).
KAFKA_START = 180.0
READY_CHANGE = 60.0
FRAME_WAIT = 60.0


class SessionProducer:
    """Produces SESSION's events (sequence 0, 1, ...) every `interval` seconds in a thread,
    idempotently (a retry after a broker crash never duplicates or reorders), and records
    the position of every event Kafka acknowledged."""

    def __init__(self, bootstrap: str, topic: str, interval: float = 0.02) -> None:
        self.topic, self.interval = topic, interval
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "linger.ms": 0,
                # Events queued during an outage are delivered after the restart, not dropped.
                "message.timeout.ms": 600_000,
                "reconnect.backoff.max.ms": 1000,
                # Connection failures during the outages go to the test log, not stderr.
                "logger": logging.getLogger("kafka-restart-producer"),
            }
        )
        self.acked: dict[int, tuple[int, int]] = {}  # sequence -> (partition, offset)
        self.failed: dict[int, str] = {}
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-producer", daemon=True)

    def _delivered(self, sequence: int):
        def report(err, msg) -> None:
            with self._lock:
                if err is None:
                    self.acked[sequence] = (msg.partition(), msg.offset())
                else:
                    self.failed[sequence] = str(err)

        return report

    def _run(self) -> None:
        while not self._stop.is_set():
            seq = self.sent
            self.producer.produce(
                self.topic, key=SESSION, value=event(SESSION, seq, agent=ROUTER), on_delivery=self._delivered(seq)
            )
            self.sent += 1
            self.producer.poll(0)
            self._stop.wait(self.interval)

    def start(self) -> SessionProducer:
        self._thread.start()
        return self

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def stop(self) -> None:
        """Stop producing and wait for the delivery report of everything produced."""
        self.halt()
        remaining = self.producer.flush(120)
        assert remaining == 0, f"{remaining} events still unacknowledged 120 s after the last one"

    def expected(self) -> list[tuple[int, str]]:
        """(sequence, position) of every acked event, in Kafka order."""
        with self._lock:
            ordered = sorted(self.acked.items(), key=lambda kv: kv[1])
        return [(seq, f"{p}:{o}") for seq, (p, o) in ordered]


async def wait_until_async(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f} s"
        await asyncio.sleep(0.1)


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[Kafka]:
    """A broker of this test's own: data in tmp_path, ports of its own, stopped afterwards."""
    broker = Kafka(tmp_path / "state", layout.binaries())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def kill_broker(broker: Kafka, sig: int) -> None:
    """Stop the broker with `sig` (SIGTERM: its orderly shutdown; SIGKILL: a crash)."""
    assert broker.proc is not None and broker.proc.proc is not None
    if sig == signal.SIGTERM:
        broker.proc.stop(timeout=60)
    else:
        os.killpg(broker.proc.proc.pid, signal.SIGKILL)
        broker.proc.proc.wait(30)
    assert not broker.proc.alive()


def restart_broker(broker: Kafka) -> None:
    """Start the same broker process again: same properties, data dir and ports. (Not
    `Kafka.start()`: it formats the storage with a new cluster id, which a formatted data dir
    refuses.)"""
    assert broker.proc is not None and not broker.proc.alive()
    broker.proc.start()
    admin = AdminClient({**broker.client_config(), "logger": logging.getLogger("kafka-restart-admin")})
    broker.proc.wait_ready(lambda: bool(admin.list_topics(timeout=2).brokers), KAFKA_START)


class SessionClient:
    """A client of SESSION as docs/gateway-protocol.md asks: it reads every frame as it comes
    (so pings are answered), keeps the last position, and when closed with 4008 (its queue
    overflowed, e.g. during the burst that follows an outage) reconnects with `since`."""

    MAX_SLOW_CLOSES = 20

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.received: list[dict] = []  # every event frame, over all connections
        self.slow_closes = 0
        self.ws = None
        self._task: asyncio.Task | None = None

    def start(self, since: str | None = None) -> None:
        self._task = asyncio.create_task(self._run(since))

    async def _run(self, since: str | None) -> None:
        while True:
            query = f"since={since}" if since else ""
            headers = {"Authorization": f"Bearer {self.gw.token(SESSION)}"}
            async with websockets.connect(self.gw.url(SESSION, query), additional_headers=headers) as ws:
                self.ws = ws
                try:
                    async for message in ws:
                        frame = json.loads(message)
                        assert "event" in frame, f"unexpected frame {frame}"
                        self.received.append(frame)
                except ConnectionClosed:
                    pass
            assert ws.close_code == 4008, f"the gateway closed the connection with {ws.close_code}"
            self.slow_closes += 1
            assert self.slow_closes <= self.MAX_SLOW_CLOSES, "closed for slowness again and again"
            since = self.received[-1]["position"] if self.received else since

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def leave(self) -> str:
        """Disconnect; the last position received."""
        assert self._task is not None
        if self._task.done():
            self._task.result()  # raises what ended it
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self.ws is not None:
            await self.ws.close()
        return self.received[-1]["position"]


def test_kafka_restart_under_load_loses_no_event_for_a_resuming_client(own_kafka: Kafka, tmp_path: Path):
    topics = Topics()
    topics.create(own_kafka.bootstrap, [ROUTER])
    gw = GatewayProcess(
        own_kafka.bootstrap,
        topics,
        SECRET,
        tmp_path / "gw.log",
        # Only a few events in memory: resuming after the outage reads Kafka, not the history.
        "--history-per-session=4",
        instance="gw-restart",
    ).start()
    producer = SessionProducer(own_kafka.bootstrap, topics.events)
    outages: list[dict] = []

    async def main() -> SessionClient:
        client = SessionClient(gw)
        client.start()
        await wait_until_async(lambda: client.ws is not None, 10, "the first connection")
        producer.start()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # Under load: the client follows the live stream for a while.
            target = len(client.received) + 25
            await wait_until_async(lambda t=target: len(client.received) >= t, FRAME_WAIT, "live events")
            acked_before = producer.acked_count()

            stopped = time.monotonic()
            await asyncio.to_thread(kill_broker, own_kafka, sig)
            await wait_until_async(lambda: gw.http("/readyz")[0] == 503, READY_CHANGE, "/readyz false")
            not_ready_after = time.monotonic() - stopped
            status, body = gw.http("/readyz")
            assert status == 503 and "Kafka" in body, body
            # The gateway is alive and so is the client's connection (it answers a ping).
            assert gw.proc is not None and gw.proc.poll() is None
            pong = await client.ws.ping()
            await asyncio.wait_for(pong, 10)
            assert client.alive(), "the connection ended while Kafka was down"
            # The client leaves, remembering the last position it read.
            last = await client.leave()

            restarted = time.monotonic()
            await asyncio.to_thread(restart_broker, own_kafka)
            await wait_until_async(gw.ready, READY_CHANGE, "/readyz true after the restart")
            ready_after = time.monotonic() - restarted
            # Keep producing after the restart before the client comes back.
            await wait_until_async(
                lambda n=acked_before: producer.acked_count() >= n + 50, KAFKA_START, "acks after the restart"
            )
            client.start(since=last)
            outages.append(
                {
                    "signal": signal.Signals(sig).name,
                    "not_ready_s": round(not_ready_after, 2),
                    "ready_again_s": round(ready_after, 2),
                    "resumed_from": last,
                }
            )
        # The producer stops; the client must end with exactly what Kafka acknowledged.
        await asyncio.to_thread(producer.stop)
        expected = len(producer.expected())
        await wait_until_async(lambda: len(client.received) >= expected, FRAME_WAIT, "every acked event")
        await asyncio.sleep(1.5)  # a duplicate would arrive right behind the last event
        await client.leave()
        return client

    try:
        client = asyncio.run(main())
    finally:
        producer.halt()
        gw.stop()

    expected = producer.expected()
    assert not producer.failed, f"the producer was refused: {producer.failed}"
    assert len(expected) == producer.sent
    got = [(f["event"]["sequence"], f["position"]) for f in client.received]
    assert got == expected, (
        f"the client's events differ from the acknowledged ones: {len(got)} received, {len(expected)} acked; "
        f"first difference at {next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)}"
    )
    assert gw.proc is not None and gw.proc.returncode == 0, "the gateway did not shut down cleanly"
    print(
        f"\n{len(expected)} events acked and delivered exactly once, in order, across {outages}; "
        f"the client was closed with 4008 and resumed {client.slow_closes} time(s)"
    )
