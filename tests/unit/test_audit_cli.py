"""`fleetward audit verify` / `list` as a user runs them (the installed command, in a
subprocess), on the embedded SQLite store: exit codes and messages."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fleetward.audit import AuditLog

FLEETWARD = str(Path(sys.executable).with_name("fleetward"))


def fleetward(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "FLEETWARD_AUDIT_DSN"}
    return subprocess.run(
        [FLEETWARD, *args], capture_output=True, text=True, timeout=60, env={**base, **(env or {})}, input=stdin
    )


@pytest.fixture
def chain(tmp_path: Path):
    db = tmp_path / "state.db"
    with AuditLog.open(f"sqlite://{db}") as log:
        records = [
            log.append("killswitch.engage", "alice", "global", {"reason": "runaway refunds"}),
            log.append("killswitch.approve", "bob", "global", {}),
            log.append("killswitch.approve", "carol", "global", {}),
            log.append("killswitch.release", "alice", "global", {"approvers": ["bob", "carol"]}),
            log.append("config.change", "system:serviceaccount:fleetward:operator", "githouse/billing", {"diff": 1}),
        ]
    return db, records


def test_help_explains_the_command():
    out = fleetward("audit", "verify", "--help")
    assert out.returncode == 0
    for words in ("--dsn", "FLEETWARD_AUDIT_DSN", "postgresql://", "sqlite:///", "edited", "deleted", "reordered"):
        assert words in out.stdout, words
    assert "verify" in fleetward("audit", "--help").stdout
    assert "audit" in fleetward("--help").stdout


def test_an_intact_chain_verifies(chain):
    db, records = chain
    out = fleetward("audit", "verify", "--dsn", f"sqlite://{db}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"audit chain OK: 5 records checked; head: sequence 5, hash {records[-1].hash}"


def test_the_dsn_comes_from_the_environment_too(chain):
    db, records = chain
    out = fleetward("audit", "verify", "--json", env={"FLEETWARD_AUDIT_DSN": f"sqlite://{db}"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {
        "ok": True,
        "checked": 5,
        "chain": records[0].chain,
        "headSequence": 5,
        "headHash": records[-1].hash,
    }


@pytest.mark.parametrize(
    ("statements", "seq", "kind"),
    [
        (["UPDATE fw_audit_log SET actor = 'mallory' WHERE sequence = 2"], 2, "edited"),
        (["DELETE FROM fw_audit_log WHERE sequence = 3"], 3, "deleted"),
        (
            [
                "UPDATE fw_audit_log SET sequence = -2 WHERE sequence = 2",
                "UPDATE fw_audit_log SET sequence = 2 WHERE sequence = 3",
                "UPDATE fw_audit_log SET sequence = 3 WHERE sequence = -2",
            ],
            2,
            "reordered",
        ),
    ],
    ids=["edited", "deleted", "reordered"],
)
def test_a_broken_chain_names_the_first_broken_record(chain, statements, seq, kind):
    db, records = chain
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER fw_audit_log_no_update")
    conn.execute("DROP TRIGGER fw_audit_log_no_delete")
    for statement in statements:
        conn.execute(statement)
    conn.close()
    out = fleetward("audit", "verify", "--dsn", f"sqlite://{db}")
    assert out.returncode == 1
    line = out.stdout.strip()
    assert line.startswith(f"audit chain BROKEN at record {seq}")
    assert f": {kind}: " in line
    if kind != "deleted":  # a deleted record has no id left; the others are named by id too
        moved = {"edited": records[1], "reordered": records[2]}[kind]
        assert f"(id {moved.id})" in line
    assert f"{seq - 1} records before it verified" in line
    assert line in out.stderr

    as_json = json.loads(fleetward("audit", "verify", "--json", "--dsn", f"sqlite://{db}").stdout)
    assert as_json["ok"] is False and as_json["broken"]["sequence"] == seq and as_json["broken"]["kind"] == kind


def test_usage_errors_exit_2_with_a_clear_message(tmp_path):
    out = fleetward("audit", "verify")
    assert out.returncode == 2 and "pass --dsn or set FLEETWARD_AUDIT_DSN" in out.stderr
    out = fleetward("audit", "verify", "--dsn", f"sqlite://{tmp_path}/nothing.db")
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not (tmp_path / "nothing.db").exists()  # verify never creates a database
    out = fleetward("audit", "verify", "--dsn", "mysql://root:hunter2@db/fw")
    assert out.returncode == 2 and "unsupported" in out.stderr and "hunter2" not in out.stderr
    out = fleetward("audit", "verify", "--dsn", "postgresql://nobody:x@127.0.0.1:1/fw")
    assert out.returncode == 2 and "cannot connect to the audit database" in out.stderr


def test_list_prints_the_records_as_mirrored(chain):
    db, records = chain
    out = fleetward("audit", "list", "--dsn", f"sqlite://{db}", "--action", "killswitch.approve")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [records[1].to_json(), records[2].to_json()]
    out = fleetward("audit", "list", "--dsn", f"sqlite://{db}", "--after", "3", "--limit", "1")
    assert out.stdout.splitlines() == [records[3].to_json()]


def test_an_exported_stream_verifies_from_stdin(chain):
    db, _ = chain
    lines = fleetward("audit", "list", "--dsn", f"sqlite://{db}").stdout.splitlines()
    out = fleetward("audit", "verify", "--jsonl", "-", stdin="\n".join([*lines[:2], lines[1], *lines[2:]]) + "\n")
    assert out.returncode == 0 and "5 records checked" in out.stdout  # the duplicate (at-least-once) is skipped
    del lines[2]
    out = fleetward("audit", "verify", "--jsonl", "-", stdin="\n".join(lines) + "\n")
    assert out.returncode == 1 and "BROKEN at record 3" in out.stdout and "deleted" in out.stdout


def test_one_chain_is_picked_out_of_a_topic_that_carries_several(chain, tmp_path):
    db, records = chain
    other = tmp_path / "other.db"
    with AuditLog.open(f"sqlite://{other}") as log:
        for n in range(3):
            log.append("tool.call", "agent:ns/other", "t", {"n": n})
    mine = fleetward("audit", "list", "--dsn", f"sqlite://{db}").stdout.splitlines()
    theirs = fleetward("audit", "list", "--dsn", f"sqlite://{other}").stdout.splitlines()
    mixed = "\n".join([mine[0], theirs[0], *mine[1:3], *theirs[1:], *mine[3:]]) + "\n"
    out = fleetward("audit", "verify", "--jsonl", "-", "--chain", records[0].chain, stdin=mixed)
    assert out.returncode == 0 and "5 records checked" in out.stdout, out.stdout + out.stderr
    # Without --chain, each chain is verified on its own (a topic carries several).
    out = fleetward("audit", "verify", "--jsonl", "-", stdin=mixed)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0].startswith(f"chain {records[0].chain}: audit chain OK: 5 records checked")
    assert "audit chain OK: 3 records checked" in out.stdout.splitlines()[1]
    as_json = [
        json.loads(line)
        for line in fleetward("audit", "verify", "--jsonl", "-", "--json", stdin=mixed).stdout.splitlines()
    ]
    assert [(r["ok"], r["checked"]) for r in as_json] == [(True, 5), (True, 3)]
    # A record missing from one of them is named, with its chain.
    broken = "\n".join([mine[0], theirs[0], mine[2], *theirs[1:], *mine[3:]]) + "\n"
    out = fleetward("audit", "verify", "--jsonl", "-", stdin=broken)
    assert out.returncode == 1
    assert f"chain {records[0].chain}: audit chain BROKEN at record 2" in out.stdout and "deleted" in out.stdout
    assert "audit chain OK: 3 records checked" in out.stdout
    out = fleetward("audit", "verify", "--dsn", f"sqlite://{db}", "--chain", records[0].chain)
    assert out.returncode == 2 and "--chain goes with --jsonl" in out.stderr
