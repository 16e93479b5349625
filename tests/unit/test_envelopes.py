"""The envelope contract (SPEC §6): the shared fixtures, the generated JSON Schema and the
Python models agree; errors name the field; constructors fill ids and timestamps."""

from __future__ import annotations

import argparse
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest

from fleetward.api import agent, envelopes, schemagen
from fleetward.api.envelopes import (
    AgentCommand,
    ControlAck,
    ControlMessage,
    EnvelopeError,
    MessageData,
    SessionEvent,
    parse_ack,
    parse_alert,
    parse_command,
    parse_control,
    parse_envelope,
    parse_event,
)
from fleetward.cli import schemas as schemas_cli

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "schemas" / "envelopes.schema.json"
VALID = sorted((REPO / "schemas" / "fixtures" / "valid").glob("*.json"))
INVALID = sorted((REPO / "schemas" / "fixtures" / "invalid").glob("*.json"))
PARSERS = {
    "event": parse_event,
    "command": parse_command,
    "control": parse_control,
    "ack": parse_ack,
    "alert": parse_alert,
}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def parser_for(path: Path):
    return PARSERS[path.stem.split("_", 1)[0]]


# --- Shared fixtures ------------------------------------------------------------------------


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_fixture_parses_and_round_trips(path, validator):
    doc = load(path)
    envelope = parser_for(path)(path.read_bytes())
    assert type(envelope) is envelopes.ENVELOPES[doc["schema"]]
    known = {f.alias or name for name, f in type(envelope).model_fields.items()}
    if isinstance(envelope, envelopes.ControlMessage):  # an order's unknown fields are ignored
        doc = {k: v for k, v in doc.items() if k in known}
    assert json.loads(envelope.to_json()) == doc
    assert parse_envelope(envelope.to_json()) == envelope
    assert list(validator.iter_errors(doc)) == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_fixture_is_rejected_by_the_models(path):
    text = path.read_text()
    with pytest.raises(EnvelopeError):
        parse_envelope(text)
    if path.stem.split("_", 1)[0] in PARSERS:
        with pytest.raises(EnvelopeError):
            parser_for(path)(text)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_fixture_is_rejected_by_the_json_schema(path, validator):
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return  # not JSON at all: nothing a schema could accept (not_json.json)
    assert not validator.is_valid(doc), f"{path.name} passes the JSON Schema"


