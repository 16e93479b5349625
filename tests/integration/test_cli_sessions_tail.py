"""`fleetward sessions tail` as a user runs it (the installed command, in a subprocess)
against the local cluster's Kafka: only the asked-for session, in order, as lines or as
JSON; a bad record is a warning with its offset; following, idling out and Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid

import pytest

from fleetward.api.envelopes import SessionEvent
from fleetward.devcluster.process import wait_for
from tests.support.runtime import FLEETWARD, ensure_topics, produce

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def event(session: str, sequence: int, type_: str, data: dict, agent: str = "githouse/billing") -> SessionEvent:
    return SessionEvent.new(
        type_, session_id=session, agent=agent, run_id="run-1", trace_id=TRACE, sequence=sequence, data=data
    )


def script(session: str) -> list[SessionEvent]:
    """A session's events, one of several types."""
    return [
        event(session, 1, "status", {"state": "Active", "step": "classify"}, agent="githouse/router"),
        event(session, 2, "message", {"role": "assistant", "text": f"Hello from {session}"}),
        event(
            session,
            3,
            "tool_call",
            {"tool": "verify_transaction", "callId": "c1", "arguments": {"transaction_id": "tx-1"}},
        ),
        event(session, 4, "tool_result", {"tool": "verify_transaction", "callId": "c1", "ok": True}),
        event(
            session,
            5,
            "approval_required",
            {"kind": "draft", "draft": "Refund 12 EUR", "reason": "refunds need a human", "timeoutSeconds": 600},
        ),
        event(session, 6, "resolved", {"summary": f"done with {session}"}),
    ]


