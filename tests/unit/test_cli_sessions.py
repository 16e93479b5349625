"""`fleetward sessions tail`: the line per event type, which records belong to the session,
the --json lines, the Kafka settings, and the errors that need no broker."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from fleetward.api.envelopes import SessionEvent
from fleetward.cli import sessions
from fleetward.cli.main import build_parser, main
from fleetward.devcluster.process import free_port

WHEN = datetime(2025, 6, 2, 9, 0, 10, 123456, tzinfo=UTC)
SESSION = "gh-web:7f3c2a"
HEAD = "2025-06-02T09:00:10.123Z  #{seq:<3} githouse/billing         {type:<17} "


def event(type_: str, data: dict[str, Any], sequence: int = 4, **kw: Any) -> SessionEvent:
    return SessionEvent.new(
        type_,
        session_id=kw.pop("session_id", SESSION),
        agent=kw.pop("agent", "githouse/billing"),
        run_id="run-billing-0001",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        sequence=sequence,
        data=data,
        timestamp=kw.pop("timestamp", WHEN),
    )


def line(type_: str, data: dict[str, Any], **kw: Any) -> str:
    ev = event(type_, data)
    out = sessions.format_event(ev, **kw)
    head = HEAD.format(seq=4, type=type_)
    assert out.startswith(head), out
    assert "\n" not in out
    return out[len(head) :]


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("message", {"role": "assistant", "text": "One moment."}, 'assistant: "One moment."'),
    ("message", {"role": "user", "text": 'Line one\nsaid "two"'}, 'user: "Line one\\nsaid \\"two\\""'),
    ("status", {"state": "Active"}, "Active"),
    (
        "status",
        {"state": "WaitingForHuman", "step": "issue-refund", "detail": "refund needs approval"},
        'WaitingForHuman at step issue-refund: "refund needs approval"',
    ),
    (
        "tool_call",
        {"tool": "issue_refund", "callId": "c-1", "arguments": {"transaction_id": "tx-9", "amount_cents": 1200}},
        'issue_refund {"transaction_id": "tx-9", "amount_cents": 1200} (call c-1)',
    ),
    (
        "tool_result",
        {"tool": "verify_transaction", "callId": "c-1", "ok": True, "result": {"valid": True}, "durationMs": 42},
        'verify_transaction ok {"valid": true} (call c-1, 42 ms)',
    ),
    ("tool_result", {"tool": "verify_transaction", "callId": "c-2", "ok": True}, "verify_transaction ok (call c-2)"),
    (
        "tool_result",
        {"tool": "issue_refund", "callId": "c-3", "ok": False, "error": "HTTP 503", "durationMs": 7},
        'issue_refund error: "HTTP 503" (call c-3, 7 ms)',
    ),
    (
        "approval_decision",
        {"decision": "approve", "reviewer": "alice"},
        "approve by alice",
    ),
    (
        "approval_decision",
        {"decision": "edit", "reviewer": "bob", "edit": "Refund 10 EUR, not 12."},
        'edit by bob: "Refund 10 EUR, not 12."',
    ),
    ("approval_decision", {"decision": "reject", "reviewer": "carol"}, "reject by carol"),
    (
        "escalated",
        {"queue": "billing-humans", "reason": "no SOP for chargebacks", "topic": "chargeback"},
        'to queue billing-humans: "no SOP for chargebacks" (topic "chargeback")',
    ),
    ("escalated", {"queue": "support", "reason": "asked for a human"}, 'to queue support: "asked for a human"'),
    ("resolved", {"summary": "Refunded 12 EUR."}, '"Refunded 12 EUR."'),
    (
        "resolved",
        {"summary": "Redeployed.", "verify": {"url": "http://127.0.0.1:9/healthz", "delaySeconds": 60}},
        '"Redeployed." (verify http://127.0.0.1:9/healthz after 60 s)',
    ),
    ("failed", {"reason": "the model is unreachable"}, '"the model is unreachable"'),
    (
        "failed",
        {"reason": "tool failed", "error": "ConnectError: refused"},
        '"tool failed" (error: "ConnectError: refused")',
    ),
    ("budget_exceeded", {"budget": "tokens", "limit": 1000, "used": 1210}, "tokens: used 1210 of 1000"),
    (
        "budget_exceeded",
        {"budget": "toolCalls", "limit": 5, "used": 5, "partial": "I verified the charge."},
        'toolCalls: used 5 of 5; partial answer: "I verified the charge."',
    ),
    (
        "halted",
        {"killSwitch": "stop-billing", "reason": "runaway refunds", "step": "issue-refund"},
        'by KillSwitch stop-billing after step issue-refund: "runaway refunds"',
    ),
    ("halted", {"killSwitch": "stop-billing"}, "by KillSwitch stop-billing"),
    ("resumed", {"killSwitch": "stop-billing"}, "released KillSwitch stop-billing"),
    ("resumed", {}, "run resumes"),
]


@pytest.mark.parametrize(("type_", "data", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_event_type_prints_its_essentials_on_one_line(type_, data, expected):
    assert line(type_, data) == expected


def test_every_event_type_has_a_case():
    from fleetward.api.envelopes.events import EVENT_PAYLOADS

    covered = {c[0] for c in CASES} | {"approval_required"}
    assert covered == set(EVENT_PAYLOADS)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (
            {"kind": "draft", "draft": "We refund 12 EUR.", "reason": "refunds need a human", "timeoutSeconds": 3600},
            'draft "We refund 12 EUR."; reason: "refunds need a human"; run run-billing-0001, waits 3600 s',
        ),
        (
            {
                "kind": "tool",
                "tool": "issue_refund",
                "arguments": {"amount_cents": 1200},
                "reason": "mutating tool",
                "timeoutSeconds": 60,
                "reviewId": "rv-1",
            },
            'tool issue_refund {"amount_cents": 1200}; reason: "mutating tool"; run run-billing-0001, review rv-1, '
            "waits 60 s",
        ),
        (
            {"kind": "step", "step": "issue-refund", "reason": "policy", "timeoutSeconds": 60},
            'step issue-refund; reason: "policy"; run run-billing-0001, waits 60 s',
        ),
    ],
    ids=["draft", "tool", "step"],
)
def test_approval_required_says_what_why_which_run_and_how_to_answer(data, what):
    out = line("approval_required", data)
    cli = "fleetward sessions decide gh-web:7f3c2a run-billing-0001 --agent githouse/billing --decision approve|edit|reject"
    assert out.startswith(what + f" -- answer with: {cli}; or as a reviewer on the gateway: "), out
    answer = json.loads(out.split("on the gateway: ", 1)[1])
    assert answer == {"type": "approval_decision", "runId": "run-billing-0001", "decision": "approve|edit|reject"}


def test_the_time_is_shown_in_utc_with_milliseconds():
    ev = event(
        "status", {"state": "Active"}, timestamp=datetime(2025, 6, 2, 11, 0, 10, tzinfo=timezone(timedelta(hours=2)))
    )
    assert sessions.format_event(ev).startswith("2025-06-02T09:00:10.000Z  #4   ")


def test_long_texts_are_cut_unless_full():
    text = "x" * 1000
    short = line("message", {"role": "assistant", "text": text})
    assert short.endswith('"... (+700 chars)') and len(short) < 400
    assert line("message", {"role": "assistant", "text": text}, limit=None) == f'assistant: "{text}"'


# --- Which records are the session's ----------------------------------------------------------


def test_a_record_of_the_session_is_its_event():
    ev = event("message", {"role": "user", "text": "hi"})
    got = sessions.classify(SESSION, SESSION.encode(), ev.to_json().encode())
    assert isinstance(got, SessionEvent) and got.id == ev.id


def test_records_of_other_sessions_are_ignored_without_parsing():
    other = event("message", {"role": "user", "text": "hi"}, session_id="other")
    assert sessions.classify(SESSION, b"other", other.to_json().encode()) is None
    assert sessions.classify(SESSION, None, b"not json at all") is None
    assert sessions.classify(SESSION, b"other", b"not json at all") is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (b"not json at all", "not a valid session event"),
        (b"\xff\xfe", "not a valid session event"),
        (b'{"schema": "fleetward.event.v1", "type": "message"}', "not a valid session event"),
        (None, "empty"),
    ],
    ids=["not-json", "not-utf8", "missing-fields", "tombstone"],
)
def test_a_bad_record_keyed_with_the_session_is_a_warning(value, words):
    got = sessions.classify(SESSION, SESSION.encode(), value)
    assert isinstance(got, str) and words in got and "\n" not in got


def test_an_event_of_another_session_under_this_key_is_a_warning():
    other = event("message", {"role": "user", "text": "hi"}, session_id="other")
    got = sessions.classify(SESSION, SESSION.encode(), other.to_json().encode())
    assert isinstance(got, str) and "'other'" in got


def test_json_lines_are_the_envelope_as_produced_on_one_line():
    ev = event("message", {"role": "assistant", "text": "a\nb"})
    raw = ev.to_json().encode()
    assert sessions.json_line(raw) == raw.decode()
    pretty = json.dumps(json.loads(raw), indent=2).encode()
    out = sessions.json_line(pretty)
    assert "\n" not in out and json.loads(out) == json.loads(raw)


# --- Options and Kafka settings -----------------------------------------------------------------


def args_for(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["sessions", "tail", SESSION, *argv])


def test_defaults_read_the_events_topic_from_the_beginning_and_follow():
    a = args_for()
    assert (a.topic, a.since_now, a.follow, a.until_idle, a.timeout, a.json) == (
        "fleetward.events",
        False,
        True,
        None,
        None,
        False,
    )
    assert args_for("--no-follow").follow is False
    assert args_for("--since-now", "--until-idle", "2.5").until_idle == 2.5


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-follow", "--until-idle", "5"],
        ["--follow", "--no-follow"],
        ["--since-now", "--from-beginning"],
        ["--timeout", "0"],
        ["--until-idle", "soon"],
    ],
)
def test_contradicting_or_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        args_for(*argv)
    assert e.value.code == 2


def test_bootstrap_comes_from_the_option_or_the_environment(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    assert sessions.kafka_config(args_for()) == {"bootstrap.servers": "127.0.0.1:9092"}
    assert sessions.kafka_config(args_for("--bootstrap-server", "k:1"))["bootstrap.servers"] == "k:1"


def test_sasl_settings_with_a_password_file(tmp_path, monkeypatch):
    monkeypatch.delenv("KAFKA_PASSWORD", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = sessions.kafka_config(
        args_for(
            "--bootstrap-server",
            "k:1",
            "--sasl-mechanism",
            "SCRAM-SHA-512",
            "--username",
            "viewer",
            "--password-file",
            str(pw),
            "-X",
            "ssl.ca.location=/ca.pem",
        )
    )
    assert cfg == {
        "bootstrap.servers": "k:1",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "viewer",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/ca.pem",
    }
    monkeypatch.setenv("KAFKA_PASSWORD", "from-env")
    cfg = sessions.kafka_config(
        args_for(
            "--bootstrap-server",
            "k:1",
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "PLAIN",
            "--username",
            "u",
        )
    )
    assert (cfg["security.protocol"], cfg["sasl.password"]) == ("SASL_SSL", "from-env")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "KAFKA_BOOTSTRAP"),
        (["--bootstrap-server", "k:1", "--sasl-mechanism", "PLAIN"], "--username"),
        (["--bootstrap-server", "k:1", "--sasl-mechanism", "PLAIN", "--username", "u"], "KAFKA_PASSWORD"),
        (["--bootstrap-server", "k:1", "--username", "u"], "--sasl-mechanism"),
        (["--bootstrap-server", "k:1", "-X", "novalue"], "KEY=VALUE"),
        (["--bootstrap-server", "k:1", "-X", "bogus.prop=1"], "bogus.prop"),
        (
            ["--bootstrap-server", "k:1", "--sasl-mechanism", "PLAIN", "--username", "u", "--password-file", "/nope"],
            "/nope",
        ),
    ],
)
def test_bad_kafka_settings_exit_2_with_a_clear_message(argv, words, monkeypatch, capsys):
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("KAFKA_PASSWORD", raising=False)
    assert main(["sessions", "tail", SESSION, "--no-follow", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err


def test_unreachable_kafka_exits_1_naming_the_server(capsys):
    port = free_port()  # nothing listens there
    code = main(
        [
            "sessions",
            "tail",
            SESSION,
            "--no-follow",
            "--bootstrap-server",
            f"127.0.0.1:{port}",
            "--connect-timeout",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert f"cannot reach Kafka at 127.0.0.1:{port} within 1 s" in captured.err
    assert captured.out == ""


def test_help_documents_the_stopping_rules_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["sessions", "tail", "--help"])
    out = capsys.readouterr().out
    for words in (
        "--since-now",
        "--no-follow",
        "--until-idle",
        "--timeout",
        "--json",
        "KAFKA_BOOTSTRAP",
        "130",
        "Ctrl-C",
    ):
        assert words in out, words
    assert "sessions" in build_parser().format_help()
