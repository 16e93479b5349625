"""The Rust gateway as a real process against the local cluster's Kafka: every replica serves
every session, resume misses nothing, a slow client is cut off (4008) without slowing anyone,
shutdown closes with 1001, and the size, expiry and connection limits hold (SPEC §5, §5.1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleetward.devcluster.services import Kafka
from tests.gateway_support import GatewayProcess, KafkaWriter, Topics, event

SECRET = "delivery-test-secret-0123456789-abcdef"
ROUTER = "support/router"


@pytest.fixture(scope="module")
def topics(kafka: Kafka) -> Topics:
    t = Topics()
    t.create(kafka.bootstrap, [ROUTER])
    return t


@pytest.fixture(scope="module")
def writer(kafka: Kafka) -> KafkaWriter:
    return KafkaWriter(kafka.bootstrap)


@pytest.fixture(scope="module")
def gateways(kafka: Kafka, topics: Topics, tmp_path_factory) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    logs = tmp_path_factory.mktemp("gateway-logs")
    a = GatewayProcess(kafka.bootstrap, topics, SECRET, logs / "gw-a.log", instance="gw-a").start()
    # gw-b keeps only 2 events per session in memory, so resumes there read Kafka.
    b = GatewayProcess(
        kafka.bootstrap, topics, SECRET, logs / "gw-b.log", "--history-per-session=2", instance="gw-b"
    ).start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def connect(gw: GatewayProcess, session: str, query: str = "", **kw):
    return websockets.connect(
        gw.url(session, query),
        additional_headers={"Authorization": "Bearer " + gw.token(session)},
        open_timeout=10,
        **kw,
    )


async def frames(ws, n: int, timeout: float = 20) -> list[dict]:
    return [json.loads(await asyncio.wait_for(ws.recv(), timeout)) for _ in range(n)]


def sequences(fs: list[dict]) -> list[int]:
    return [f["event"]["sequence"] for f in fs]


async def close_code(ws, timeout: float = 30) -> int:
    """Read until the server closes; the close code it sent."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else 1006


def test_each_replica_serves_every_session(gateways, topics: Topics, writer: KafkaWriter):
    gw_a, gw_b = gateways

    async def main() -> None:
        async with (
            connect(gw_a, "deliv-a") as on_a,
            connect(gw_b, "deliv-b") as on_b,
            connect(gw_b, "deliv-a") as a_on_b,
        ):
            sent: dict[str, list[tuple[int, int]]] = {"deliv-a": [], "deliv-b": []}
            for seq in range(5):
                for session in sent:
                    sent[session].append(writer.send(topics.events, session, event(session, seq)))
            got_a, got_b, got_a_on_b = await frames(on_a, 5), await frames(on_b, 5), await frames(a_on_b, 5)
            assert sequences(got_a) == sequences(got_b) == sequences(got_a_on_b) == [0, 1, 2, 3, 4]
            assert {f["event"]["sessionId"] for f in got_a + got_a_on_b} == {"deliv-a"}
            assert {f["event"]["sessionId"] for f in got_b} == {"deliv-b"}
            # Positions are the Kafka positions the events were written at.
            assert [f["position"] for f in got_a] == [f"{p}:{o}" for p, o in sent["deliv-a"]]
            assert [f["position"] for f in got_a_on_b] == [f"{p}:{o}" for p, o in sent["deliv-a"]]
            # Nothing else arrives: no broadcast of other sessions' events.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(on_a.recv(), 1.5)

    asyncio.run(main())
    assert gw_a.metric("fleetward_gateway_deliveries_total") >= 5
    assert gw_a.metric("fleetward_gateway_delivery_latency_seconds_count") >= 5


def test_after_a_restart_resumes_are_served_from_the_history_read_back_at_start(
    kafka: Kafka, topics: Topics, writer: KafkaWriter, tmp_path
):
    """A gateway reads the last `--history-backfill` events of each partition back into its
    resume history before it is ready, so clients reconnecting after a restart (the old
    process's history is gone) get what they missed from memory, not each from its own Kafka
    read; with the read-back off, the same resume reads Kafka."""
    session = "deliv-restart"
    positions = [writer.send(topics.events, session, event(session, seq)) for seq in range(6)]
    since = "{}:{}".format(*positions[1])  # the client had received events 0 and 1

    async def resume(gw: GatewayProcess) -> list[int]:
        async with connect(gw, session, f"since={since}") as ws:
            got = sequences(await frames(ws, 4))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 1)  # nothing more, no duplicate
            return got

    for name, args, served_by in (
        ("gw-restarted", (), "history"),
        ("gw-no-backfill", ("--history-backfill=0",), "kafka"),
    ):
        gw = GatewayProcess(kafka.bootstrap, topics, SECRET, tmp_path / f"{name}.log", *args, instance=name).start()
        try:
            assert asyncio.run(resume(gw)) == [2, 3, 4, 5], name
            assert gw.metric("fleetward_gateway_resumes_total", outcome=served_by) == 1, name
            other = {"history": "kafka", "kafka": "history"}[served_by]
            assert gw.metric("fleetward_gateway_resumes_total", outcome=other) == 0, name
        finally:
            gw.stop()


