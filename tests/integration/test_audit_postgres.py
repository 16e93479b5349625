"""The audit log on the real PostgreSQL and Kafka of the local cluster: many writers (threads
and processes) on one chain, tampering by a superuser found at the right record, the
mirror to the audit topic in order, and the mirror catching up after Kafka was unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer

from fleetward.api.envelopes import AuditRecord
from fleetward.audit import AuditLog, verify_documents
from fleetward.devcluster.process import free_port
from tests.support.databases import own_database

FLEETWARD = str(Path(sys.executable).with_name("fleetward"))

# One writer process: appends N records as ACTOR, mirroring to Kafka when KAFKA is set.
WRITER = """
import json, os, sys
from fleetward.audit import AuditLog
kafka = json.loads(os.environ["KAFKA"]) if os.environ.get("KAFKA") else None
with AuditLog.open(os.environ["DSN"], kafka=kafka, topic=os.environ.get("TOPIC", "fleetward.audit"),
                   mirror_interval=0.2) as log:
    for n in range(int(os.environ["N"])):
        log.append("tool.call", os.environ["ACTOR"], "issue_refund", {"n": n, "pid": os.getpid()})
"""


@pytest.fixture
def dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of its own, so the chain holds exactly what the test wrote."""
    with own_database(postgres_dsn, "audit") as dsn:
        yield dsn