def tail(bootstrap: str, topic: str, session: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLEETWARD, "sessions", "tail", session, "--topic", topic, "--bootstrap-server", bootstrap, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def topic(kafka) -> str:
    name = f"t-events-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka.bootstrap, [name], partitions=3)
    return name


@pytest.fixture
def two_sessions(kafka, topic):
    """Events of sessions a and b interleaved on one topic, plus a record keyed a that is no
    event; returns (a, b, a's events, (partition, offset) of the bad record)."""
    a, b = f"gh-web:a-{uuid.uuid4().hex[:6]}", f"gh-web:b-{uuid.uuid4().hex[:6]}"
    ea, eb = script(a), script(b)
    bad = None
    for i, (x, y) in enumerate(zip(ea, eb, strict=True)):
        produce(kafka.bootstrap, topic, x.to_json(), key=a)
        produce(kafka.bootstrap, topic, y.to_json(), key=b)
        if i == 2:
            bad = produce(kafka.bootstrap, topic, '{"schema": "fleetward.event.v1", "type": "message"}', key=a)
            produce(kafka.bootstrap, topic, "not json", key=None)
    return a, b, ea, bad


def test_no_follow_prints_only_the_session_in_order(kafka, topic, two_sessions):
    a, b, events, (bad_partition, bad_offset) = two_sessions
    out = tail(kafka.bootstrap, topic, a, "--no-follow")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(events), out.stdout
    for got, ev in zip(lines, events, strict=True):
        assert f"#{ev.sequence} " in got and ev.agent in got and f" {ev.type} " in got, got
    assert a in lines[1] and b not in out.stdout
    assert 'assistant: "Hello from ' in lines[1]
    assert "verify_transaction {" in lines[2] and "verify_transaction ok" in lines[3]
    assert '"runId": "run-1"' in lines[4] and "approval_decision" in lines[4]
    assert f'"done with {a}"' in lines[5]
    # The bad record keyed with the session is a warning naming where it is; the unkeyed
    # garbage belongs to no session and is not mentioned.
    warnings = [w for w in out.stderr.splitlines() if w.startswith("warning:")]
    assert len(warnings) == 1, out.stderr
    assert f"partition {bad_partition} offset {bad_offset}: not a valid session event" in warnings[0]
    assert "Traceback" not in out.stderr


def test_json_prints_the_envelopes_one_per_line(kafka, topic, two_sessions):
    a, _, events, _ = two_sessions
    out = tail(kafka.bootstrap, topic, a, "--no-follow", "--json")
    assert out.returncode == 0, out.stderr
    parsed = [SessionEvent.parse(line) for line in out.stdout.splitlines()]
    assert [e.id for e in parsed] == [e.id for e in events]
    assert [e.sequence for e in parsed] == [1, 2, 3, 4, 5, 6]
    assert {e.session_id for e in parsed} == {a}
    assert json.loads(out.stdout.splitlines()[0]) == json.loads(events[0].to_json())


def test_since_now_skips_the_backlog(kafka, topic, two_sessions):
    a, _, _, _ = two_sessions
    out = tail(kafka.bootstrap, topic, a, "--no-follow", "--since-now")
    assert (out.returncode, out.stdout) == (0, ""), out.stderr


def test_a_missing_topic_is_an_error(kafka):
    out = tail(kafka.bootstrap, f"nope-{uuid.uuid4().hex[:8]}", "s", "--no-follow")
    assert out.returncode == 1
    assert "does not exist" in out.stderr and kafka.bootstrap in out.stderr


def test_follow_prints_new_events_and_until_idle_ends_it(kafka, topic):
    session = f"gh-web:f-{uuid.uuid4().hex[:6]}"
    first, *later = script(session)
    produce(kafka.bootstrap, topic, first.to_json(), key=session)
    cmd = [FLEETWARD, "sessions", "tail", session, "--topic", topic, "--bootstrap-server", kafka.bootstrap]
    proc = subprocess.Popen(
        [*cmd, "--until-idle", "6", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(90, proc.kill)  # a readline below never blocks the run for long
    watchdog.start()
    try:
        assert proc.stdout is not None
        assert SessionEvent.parse(proc.stdout.readline()).id == first.id  # the backlog
        for ev in later:  # then live events, as they come
            produce(kafka.bootstrap, topic, ev.to_json(), key=session)
            assert SessionEvent.parse(proc.stdout.readline()).id == ev.id
        started = time.monotonic()
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() - started >= 4  # it waited for more before giving up
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_ctrl_c_exits_130_quietly(kafka, topic):
    session = f"gh-web:c-{uuid.uuid4().hex[:6]}"
    produce(kafka.bootstrap, topic, script(session)[0].to_json(), key=session)
    cmd = [FLEETWARD, "sessions", "tail", session, "--topic", topic, "--bootstrap-server", kafka.bootstrap]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert "#1 " in proc.stdout.readline()  # following now
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: proc.poll() is not None, 10, "sessions tail to stop on SIGINT")
        assert proc.returncode == 130
        assert proc.stderr.read() == ""
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sasl_with_read_on_the_topic_only(kafka_scram, tmp_path):
    """SCRAM credentials from a password file; the principal may read the topic and has no
    group ACL at all: the command needs none (it commits nothing)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AclBinding, AclOperation, AclPermissionType, ResourcePatternType, ResourceType

    topic = f"t-events-{uuid.uuid4().hex[:8]}"
    kafka_scram.create_topics(topic)
    user, password = f"viewer-{uuid.uuid4().hex[:6]}", "s3cret-" + uuid.uuid4().hex
    kafka_scram.create_user(user, password)
    admin = kafka_scram.admin()
    read = AclBinding(
        ResourceType.TOPIC,
        topic,
        ResourcePatternType.LITERAL,
        f"User:{user}",
        "*",
        AclOperation.READ,
        AclPermissionType.ALLOW,
    )
    for fut in admin.create_acls([read]).values():
        fut.result(30)
    session = f"gh-web:s-{uuid.uuid4().hex[:6]}"
    events = script(session)
    producer = Producer(kafka_scram.client_config())
    for ev in events:
        producer.produce(topic, ev.to_json(), key=session)
    assert producer.flush(15) == 0
    pw = tmp_path / "password"
    pw.write_text(password + "\n")
    sasl = ["--sasl-mechanism", "SCRAM-SHA-512", "--username", user, "--password-file", str(pw)]

    runs: list[subprocess.CompletedProcess] = []

    def shown() -> bool:
        runs.append(tail(kafka_scram.bootstrap, topic, session, "--no-follow", "--json", *sasl))
        return runs[-1].returncode == 0 and len(runs[-1].stdout.splitlines()) == len(events)

    wait_for(shown, 60, "the viewer reads the session once its ACL is in effect", interval=1)
    out = runs[-1]
    assert [SessionEvent.parse(x).id for x in out.stdout.splitlines()] == [e.id for e in events]
    assert "warning" not in out.stderr, out.stderr

    pw.write_text("not-the-password\n")
    bad = tail(kafka_scram.bootstrap, topic, session, "--no-follow", "--connect-timeout", "5", *sasl)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith(f"error: Kafka at {kafka_scram.bootstrap} refused the login: "), bad.stderr
    assert "Traceback" not in bad.stderr