def test_resume_misses_nothing_in_order(gateways, topics: Topics, writer: KafkaWriter):
    gw_a, gw_b = gateways
    session = "deliv-resume"

    async def main() -> None:
        async with connect(gw_a, session) as ws:
            for seq in range(3):
                writer.send(topics.events, session, event(session, seq))
            first = await frames(ws, 3)
        assert sequences(first) == [0, 1, 2]
        last = first[-1]["position"]
        # Missed while disconnected; more than gw-b keeps in memory, so it reads them from Kafka.
        for seq in range(3, 8):
            writer.send(topics.events, session, event(session, seq))
        kafka_resumes = gw_b.metric("fleetward_gateway_resumes_total", outcome="kafka")
        async with connect(gw_b, session, f"since={last}") as ws:
            missed = await frames(ws, 5)
            writer.send(topics.events, session, event(session, 8))
            live = await frames(ws, 1)
            assert sequences(missed) == [3, 4, 5, 6, 7]
            assert sequences(live) == [8]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 1.5)  # no duplicate after the seam
        assert gw_b.metric("fleetward_gateway_resumes_total", outcome="kafka") == kafka_resumes + 1
        # The same resume on gw-a comes from its history.
        async with connect(gw_a, session, f"since={last}") as ws:
            assert sequences(await frames(ws, 6)) == [3, 4, 5, 6, 7, 8]
        # A position this gateway cannot serve: recovery_failed first.
        async with connect(gw_a, session, "since=999:0") as ws:
            first_frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first_frame["control"] == "recovery_failed", first_frame

    asyncio.run(main())


def test_positions_that_cannot_be_served_answer_recovery_failed_then_live_events(
    gateways, topics: Topics, writer: KafkaWriter
):
    """SPEC §5.1: a resume that cannot be served gets `recovery_failed` first, then events.
    A position past the partition's end was taken as "already delivered" and the client got
    nothing until Kafka's offsets passed it; a malformed one was refused with 400."""
    gw_a, _ = gateways
    session = "deliv-unservable"

    async def main() -> None:
        async with connect(gw_a, session) as ws:
            sent = [writer.send(topics.events, session, event(session, seq)) for seq in range(2)]
            assert sequences(await frames(ws, 2)) == [0, 1]
        partition = sent[0][0]
        async with connect(gw_a, session, f"since={partition}:999999999") as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first["control"] == "recovery_failed" and "past the end" in first["reason"], first
            assert first["since"] == f"{partition}:999999999"
            # What the gateway holds of the session, then live events.
            assert sequences(await frames(ws, 2)) == [0, 1]
            writer.send(topics.events, session, event(session, 2))
            assert sequences(await frames(ws, 1)) == [2]
        async with connect(gw_a, session, "since=yesterday") as ws:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first == {
                "control": "recovery_failed",
                "since": "yesterday",
                "reason": "not a position: expected <partition>:<offset>, two non-negative integers",
            }
            writer.send(topics.events, session, event(session, 3))
            assert sequences(await frames(ws, 1)) == [3]
        # The token is checked first: without one, whatever else is wrong, 401.
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(gw_a.url("bad%20session", "since=yesterday"), open_timeout=10):
                pass
        assert refused.value.response.status_code == 401

    asyncio.run(main())


def test_bad_frames_get_a_documented_close_and_a_client_close_is_answered(gateways):
    gw_a, _ = gateways

    async def main() -> None:
        async with connect(gw_a, "frames-utf8") as ws:
            await ws.send(b'{"type": "user_message", "text": "\xff\xfe"}', text=True)
            assert await close_code(ws) == 1007
        # Far over the limit (64 KiB): the library stops reading mid-message; the client still
        # gets the close frame, not a reset.
        async with connect(gw_a, "frames-huge", max_size=None) as ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "user_message", "text": "y" * 1_000_000}))
            assert await close_code(ws) == 1009
        async with connect(gw_a, "frames-close", close_timeout=5) as ws:
            started = asyncio.get_running_loop().time()
            await ws.close()
            assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000  # answered
            assert asyncio.get_running_loop().time() - started < 4

    asyncio.run(main())