def test_invalid_fixtures_are_all_explained_in_the_readme():
    readme = (REPO / "schemas" / "fixtures" / "invalid" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+\.json)` \|", readme, flags=re.MULTILINE))
    assert listed == {p.name for p in INVALID}
    assert len(INVALID) >= 15


def test_every_type_has_exactly_one_payload_model():
    assert tuple(envelopes.EVENT_PAYLOADS) == get_args(envelopes.EventType)
    assert tuple(envelopes.COMMAND_PAYLOADS) == get_args(envelopes.CommandType)
    assert set(get_args(envelopes.EventData)) == set(envelopes.EVENT_PAYLOADS.values())
    assert set(get_args(envelopes.CommandData)) == set(envelopes.COMMAND_PAYLOADS.values())
    assert tuple(envelopes.ALERT_PAYLOADS) == get_args(envelopes.AlertType)
    assert set(get_args(envelopes.AlertData)) == set(envelopes.ALERT_PAYLOADS.values())


def test_every_type_has_a_valid_fixture():
    seen: dict[str, set[str]] = {}
    for path in VALID:
        doc = load(path)
        seen.setdefault(doc["schema"], set()).add(doc["type"])
    assert seen == {
        envelopes.EVENT_SCHEMA: set(get_args(envelopes.EventType)),
        envelopes.COMMAND_SCHEMA: set(get_args(envelopes.CommandType)),
        envelopes.CONTROL_SCHEMA: set(get_args(envelopes.ControlType)),
        envelopes.CONTROL_ACK_SCHEMA: set(get_args(envelopes.AckType)),
        envelopes.ALERT_SCHEMA: set(get_args(envelopes.AlertType)),
    }


# --- The generated schema -------------------------------------------------------------------


def test_committed_schema_is_generated_from_the_models():
    assert SCHEMA_FILE.read_text() == schemagen.render(), "run `fleetward schemas generate`"


def main(argv: list[str]) -> int:
    # The `schemas` command alone, so this test does not depend on other commands' modules.
    parser = argparse.ArgumentParser()
    schemas_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_check_detects_a_stale_schema(tmp_path, capsys):
    out = tmp_path / "envelopes.schema.json"
    assert main(["schemas", "generate", "--check", "--dir", str(tmp_path)]) == 1  # missing
    assert main(["schemas", "generate", "--dir", str(tmp_path)]) == 0
    assert out.read_text() == SCHEMA_FILE.read_text()
    assert main(["schemas", "generate", "--check", "--dir", str(tmp_path)]) == 0
    out.write_text(out.read_text().replace('"maxLength": 128', '"maxLength": 129', 1))
    assert main(["schemas", "generate", "--check", "--dir", str(tmp_path)]) == 1
    assert "stale schema" in capsys.readouterr().err


# Keywords every mainstream validator (Python jsonschema, Rust jsonschema, ajv) implements.
PLAIN_KEYWORDS = {
    "$schema",
    "$id",
    "$ref",
    "$defs",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "patternProperties",
    "items",
    "enum",
    "const",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "maxProperties",
    "default",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "if",
    "then",
}


def _keywords(node: Any, found: set[str]) -> set[str]:
    if isinstance(node, list):
        for item in node:
            _keywords(item, found)
    elif isinstance(node, dict):
        for key, value in node.items():
            found.add(key)
            if key in ("properties", "patternProperties", "$defs"):
                for sub in value.values():
                    _keywords(sub, found)
            elif key not in ("enum", "const", "default", "required"):
                _keywords(value, found)
    return found


def test_schema_uses_only_plain_keywords_and_covers_every_envelope():
    schema = schemagen.build()
    assert _keywords(schema, set()) <= PLAIN_KEYWORDS
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert [r["$ref"] for r in schema["oneOf"]] == [f"#/$defs/{m.__name__}" for m in envelopes.ENVELOPES.values()]


# Documents outside the fixtures where the models and the schema must give the same verdict,
# in particular explicit nulls around the cross-field rules.
def _resume(data: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc = load(REPO / "schemas/fixtures/valid/command_resume_approve.json")
    doc["data"].update(data)
    doc.update(top)
    return doc


def _ack(**top: Any) -> dict[str, Any]:
    return {**load(REPO / "schemas/fixtures/valid/ack_drained.json"), **top}


@pytest.mark.parametrize(
    ("doc", "accepted"),
    [
        (_resume({"edit": None}), True),
        (_resume({"decision": "edit", "edit": None}), False),
        (_resume({}, user=None), False),
        (_resume({}, user={"sub": "oscar", "role": "operator"}), True),
        (_resume({}, traceId=None), True),
        (_resume({}, timestamp="2025-06-02T09:00:10.123456789+05:30"), True),
        (_resume({}, timestamp="2025-06-02 09:00:10Z"), False),
        (_resume({}, agent="githouse/" + "a" * 52), True),
        (_resume({}, agent="githouse/" + "a" * 53), False),
        (_resume({}, agent="githouse/1billing"), False),
        (_resume({"runId": 7}), False),
        (_ack(counts={"runs drained": 1}), False),
        (_ack(counts={"runsDrained": True}), False),
        (_ack(runs=[]), True),
    ],
    ids=[
        "approve-null-edit",
        "edit-null-edit",
        "null-user",
        "operator",
        "null-trace",
        "nanos-offset",
        "space-separator",
        "52-char-name",
        "53-char-name",
        "name-starts-with-digit",
        "numeric-run-id",
        "counter-name-with-space",
        "counter-is-bool",
        "no-runs",
    ],
)
def test_models_and_schema_agree(doc, accepted, validator):
    assert validator.is_valid(doc) is accepted
    if accepted:
        parse_envelope(json.dumps(doc))
    else:
        with pytest.raises(EnvelopeError):
            parse_envelope(json.dumps(doc))


# --- Errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "path", "words"),
    [
        ("event_negative_sequence", "sequence", "greater than or equal to 0"),
        ("event_timestamp_without_timezone", "timestamp", "timezone offset"),
        ("event_data_does_not_match_type", "data.state", "Field required"),
        ("command_resume_edit_without_text", "data.edit", 'required when decision is "edit"'),
        ("command_resume_by_plain_user", "user.role", 'when type is "resume"'),
        ("command_user_message_without_user", "user", "required when type is one of"),
        ("ack_unknown_outcome", "runs[0].outcome", "'drained', 'aborted' or 'forced'"),
        ("event_wrong_schema_version", "schema", "fleetward.event.v1"),
    ],
)
def test_errors_name_the_field(fixture, path, words):
    raw = (REPO / "schemas/fixtures/invalid" / f"{fixture}.json").read_text()
    with pytest.raises(EnvelopeError) as err:
        parser_for(Path(fixture))(raw)
    assert isinstance(err.value, ValueError)
    messages = dict(err.value.problems)
    assert path in messages, err.value.problems
    assert words in messages[path]
    assert f"{path}: " in str(err.value)


def test_non_json_input_is_reported_as_such():
    with pytest.raises(EnvelopeError, match="invalid session event: Invalid JSON"):
        parse_event(b'{"schema": ')
    with pytest.raises(EnvelopeError, match="not JSON"):
        parse_envelope("nope")


# --- Constructors ---------------------------------------------------------------------------


def test_new_event_fills_id_and_time_and_writes_compact_json():
    before = datetime.now(UTC)
    event = SessionEvent.new(
        "status",
        session_id="s-1",
        agent="githouse/billing",
        run_id="r-1",
        trace_id=TRACE,
        sequence=4,
        data={"state": "WaitingForHuman"},
    )
    other = SessionEvent.new(
        "message",
        session_id="s-1",
        agent="githouse/billing",
        run_id="r-1",
        trace_id=TRACE,
        sequence=5,
        data=MessageData(role="assistant", text="Done."),
    )
    assert uuid.UUID(event.id).version == 4 and event.id != other.id
    assert before <= event.timestamp <= datetime.now(UTC) + timedelta(seconds=1)
    wire = event.to_json()
    assert ": " not in wire and ", " not in wire and "null" not in wire
    assert json.loads(wire)["data"] == {"state": "WaitingForHuman"}
    assert json.loads(wire)["sessionId"] == "s-1"
    assert parse_event(wire) == event


def test_new_command_control_and_ack_validate():
    cmd = AgentCommand.new(
        "resume",
        session_id="s-1",
        agent="githouse/billing",
        idempotency_key="s-1:resume:1",
        user={"sub": "rita", "role": "reviewer"},
        data={"runId": "r-1", "decision": "reject", "reviewer": "rita"},
    )
    assert parse_command(cmd.to_json()).data == cmd.data
    halt = ControlMessage.new(
        "halt", kill_switch="stop-all", generation=1, agents=[], mode="drain", drain_timeout_seconds=30
    )
    assert json.loads(halt.to_json())["drainTimeoutSeconds"] == 30
    ack = ControlAck.new(
        "halted",
        kill_switch="stop-all",
        generation=1,
        instance="gw-1",
        component="gateway",
        agents=[],
        counts={"sessionsClosed": 2},
    )
    assert parse_ack(ack.to_json()).counts == {"sessionsClosed": 2}


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (
            lambda: SessionEvent.new(
                "message",
                session_id="s",
                agent="billing",
                run_id="r",
                trace_id=TRACE,
                sequence=0,
                data={"role": "user", "text": "hi"},
            ),
            "agent",
        ),
        (
            lambda: SessionEvent.new(
                "status",
                session_id="s",
                agent="g/b",
                run_id="r",
                trace_id=TRACE,
                sequence=0,
                data=MessageData(role="user", text="hi"),
            ),
            "data",
        ),
        (
            lambda: SessionEvent.new(
                "message",
                session_id="s",
                agent="g/b",
                run_id="r",
                trace_id=TRACE,
                sequence=0,
                data={"role": "user", "text": "hi"},
                timestamp=datetime(2025, 1, 1),
            ),
            "timestamp",
        ),
        (lambda: ControlMessage.new("halt", kill_switch="stop", generation=1, agents=[], mode="pause"), "mode"),
        (
            lambda: AgentCommand.new(
                "user_message", session_id="s", agent="g/b", idempotency_key="k", data={"text": "hi"}
            ),
            "user",
        ),
    ],
    ids=[
        "agent-without-namespace",
        "payload-of-another-type",
        "naive-timestamp",
        "halt-with-unknown-mode",
        "message-without-user",
    ],
)
def test_new_rejects_bad_values_naming_the_field(build, field):
    with pytest.raises(EnvelopeError) as err:
        build()
    assert field in dict(err.value.problems), err.value.problems


def test_a_payload_model_of_another_type_is_refused_by_name():
    with pytest.raises(EnvelopeError, match='data: a MessageData does not fit type "status" \\(expected StatusData\\)'):
        SessionEvent.new(
            "status",
            session_id="s",
            agent="g/b",
            run_id="r",
            trace_id=TRACE,
            sequence=0,
            data=MessageData(role="user", text="hi"),
        )


def test_tool_name_rule_matches_the_agent_api():
    assert envelopes.TOOL_NAME == agent.TOOL_NAME


def test_an_order_without_agents_covers_only_what_its_scope_says_without_labels():
    """The same rule as the gateway's `order_covers` (control.rs tests). A hand-written
    order with no agents and a namespace scope used to halt every agent."""
    from fleetward.api.envelopes import ControlMessage

    def order(scope):
        return ControlMessage.new(
            "halt", kill_switch="ks", generation=1, agents=[], scope=scope, mode="drain", drain_timeout_seconds=30
        )

    assert order({}).covers("ns/a") and order(None).covers("other/b")
    by_namespace = order({"namespaces": ["ns"]})
    assert by_namespace.covers("ns/a") and not by_namespace.covers("other/b")
    assert not order({"agentSelector": {"matchLabels": {"tier": "gold"}}}).covers("ns/a")
    listed = ControlMessage.new(
        "resume", kill_switch="ks", generation=2, agents=["ns/a"], scope={"agentSelector": {"matchLabels": {}}}
    )
    assert listed.covers("ns/a") and not listed.covers("ns/b")


def test_a_halt_with_only_what_spec_names_gets_the_killswitch_defaults():
    """SPEC §6 gives a control message the switch's name, scope and generation; a halt
    written with only those drains (not aborts) for the KillSwitch's default 30 s and
    covers what its scope says. The gateway reads the same fixture (fixtures.rs)."""
    from fleetward.api.envelopes import ControlMessage
    from fleetward.api.killswitch import KillSwitchSpec

    halt = ControlMessage.parse((REPO / "schemas/fixtures/valid/control_halt_defaults.json").read_bytes())
    assert (halt.mode, halt.drain_timeout_seconds, halt.agents) == (None, None, None)
    assert halt.halt_mode == "drain"
    assert halt.drain_timeout == KillSwitchSpec(engaged=True, reason="x").drain_timeout_seconds == 30
    assert halt.covers("githouse/billing") and not halt.covers("other/billing")
    abort = halt.model_copy(update={"mode": "abort", "drain_timeout_seconds": 5})
    assert (abort.halt_mode, abort.drain_timeout) == ("abort", 5)
