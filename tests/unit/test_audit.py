"""The audit log on SQLite (the embedded default): records, the hash chain, tampering found at
the right record, secrets stripped, errors naming the field, concurrent writers."""

from __future__ import annotations

import itertools
import json
import sqlite3
import struct
import threading
from pathlib import Path

import jsonschema
import pytest

from fleetward.api.envelopes import (
    AUDIT_SCHEMA,
    GENESIS_HASH,
    AuditRecord,
    EnvelopeError,
    canonical_json,
    parse_envelope,
    record_hash,
)
from fleetward.audit import REDACTED, AuditError, AuditLog, parse_dsn, strip_secrets, verify_documents

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def log(db: Path):
    with AuditLog.open(f"sqlite://{db}") as opened:
        yield opened


def fill(log: AuditLog, n: int) -> list[AuditRecord]:
    return [
        log.append("tool.call", "agent:githouse/billing", "issue_refund", {"n": i, "arguments": {"amount": 12.5}})
        for i in range(n)
    ]


def tamper(db: Path, *statements: str) -> None:
    """What an attacker with write access to the file does: drop the guard triggers first."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS fw_audit_log_no_update")
    conn.execute("DROP TRIGGER IF EXISTS fw_audit_log_no_delete")
    conn.execute("DROP TRIGGER IF EXISTS fw_audit_head_forward_only")
    for statement in statements:
        conn.execute(statement)
    conn.close()


def reopen_verify(db: Path):
    with AuditLog.open(f"sqlite://{db}", create=False) as opened:
        return opened.verify()


# --- RFC 8785 canonical JSON ----------------------------------------------------------------

# RFC 8785 appendix B: IEEE 754 bit patterns and the text ECMAScript (hence JCS) writes.
RFC8785_NUMBERS = {
    "0000000000000000": "0",
    "8000000000000000": "0",
    "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308",
    "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992",
    "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22",
    "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23",
    "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000",
    "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
    "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332",
    "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333",
    "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343",
    "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


@pytest.mark.parametrize(("bits", "text"), RFC8785_NUMBERS.items())
def test_numbers_are_written_as_rfc8785_says(bits, text):
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert canonical_json(value).decode() == text


def test_the_rfc8785_example_document_canonicalises_exactly():
    raw = r"""{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],"string":"\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/","literals":[null,true,false]}"""
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(json.loads(raw)).decode() == expected


def test_keys_sort_by_utf16_code_units_not_code_points():
    # U+1F600 is a surrogate pair (D83D DE00) in UTF-16, so it sorts before U+FB01.
    doc = {"\ufb01": 1, "\U0001f600": 2, "a": 3}
    assert canonical_json(doc).decode() == '{"a":3,"\U0001f600":2,"\ufb01":1}'


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (float("nan"), "not a JSON number"),
        (2**53, r"beyond ±\(2\^53-1\)"),
        ({1: "x"}, "not a string"),
        ("\ud800", "surrogate"),
    ],
)
def test_what_json_cannot_carry_is_refused(value, words):
    with pytest.raises(ValueError, match=words):
        canonical_json({"v": value})


# --- Records and the chain ------------------------------------------------------------------


def test_records_chain_each_to_the_one_before(log):
    records = fill(log, 5)
    assert [r.sequence for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert len({r.chain for r in records}) == 1
    for r in records:
        assert r.hash == r.expected_hash() == record_hash(r.body())
        assert r.timestamp.endswith("Z") and len(r.timestamp) == len("2026-01-31T12:00:00.000000Z")
    result = log.verify()
    assert result.ok and result.checked == 5
    assert result.head_sequence == 5 and result.head_hash == records[-1].hash
    assert result.summary() == f"audit chain OK: 5 records checked; head: sequence 5, hash {records[-1].hash}"


def test_the_hash_is_sha256_of_the_jcs_form_without_the_hash(log):
    import hashlib

    record = log.append("killswitch.engage", "alice", "global", {"reason": "runaway refunds", "scope": "all"})
    doc = json.loads(record.to_json())
    assert doc["schema"] == AUDIT_SCHEMA
    body = {k: v for k, v in doc.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # JCS for this document
    assert doc["hash"] == hashlib.sha256(text.encode()).hexdigest()
    assert record.to_json() == canonical_json(doc).decode()


def test_a_record_parses_as_an_envelope_and_matches_the_generated_schema(log):
    record = log.append("review.decision", "reviewer:carol", "githouse/billing", {"decision": "approve"})
    assert parse_envelope(record.to_json()) == record
    schema = json.loads((REPO / "schemas" / "envelopes.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(json.loads(record.to_json()))) == []
    bad = {**json.loads(record.to_json()), "prevHash": "XYZ"}
    assert not validator.is_valid(bad)
    with pytest.raises(EnvelopeError, match="prevHash"):
        parse_envelope(json.dumps(bad))


def test_the_stored_records_read_back_unchanged(log):
    records = fill(log, 3)
    assert [AuditRecord.model_validate(d) for d in log.records()] == records
    assert [d["sequence"] for d in log.records(after=1)] == [2, 3]
    log.append("budget.stop", "agent:githouse/billing", "run-1", {"limit": "perRun", "costUsd": 0.37})
    assert [d["action"] for d in log.records(action="budget.stop")] == ["budget.stop"]


def test_an_empty_chain_verifies(log):
    result = log.verify()
    assert result.ok and result.checked == 0 and result.head_hash == GENESIS_HASH


# --- Append-only in the database -------------------------------------------------------------


def test_the_database_refuses_updates_and_deletes(log, db):
    fill(log, 2)
    conn = sqlite3.connect(db, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="append-only: UPDATE"):
        conn.execute("UPDATE fw_audit_log SET actor = 'mallory' WHERE sequence = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only: DELETE"):
        conn.execute("DELETE FROM fw_audit_log WHERE sequence = 2")
    with pytest.raises(sqlite3.DatabaseError, match="only moves forward"):
        conn.execute("UPDATE fw_audit_head SET sequence = 1")
    conn.close()
    assert log.verify().ok


# --- Tampering is found at the right record -------------------------------------------------


def test_an_edited_record_is_named(log, db):
    records = fill(log, 6)
    tamper(db, 'UPDATE fw_audit_log SET details = \'{"arguments":{"amount":9999},"n":3}\' WHERE sequence = 4')
    result = reopen_verify(db)
    assert not result.ok
    assert (result.broken.sequence, result.broken.kind, result.broken.record_id) == (4, "edited", records[3].id)
    assert result.checked == 3
    assert "hash mismatch" in result.broken.message


@pytest.mark.parametrize("column", ["actor", "action", "target", "recorded_at", "chain", "id"])
def test_an_edit_of_any_field_is_named(log, db, column):
    fill(log, 4)
    value = {"action": "'config.change'", "recorded_at": "'2020-01-01T00:00:00.000000Z'"}.get(column, "'mallory'")
    tamper(db, f"UPDATE fw_audit_log SET {column} = {value} WHERE sequence = 2")
    result = reopen_verify(db)
    assert (result.broken.sequence, result.broken.kind) == (2, "edited")


def test_a_deleted_record_is_named(log, db):
    fill(log, 6)
    tamper(db, "DELETE FROM fw_audit_log WHERE sequence = 3")
    result = reopen_verify(db)
    assert (result.broken.sequence, result.broken.kind, result.broken.record_id) == (3, "deleted", None)
    assert "record 3 missing" in result.broken.message and result.checked == 2


def test_records_deleted_from_the_end_are_found_through_the_head(log, db):
    fill(log, 6)
    tamper(db, "DELETE FROM fw_audit_log WHERE sequence >= 5")
    result = reopen_verify(db)
    assert (result.broken.sequence, result.broken.kind) == (5, "deleted")
    assert "records 5 to 6 missing" in result.broken.message


def test_the_first_record_deleted_is_named(log, db):
    fill(log, 3)
    tamper(db, "DELETE FROM fw_audit_log WHERE sequence = 1")
    assert (reopen_verify(db).broken.sequence, reopen_verify(db).broken.kind) == (1, "deleted")


def test_reordered_records_are_named(log, db):
    records = fill(log, 6)
    # Swap records 3 and 4 (sequence numbers trade places; the rows keep their content).
    tamper(
        db,
        "UPDATE fw_audit_log SET sequence = -3 WHERE sequence = 3",
        "UPDATE fw_audit_log SET sequence = 3 WHERE sequence = 4",
        "UPDATE fw_audit_log SET sequence = 4 WHERE sequence = -3",
    )
    result = reopen_verify(db)
    assert (result.broken.sequence, result.broken.kind, result.broken.record_id) == (3, "reordered", records[3].id)
    assert "prevHash" in result.broken.message


def test_a_record_inserted_with_renumbering_is_named(log, db):
    records = fill(log, 4)
    forged = AuditRecord.seal(
        id="00000000-0000-4000-8000-000000000000",
        timestamp=records[1].timestamp,
        chain=records[0].chain,
        sequence=3,
        actor="mallory",
        action="config.change",
        target="nothing",
        details={},
        prev_hash=records[1].hash,  # a perfect link to record 2, and its own hash is right
    )
    tamper(
        db,
        "UPDATE fw_audit_log SET sequence = sequence + 100 WHERE sequence >= 3",
        "UPDATE fw_audit_log SET sequence = sequence - 99 WHERE sequence >= 100",
        "UPDATE fw_audit_log SET prev_hash = 'x' || prev_hash WHERE sequence = 4",  # free the UNIQUE value
        "INSERT INTO fw_audit_log (sequence, id, recorded_at, chain, actor, action, target, details, prev_hash, hash)"
        f" VALUES (3, '{forged.id}', '{forged.timestamp}', '{forged.chain}', 'mallory', 'config.change', 'nothing',"
        f" '{{}}', '{forged.prev_hash}', '{forged.hash}')",
    )
    result = reopen_verify(db)
    # The forged record 3 links and hashes correctly; the old record 3 (now 4) no longer links.
    assert (result.broken.sequence, result.broken.kind, result.broken.record_id) == (4, "reordered", records[2].id)


def test_an_edited_and_rehashed_last_record_is_found_through_the_head(log, db):
    records = fill(log, 3)
    forged = AuditRecord.seal(
        **{**records[2].model_dump(exclude={"hash", "schema_version"}), "actor": "mallory"},
    )
    tamper(db, f"UPDATE fw_audit_log SET actor = 'mallory', hash = '{forged.hash}' WHERE sequence = 3")
    result = reopen_verify(db)
    assert (result.broken.sequence, result.broken.kind) == (3, "edited")
    assert "re-hashed" in result.broken.message


def test_details_that_are_no_longer_json_count_as_an_edit(log, db):
    fill(log, 3)
    tamper(db, "UPDATE fw_audit_log SET details = 'not json' WHERE sequence = 2")
    result = reopen_verify(db)
    assert (result.broken.sequence, result.broken.kind) == (2, "edited")


# --- Secrets -------------------------------------------------------------------------------


def test_secrets_are_never_stored(log, db):
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJnaXRob3VzZS9iaWxsaW5nIn0.c2lnbmF0dXJl"
    record = log.append(
        "tool.call",
        "agent:githouse/billing",
        "issue_refund",
        {
            "arguments": {"transaction_id": "tx-1", "password": "hunter2", "api_key": "sk-live-123"},
            "headers": {"Authorization": "Bearer abc.def", "X-Api-Key": "k-999", "Cookie": "sid=1"},
            "token": jwt,
            "clientSecret": ["s1", "s2"],
            "note": f"called with Bearer abc123 and {jwt}",
            "dsn": "postgresql://fleetward:pw-555@db:5432/fleetward",
            "promptTokens": 812,
            "idempotencyKey": "fw1-abc",
            "pem": "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----",
        },
    )
    d = record.details
    assert d["arguments"] == {"transaction_id": "tx-1", "password": REDACTED, "api_key": REDACTED}
    assert d["headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED, "Cookie": REDACTED}
    assert d["token"] == REDACTED and d["clientSecret"] == REDACTED
    assert d["note"] == f"called with Bearer {REDACTED} and {REDACTED}"
    assert d["dsn"] == f"postgresql://fleetward:{REDACTED}@db:5432/fleetward"
    assert d["promptTokens"] == 812 and d["idempotencyKey"] == "fw1-abc"  # counts and ids are no secrets
    assert d["pem"] == REDACTED
    raw = db.read_bytes() + (
        db.with_name(db.name + "-wal").read_bytes() if db.with_name(db.name + "-wal").exists() else b""
    )
    for secret in (b"hunter2", b"sk-live-123", b"abc.def", b"k-999", b"sid=1", b"c2lnbmF0dXJl", b"pw-555", b"MC4CAQ"):
        assert secret not in raw
    assert log.verify().ok


def test_strip_secrets_leaves_other_values_alone():
    doc = {"user": "alice", "amounts": [1, 2.5], "nested": {"maxTokens": 100, "ok": True, "none": None}}
    assert strip_secrets(doc) == doc


# --- Bad input names the field -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("launch.missiles", "alice", "x", {}), "action"),
        (("tool.call", "", "x", {}), "actor"),
        (("tool.call", "alice", "", {}), "target"),
        (("tool.call", "alice", "x", {"v": float("inf")}), "details"),
        (("tool.call", "alice", "x", {"blob": "x" * 300_000}), "details: 3"),
    ],
)
def test_bad_input_is_refused_naming_the_field(log, args, words):
    with pytest.raises(AuditError, match=words):
        log.append(*args)
    assert log.verify().checked == 0  # nothing half-written


@pytest.mark.parametrize(
    ("dsn", "parsed"),
    [
        ("postgresql://u:p@127.0.0.1:5432/fw", ("postgres", "postgresql://u:p@127.0.0.1:5432/fw")),
        ("postgres://u@h/fw", ("postgres", "postgres://u@h/fw")),
        ("sqlite:///var/lib/fleetward/state.db", ("sqlite", "/var/lib/fleetward/state.db")),
        ("sqlite:////var/lib/fleetward/state.db", ("sqlite", "/var/lib/fleetward/state.db")),
        ("sqlite:state.db", ("sqlite", "state.db")),
    ],
)
def test_dsn_forms(dsn, parsed):
    assert parse_dsn(dsn) == parsed


def test_a_bad_dsn_is_named_without_its_password():
    with pytest.raises(AuditError, match=r"'mysql://\*\*\*@db/fw': unsupported") as e:
        parse_dsn("mysql://root:hunter2@db/fw")
    assert "hunter2" not in str(e.value)


def test_verify_needs_an_existing_log(tmp_path):
    with pytest.raises(AuditError, match="does not exist"):
        AuditLog.open(f"sqlite://{tmp_path}/missing.db", create=False)
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(AuditError, match="no audit log in this database"):
        AuditLog.open(f"sqlite://{tmp_path}/empty.db", create=False)


# --- Several writers -----------------------------------------------------------------------


def test_concurrent_writers_on_one_file_form_one_unbroken_chain(db):
    writers, each = 6, 40
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            with AuditLog.open(f"sqlite://{db}") as own:  # one connection per writer
                for n in range(each):
                    own.append("tool.call", f"agent:ns/writer-{i}", "t", {"n": n})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = reopen_verify(db)
    assert result.ok and result.checked == writers * each
    conn = sqlite3.connect(db)
    seqs = [r[0] for r in conn.execute("SELECT sequence FROM fw_audit_log ORDER BY sequence")]
    assert seqs == list(range(1, writers * each + 1))
    per_writer = dict(conn.execute("SELECT actor, COUNT(*) FROM fw_audit_log GROUP BY actor").fetchall())
    assert per_writer == {f"agent:ns/writer-{i}": each for i in range(writers)}


# --- Verifying an exported stream (e.g. the audit topic) -----------------------------------


def test_a_mirrored_stream_verifies_with_duplicates_skipped(log):
    docs = [json.loads(r.to_json()) for r in fill(log, 5)]
    assert verify_documents([*docs[:3], docs[2], *docs[3:]], skip_duplicates=True).checked == 5
    broken = verify_documents([*docs[:3], docs[2], *docs[3:]])
    assert (broken.broken.sequence, broken.broken.kind) == (3, "reordered")
    swapped = verify_documents([docs[0], docs[2], docs[1], *docs[3:]], skip_duplicates=True)
    assert (swapped.broken.sequence, swapped.broken.kind) == (2, "deleted")