def test_slow_client_is_closed_4008_and_fast_one_keeps_up(
    kafka: Kafka, topics: Topics, writer: KafkaWriter, tmp_path: Path
):
    gw = GatewayProcess(
        kafka.bootstrap, topics, SECRET, tmp_path / "gw-slow.log", "--outbound-queue=48", instance="gw-slow"
    ).start()
    n = 150
    # Large frames fill the socket buffers of a client that stops reading: 150 of 90 kB are
    # far more than its queue (48 frames) and the kernel's buffers hold. The queue is that
    # deep so that the fast client has slack when the machine is busy (with 4, a gateway
    # writer starved for a moment by other work closed the fast client too).
    big = "x" * 90_000

    async def main() -> None:
        # The slow client: a tiny receive buffer and a websockets queue of one frame, never read.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        async with (
            websockets.connect(
                gw.url("slow-s"),
                sock=sock,
                max_queue=1,
                additional_headers={"Authorization": "Bearer " + gw.token("slow-s")},
            ) as slow,
            connect(gw, "fast-s") as fast,
        ):

            def produce() -> None:
                for seq in range(n):
                    writer.send(topics.events, "slow-s", event("slow-s", seq, data={"role": "assistant", "text": big}))
                    writer.send(topics.events, "fast-s", event("fast-s", seq))

            # The fast client reads as the events come (production runs in a thread meanwhile).
            fast_reader = asyncio.create_task(frames(fast, n, timeout=30))
            await asyncio.to_thread(produce)
            assert sequences(await fast_reader) == list(range(n))
            # Now the slow client reads what reached it, then the close frame.
            received: list[dict] = []
            code = 0
            try:
                async with asyncio.timeout(30):
                    while True:
                        received.append(json.loads(await slow.recv()))
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else 1006
            assert code == 4008, f"slow client closed with {code}"
            assert 0 < len(received) < n
            assert sequences(received) == list(range(len(received)))
        # It resumes from its last position and gets the rest, in order.
        async with connect(gw, "slow-s", f"since={received[-1]['position']}") as again:
            rest = await frames(again, n - len(received), timeout=30)
            assert sequences(received + rest) == list(range(n))

    try:
        asyncio.run(main())
        assert gw.metric("fleetward_gateway_slow_client_closes_total") == 1
        assert gw.metric("fleetward_gateway_closes_total", code="4008") == 1
    finally:
        gw.stop()


def test_sigterm_closes_clients_with_1001(kafka: Kafka, topics: Topics, tmp_path: Path):
    gw = GatewayProcess(kafka.bootstrap, topics, SECRET, tmp_path / "gw-term.log", instance="gw-term").start()

    async def main() -> list[int]:
        async with connect(gw, "term-1") as c1, connect(gw, "term-2") as c2:
            await asyncio.sleep(0.3)
            gw.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(close_code(c1), close_code(c2)))

    try:
        assert asyncio.run(main()) == [1001, 1001]
        assert gw.proc.wait(20) == 0
        assert "shutting down" in gw.logs()
    finally:
        gw.stop()


def test_connection_limit_answers_503(kafka: Kafka, topics: Topics, tmp_path: Path):
    gw = GatewayProcess(
        kafka.bootstrap, topics, SECRET, tmp_path / "gw-limit.log", "--max-connections=1", instance="gw-limit"
    ).start()

    async def main() -> None:
        async with connect(gw, "limit-1"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(gw, "limit-2"):
                    pass
            assert refused.value.response.status_code == 503
        # The slot is free again once the first connection closed.
        await asyncio.sleep(0.5)
        async with connect(gw, "limit-2"):
            pass

    try:
        asyncio.run(main())
    finally:
        gw.stop()


def test_too_big_message_closes_1009_and_expired_token_4001(gateways):
    gw_a, _ = gateways

    async def main() -> None:
        async with connect(gw_a, "big-1") as ws:
            await ws.send(json.dumps({"type": "user_message", "text": "y" * 70_000}))
            assert await close_code(ws) == 1009
        # A token valid for 2 more seconds (+5 s leeway): the connection is closed when it expires.
        token = gw_a.token("exp-1", ttl=2)
        async with websockets.connect(gw_a.url("exp-1"), additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            assert await close_code(ws, timeout=20) == 4001

    asyncio.run(main())
