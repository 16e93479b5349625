"""Client frames to agent commands, the kill switch over the control topic, and the
after-runner verification, with the real gateway binary and the local cluster's Kafka
(SPEC §5, §5.1, §7)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import websockets
from confluent_kafka import Consumer, TopicPartition
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleetward.api.envelopes import ControlMessage, parse_ack, parse_alert, parse_command
from fleetward.devcluster.services import Kafka
from tests.gateway_support import GatewayProcess, KafkaWriter, Topics, event, read_topic

SECRET = "control-test-secret-0123456789-abcdef"
ROUTER, BILLING = "support/router", "support/billing"


@pytest.fixture(scope="module")
def topics(kafka: Kafka) -> Topics:
    t = Topics()
    t.create(kafka.bootstrap, [ROUTER, BILLING])
    return t


@pytest.fixture(scope="module")
def writer(kafka: Kafka) -> KafkaWriter:
    return KafkaWriter(kafka.bootstrap)


@pytest.fixture(scope="module")
def gw(kafka: Kafka, topics: Topics, tmp_path_factory) -> Iterator[GatewayProcess]:
    g = GatewayProcess(kafka.bootstrap, topics, SECRET, tmp_path_factory.mktemp("gw") / "gw.log", instance="gw-ctl")
    g.start()
    try:
        yield g
    finally:
        g.stop()


def connect(gw: GatewayProcess, session: str, **token_claims):
    return websockets.connect(
        gw.url(session),
        open_timeout=10,
        additional_headers={"Authorization": "Bearer " + gw.token(session, **token_claims)},
    )


def commands(kafka: Kafka, topic: str, session: str, until) -> list[dict]:
    msgs = read_topic(kafka.bootstrap, topic, lambda ms: until([m for m in ms if m["key"] == session]))
    return [m for m in msgs if m["key"] == session]


def test_user_message_becomes_a_command_with_the_verified_identity(gw, kafka: Kafka, topics: Topics):
    async def main() -> None:
        async with connect(gw, "in-1", sub="carol", role="user") as ws:
            await ws.send(json.dumps({"type": "user_message", "text": "my invoice is wrong", "clientMessageId": "m-1"}))
            # Bad frames get an error frame and the connection stays usable.
            await ws.send("{not json")
            err = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert err["control"] == "error" and err["code"] == "invalid_frame"
            # Identity written in the frame is ignored (not refused): the token's is used.
            spoofed = {"type": "user_message", "text": "still there?", "sub": "mallory", "role": "operator"}
            await ws.send(json.dumps({**spoofed, "user": {"sub": "mallory", "role": "operator"}}))

    asyncio.run(main())
    got = commands(kafka, topics.requests(ROUTER), "in-1", lambda ms: len(ms) >= 2)
    assert len(got) == 2
    first = parse_command(json.dumps(got[0]["value"]))  # the shared Python model accepts it
    assert first.type == "user_message" and first.agent == ROUTER and first.session_id == "in-1"
    assert first.user.sub == "carol" and first.user.role == "user"
    assert first.data.text == "my invoice is wrong"
    assert first.idempotency_key == "in-1:m-1"
    second = parse_command(json.dumps(got[1]["value"]))
    assert second.data.text == "still there?" and (second.user.sub, second.user.role) == ("carol", "user")
    # The produced message continues a trace: traceparent header carries the command's traceId.
    assert got[0]["headers"]["traceparent"].split("-")[1] == first.trace_id


def test_a_message_for_an_agent_without_a_topic_is_refused_at_once_and_others_still_get_through(
    gw, kafka: Kafka, topics: Topics
):
    """An agent that was never deployed has no request topic: the frame is refused within a
    second or two (the producer waited out its 10 s timeout before, counted as Kafka down,
    and three of those opened the breaker for every client)."""

    async def main() -> None:
        async with connect(gw, "in-ghost", agent="support/ghost") as ghost:
            for n in range(3):
                started = time.monotonic()
                await ghost.send(json.dumps({"type": "user_message", "text": f"hello {n}"}))
                err = json.loads(await asyncio.wait_for(ghost.recv(), 9))
                assert err["control"] == "error" and err["code"] == "refused", err
                assert time.monotonic() - started < 9
        async with connect(gw, "in-after-ghost") as ws:
            await ws.send(json.dumps({"type": "user_message", "text": "still works"}))

    asyncio.run(main())
    got = commands(kafka, topics.requests(ROUTER), "in-after-ghost", lambda ms: len(ms) >= 1)
    assert [m["value"]["data"]["text"] for m in got] == ["still works"]


def test_a_user_cannot_decide_and_nothing_is_produced(gw, kafka: Kafka, topics: Topics):
    async def main() -> None:
        async with connect(gw, "in-2", role="user") as ws:
            await ws.send(json.dumps({"type": "approval_decision", "runId": "run-1", "decision": "approve"}))
            err = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert err["control"] == "error" and err["code"] == "forbidden", err
            # A marker after the refused decision: once it is on the topic, anything produced before it is too.
            await ws.send(json.dumps({"type": "user_message", "text": "marker"}))

    asyncio.run(main())
    got = commands(
        kafka, topics.requests(ROUTER), "in-2", lambda ms: any(m["value"]["type"] == "user_message" for m in ms)
    )
    assert [m["value"]["type"] for m in got] == ["user_message"]
    other = read_topic(kafka.bootstrap, topics.requests(BILLING), lambda ms: False, timeout=2)
    assert not [m for m in other if m["key"] == "in-2"]
    assert gw.metric("fleetward_gateway_inbound_frames_total", type="approval_decision", outcome="forbidden") >= 1


def test_a_reviewer_decision_resumes_the_agent_that_asked(gw, kafka: Kafka, topics: Topics, writer: KafkaWriter):
    session = "in-3"

    async def main() -> None:
        async with connect(gw, session, sub="rita", role="reviewer", agent=ROUTER) as ws:
            # The billing specialist (not the session's router) raises the approval.
            writer.send(
                topics.events,
                session,
                event(
                    session,
                    0,
                    kind="approval_required",
                    agent=BILLING,
                    run="run-b7",
                    data={"kind": "draft", "draft": "Refund 12 EUR", "reason": "refunds", "timeoutSeconds": 600},
                ),
            )
            frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
            assert frame["event"]["type"] == "approval_required"
            await ws.send(
                json.dumps(
                    {"type": "approval_decision", "runId": "run-b7", "decision": "edit", "edit": "Refund 10 EUR"}
                )
            )
            await asyncio.sleep(0.5)

    asyncio.run(main())
    got = commands(kafka, topics.requests(BILLING), session, lambda ms: len(ms) >= 1)
    assert len(got) == 1
    cmd = parse_command(json.dumps(got[0]["value"]))
    assert cmd.type == "resume" and cmd.agent == BILLING
    assert (cmd.data.run_id, cmd.data.decision, cmd.data.edit, cmd.data.reviewer) == (
        "run-b7",
        "edit",
        "Refund 10 EUR",
        "rita",
    )
    assert cmd.user.role == "reviewer"


def control(kind: str, generation: int, agents: list[str], switch: str = "stop-billing", **extra) -> str:
    if kind == "halt":
        extra = {"mode": "drain", "drain_timeout_seconds": 30, **extra}
    return ControlMessage.new(
        kind, kill_switch=switch, generation=generation, agents=agents, reason="refund loop", **extra
    ).to_json()


def acks(kafka: Kafka, topics: Topics, kind: str) -> list:
    msgs = read_topic(
        kafka.bootstrap,
        topics.acks,
        lambda ms: any(m["value"]["type"] == kind and m["value"]["instanceId"] == "gw-ctl" for m in ms),
    )
    return [parse_ack(json.dumps(m["value"])) for m in msgs if m["value"]["type"] == kind]


def test_halt_and_resume_over_the_control_topic(gw, kafka: Kafka, topics: Topics, writer: KafkaWriter):
    async def main() -> None:
        async with connect(gw, "halt-b", agent=BILLING) as billing, connect(gw, "halt-r", agent=ROUTER) as router:
            writer.send(topics.control, "stop-billing", control("halt", 1, [BILLING]))
            halted = json.loads(await asyncio.wait_for(billing.recv(), 15))
            assert halted["control"] == "halted" and halted["killSwitch"] == "stop-billing", halted
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(billing.recv(), 10)
            assert closed.value.rcvd.code == 4009
            # New sessions of the halted agent are refused; other agents are untouched.
            with pytest.raises(InvalidStatus) as refused:
                async with connect(gw, "halt-b2", agent=BILLING):
                    pass
            assert refused.value.response.status_code == 403
            writer.send(topics.events, "halt-r", event("halt-r", 0))
            assert json.loads(await asyncio.wait_for(router.recv(), 15))["event"]["sessionId"] == "halt-r"

            writer.send(topics.control, "stop-billing", control("resume", 1, [BILLING]))
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with connect(gw, "halt-b3", agent=BILLING):
                        break
                except InvalidStatus as e:
                    assert e.response.status_code == 403
                    assert time.monotonic() < deadline, "still refused after resume"
                    await asyncio.sleep(0.3)

    asyncio.run(main())
    halted_acks = acks(kafka, topics, "halted")
    assert halted_acks[0].component == "gateway" and halted_acks[0].instance == "gw-ctl"
    assert halted_acks[0].counts["sessionsClosed"] == 1 and halted_acks[0].generation == 1
    assert halted_acks[0].agents == [BILLING]
    assert acks(kafka, topics, "resumed")[0].kill_switch == "stop-billing"


def test_a_halt_with_close_sessions_false_keeps_connected_sessions(
    gw, kafka: Kafka, topics: Topics, writer: KafkaWriter
):
    """KillSwitch actions.closeSessions: false: connected sessions stay open and keep receiving
    events; new sessions of the agent are refused as with any halt."""
    agent = "support/keep-open"

    async def main() -> None:
        async with connect(gw, "keep-a", agent=agent) as ws:
            writer.send(topics.control, "keep-open", control("halt", 1, [agent], "keep-open", close_sessions=False))
            deadline = time.monotonic() + 15
            while True:  # the halt is applied once new sessions are refused
                try:
                    async with connect(gw, "keep-b", agent=agent):
                        assert time.monotonic() < deadline, "the halt was not applied"
                        await asyncio.sleep(0.3)
                except InvalidStatus as e:
                    assert e.response.status_code == 403
                    break
            writer.send(topics.events, "keep-a", event("keep-a", 0))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
            assert frame["event"]["sessionId"] == "keep-a", frame  # no halted frame, no close
            writer.send(topics.control, "keep-open", control("resume", 1, [agent], "keep-open"))

    asyncio.run(main())
    mine = read_topic(
        kafka.bootstrap,
        topics.acks,
        lambda ms: any(m["value"]["type"] == "halted" and m["value"]["killSwitch"] == "keep-open" for m in ms),
    )
    (ack,) = [parse_ack(json.dumps(m["value"])) for m in mine if m["value"]["killSwitch"] == "keep-open"][:1]
    assert ack.type == "halted" and ack.counts["sessionsClosed"] == 0


class Health(BaseHTTPRequestHandler):
    """/ok answers 200, /broken 503: a fix that held and one that did not."""

    def do_GET(self) -> None:
        self.send_response({"/ok": 200, "/broken": 503}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_after_runner_alerts_when_the_fix_did_not_hold(gw, kafka: Kafka, topics: Topics, writer: KafkaWriter):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        # The verify consumer joins its group after start; `resolved` events before that are not its share.
        deadline = time.monotonic() + 60
        while gw.metric("fleetward_gateway_verify_partitions") < 3:
            assert time.monotonic() < deadline, "verify consumer never got the events partitions"
            time.sleep(0.5)
        for session, path in (("fix-held", "/ok"), ("fix-broke", "/broken")):
            writer.send(
                topics.events,
                session,
                event(
                    session,
                    0,
                    kind="resolved",
                    data={"summary": "refund issued", "verify": {"url": base + path, "delaySeconds": 1}},
                ),
            )
        alerts = read_topic(kafka.bootstrap, topics.alerts, lambda ms: len(ms) >= 1, timeout=30)
        assert [a["key"] for a in alerts] == ["fix-broke"]
        alert = alerts[0]["value"]
        parse_alert(alert)  # the shared contract (schemas/envelopes.schema.json)
        assert alert["type"] == "verification_failed" and alert["data"]["status"] == 503
        assert alert["data"]["url"] == base + "/broken" and alert["sessionId"] == "fix-broke"
        deadline = time.monotonic() + 15
        while gw.metric("fleetward_gateway_verifications_total", outcome="healthy") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        # Only the broken one alerted, also after the healthy check finished.
        assert len(read_topic(kafka.bootstrap, topics.alerts, lambda ms: False, timeout=2)) == 1
    finally:
        server.shutdown()


def test_a_check_left_by_a_replica_that_died_is_run_by_the_next(kafka: Kafka, writer: KafkaWriter, tmp_path):
    """The after-runner's check is not lost with the replica that was waiting to run it: the
    committed position stays before the `resolved` event until its check finished, so the
    replica that takes the partition over reads it again and runs the check when it is due."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    own = Topics()  # its own topics and verify group: the module's gateway takes no share
    own.create(kafka.bootstrap, [BILLING])

    def replica(name: str) -> GatewayProcess:
        g = GatewayProcess(kafka.bootstrap, own, SECRET, tmp_path / f"{name}.log", instance=name).start()
        deadline = time.monotonic() + 60
        while g.metric("fleetward_gateway_verify_partitions") < 3:
            assert time.monotonic() < deadline, f"{name}: the verify consumer never got the partitions"
            time.sleep(0.3)
        return g

    first = replica("gw-verify-1")
    second = None
    try:
        produced = time.monotonic()
        broken = {"summary": "refund issued", "verify": {"url": base + "/broken", "delaySeconds": 8}}
        resolved = event("fix-broke", 0, kind="resolved", data=broken)
        first_event_id = json.loads(resolved)["id"]
        partition, offset = writer.send(own.events, "fix-broke", resolved)
        # The first replica started the check and committed the position before its event.
        group = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"{own.prefix}-verify"})
        try:
            deadline = time.monotonic() + 15
            while (
                first.metric("fleetward_gateway_verify_pending") < 1
                or group.committed([TopicPartition(own.events, partition)], timeout=5)[0].offset != offset
            ):
                assert time.monotonic() < deadline, "the first replica never started and committed the check"
                time.sleep(0.2)
        finally:
            group.close()
        first.stop(signal.SIGKILL)
        second = replica("gw-verify-2")
        alerts = read_topic(kafka.bootstrap, own.alerts, lambda ms: len(ms) >= 1, timeout=40)
        assert [a["key"] for a in alerts] == ["fix-broke"], "the check died with the first replica"
        alert = parse_alert(alerts[0]["value"])
        assert alert.data.status == 503 and alert.data.resolved_event_id == first_event_id
        assert time.monotonic() - produced >= 8, "the check ran before its delay"
        assert second.metric("fleetward_gateway_verifications_total", outcome="unhealthy") == 1
        # Once done, it is committed: a third replica in the group does not run it again. A later
        # check that holds shows when the third has read past it.
        second.stop()
        second = replica("gw-verify-3")
        held = {"summary": "token revoked", "verify": {"url": base + "/ok", "delaySeconds": 1}}
        # Same session, so the same partition, after the first.
        writer.send(own.events, "fix-broke", event("fix-broke", 1, kind="resolved", run="run-2", data=held))
        deadline = time.monotonic() + 30
        while second.metric("fleetward_gateway_verifications_total", outcome="healthy") < 1:
            assert time.monotonic() < deadline, "the third replica never ran the later check"
            time.sleep(0.3)
        assert second.metric("fleetward_gateway_verifications_total", outcome="unhealthy") == 0
        assert len(read_topic(kafka.bootstrap, own.alerts, lambda ms: False, timeout=2)) == 1
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()
        server.shutdown()