def writer_process(dsn: str, actor: str, n: int, kafka: dict | None = None, topic: str | None = None):
    env = {**os.environ, "DSN": dsn, "ACTOR": actor, "N": str(n)}
    if kafka:
        env.update({"KAFKA": json.dumps(kafka), "TOPIC": topic or ""})
    return subprocess.Popen(
        [sys.executable, "-c", WRITER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def write_concurrently(
    dsn: str, *, threads: int, processes: int, each: int, kafka: dict | None = None, topic: str | None = None
) -> float:
    """Appends from `threads` threads (an AuditLog each) and `processes` processes at once;
    returns the wall time."""
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def write(i: int) -> None:
        try:
            opts = {"kafka": kafka, "topic": topic, "mirror_interval": 0.2} if kafka else {}
            with AuditLog.open(dsn, **opts) as log:
                start.wait(timeout=120)
                for n in range(each):
                    log.append("tool.call", f"thread-{i}", "issue_refund", {"n": n})
        except BaseException as e:
            errors.append(e)
            start.abort()

    AuditLog.open(dsn).close()  # tables exist before the race (setup races are tested below)
    began = time.monotonic()
    procs = [writer_process(dsn, f"process-{i}", each, kafka, topic) for i in range(processes)]
    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait(timeout=120)
    for w in workers:
        w.join()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert errors == []
    return time.monotonic() - began


def rows(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def tamper(dsn: str, *statements: str) -> None:
    """As the superuser, with user triggers off for the session (how a DBA would do it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        for statement in statements:
            conn.execute(statement)


def verify(dsn: str):
    with AuditLog.open(dsn, create=False) as log:
        return log.verify()


# --- Many writers, one chain -----------------------------------------------------------------


def test_concurrent_writers_from_threads_and_processes_form_one_chain(dsn):
    threads, processes, each = 6, 3, 40
    elapsed = write_concurrently(dsn, threads=threads, processes=processes, each=each)
    total = (threads + processes) * each
    result = verify(dsn)
    assert result.ok, result.summary()
    assert result.checked == total
    assert rows(dsn, "SELECT min(sequence), max(sequence), count(*) FROM fw_audit_log") == [(1, total, total)]
    per_actor = dict(rows(dsn, "SELECT actor, count(*) FROM fw_audit_log GROUP BY actor"))
    assert per_actor == {
        **{f"thread-{i}": each for i in range(threads)},
        **{f"process-{i}": each for i in range(processes)},
    }
    # Every record names the one before as its predecessor, and no two name the same one.
    assert rows(dsn, "SELECT count(DISTINCT prev_hash) FROM fw_audit_log") == [(total,)]
    print(f"\n{total} appends from {threads} threads + {processes} processes in {elapsed:.2f} s")


def test_first_time_setup_from_many_processes_at_once_is_safe(dsn):
    procs = [writer_process(dsn, f"p{i}", 5) for i in range(6)]  # each creates the tables if missing
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    result = verify(dsn)
    assert result.ok and result.checked == 30
    assert len(rows(dsn, "SELECT * FROM fw_audit_head")) == 1


# --- Append-only, and tampering found -------------------------------------------------------


def test_the_database_rejects_update_delete_and_truncate(dsn):
    with AuditLog.open(dsn) as log:
        for n in range(3):
            log.append("config.change", "operator", "githouse/billing", {"n": n})
    with psycopg.connect(dsn, autocommit=True) as conn:  # the superuser, triggers on
        for statement in (
            "UPDATE fw_audit_log SET actor = 'mallory' WHERE sequence = 2",
            "DELETE FROM fw_audit_log WHERE sequence = 3",
            "TRUNCATE fw_audit_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only moves forward"):
            conn.execute("UPDATE fw_audit_head SET sequence = 2")
    assert verify(dsn).checked == 3


def test_a_disabled_guard_is_rearmed_by_the_next_writer(dsn):
    AuditLog.open(dsn).close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE fw_audit_log DISABLE TRIGGER fw_audit_log_append_only")
    with AuditLog.open(dsn) as log:  # e.g. a runtime replica starting
        log.append("config.change", "operator", "x", {})
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute("DELETE FROM fw_audit_log")


@pytest.fixture
def chain(dsn) -> list[AuditRecord]:
    with AuditLog.open(dsn) as log:
        return [log.append("tool.call", "agent:githouse/billing", "issue_refund", {"n": n}) for n in range(8)]


def test_an_edited_record_is_named(dsn, chain):
    tamper(dsn, "UPDATE fw_audit_log SET details = '{\"n\":500}' WHERE sequence = 5")
    result = verify(dsn)
    assert (result.broken.sequence, result.broken.kind, result.broken.record_id) == (5, "edited", chain[4].id)
    assert result.checked == 4


def test_a_deleted_record_is_named(dsn, chain):
    tamper(dsn, "DELETE FROM fw_audit_log WHERE sequence = 6")
    result = verify(dsn)
    assert (result.broken.sequence, result.broken.kind) == (6, "deleted")
    assert result.checked == 5


def test_records_deleted_from_the_end_are_named(dsn, chain):
    tamper(dsn, "DELETE FROM fw_audit_log WHERE sequence > 6")
    result = verify(dsn)
    assert (result.broken.sequence, result.broken.kind) == (7, "deleted")


def test_reordered_records_are_named(dsn, chain):
    tamper(
        dsn,
        "UPDATE fw_audit_log SET sequence = -1 WHERE sequence = 3",
        "UPDATE fw_audit_log SET sequence = 3 WHERE sequence = 4",
        "UPDATE fw_audit_log SET sequence = 4 WHERE sequence = -1",
    )
    result = verify(dsn)
    assert (result.broken.sequence, result.broken.kind, result.broken.record_id) == (3, "reordered", chain[3].id)


def test_verify_through_the_cli(dsn, chain):
    out = subprocess.run([FLEETWARD, "audit", "verify", "--dsn", dsn], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"audit chain OK: 8 records checked; head: sequence 8, hash {chain[-1].hash}"
    tamper(dsn, "UPDATE fw_audit_log SET target = 'other_tool' WHERE sequence = 2")
    out = subprocess.run(
        [FLEETWARD, "audit", "verify"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLEETWARD_AUDIT_DSN": dsn},
    )
    assert out.returncode == 1
    assert out.stdout.startswith(f"audit chain BROKEN at record 2 (id {chain[1].id}): edited: hash mismatch")


def test_verify_sees_one_consistent_snapshot_while_writers_append(dsn):
    with AuditLog.open(dsn) as log:
        log.append("config.change", "operator", "x", {})
    stop = threading.Event()

    def keep_writing() -> None:
        with AuditLog.open(dsn) as log:
            while not stop.is_set():
                log.append("tool.call", "agent:ns/a", "t", {})

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        results = [verify(dsn) for _ in range(10)]
    finally:
        stop.set()
        writer.join()
    assert all(r.ok for r in results), [r.summary() for r in results if not r.ok]
    assert results[-1].checked > results[0].checked  # the chain grew while it was verified


# --- The mirror to the audit topic ----------------------------------------------------------


def consume(kafka, topic: str, expected: int, timeout: float = 60) -> list:
    consumer = Consumer(
        {
            **kafka.client_config(),
            "group.id": f"audit-test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                messages.append(msg)
        # Anything beyond `expected` would be a duplicate: give it a moment to show up.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                messages.append(msg)
    finally:
        consumer.close()
    return messages


def assert_mirrored_in_order(messages: list, dsn: str, total: int) -> None:
    docs = [json.loads(m.value()) for m in messages]
    assert [d["sequence"] for d in docs] == list(range(1, total + 1))
    assert len({m.partition() for m in messages}) == 1  # key = chain id: one partition, one order
    assert {m.key().decode() for m in messages} == {docs[0]["chain"]}
    result = verify_documents(docs)
    assert result.ok and result.checked == total
    with AuditLog.open(dsn, create=False) as log:
        assert docs == list(log.records())


def test_records_reach_the_audit_topic_in_order_from_many_mirroring_writers(dsn, kafka):
    topic = f"fleetward.audit.test-{uuid.uuid4().hex[:8]}"
    kafka.create_topics(topic, partitions=3)
    threads, processes, each = 4, 2, 25
    write_concurrently(dsn, threads=threads, processes=processes, each=each, kafka=kafka.client_config(), topic=topic)
    total = (threads + processes) * each
    # A writer's last mirror round skips while another writer mirrors; whoever comes next
    # (here: one more process) takes the rest.
    with AuditLog.open(dsn, kafka=kafka.client_config(), topic=topic) as log:
        log.mirror_pending()
        assert log.mirrored_up_to() == total
    assert_mirrored_in_order(consume(kafka, topic, total), dsn, total)


def test_records_stand_when_kafka_is_unreachable_and_the_mirror_catches_up(dsn, kafka):
    topic = f"fleetward.audit.test-{uuid.uuid4().hex[:8]}"
    kafka.create_topics(topic, partitions=3)
    nowhere = {"bootstrap.servers": f"127.0.0.1:{free_port()}"}  # nothing listens there
    with AuditLog.open(dsn, kafka=nowhere, topic=topic, delivery_timeout=1.0, mirror_interval=0.2) as log:
        started = time.monotonic()
        for n in range(20):
            log.append("guardrail.block", "agent:githouse/billing", "session-1", {"stage": "input", "n": n})
        assert time.monotonic() - started < 5  # appends never wait for Kafka
        time.sleep(1.5)  # at least one mirror round fails meanwhile
        assert log.mirrored_up_to() == 0
    assert verify(dsn).checked == 20

    with AuditLog.open(dsn, kafka=kafka.client_config(), topic=topic) as log:  # Kafka is back
        log.append("guardrail.block", "agent:githouse/billing", "session-1", {"stage": "output", "n": 20})
        deadline = time.monotonic() + 30
        while log.mirrored_up_to() < 21 and time.monotonic() < deadline:
            time.sleep(0.2)  # the background mirror catches up on its own
        assert log.mirrored_up_to() == 21
    assert_mirrored_in_order(consume(kafka, topic, 21), dsn, 21)


def test_a_callers_producer_can_carry_the_mirror(dsn, kafka):
    from confluent_kafka import Producer

    topic = f"fleetward.audit.test-{uuid.uuid4().hex[:8]}"
    kafka.create_topics(topic, partitions=3)
    producer = Producer({**kafka.client_config(), "enable.idempotence": True})
    with AuditLog.open(dsn, producer=producer, topic=topic) as log:
        for n in range(5):
            log.append("budget.stop", "agent:githouse/billing", "run-1", {"limit": "perRun", "n": n})
        log.mirror_pending()  # what the background mirror has not sent yet
        assert log.mirrored_up_to() == 5
    assert_mirrored_in_order(consume(kafka, topic, 5), dsn, 5)
