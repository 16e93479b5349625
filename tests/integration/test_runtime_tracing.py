"""Spans, trace context and cost of a real run (SPEC §4, §8): `fleetward runtime run` as a
local process against the real Kafka, the real GitHouse tool service and the LLM stand-in,
exporting its spans over OTLP/HTTP to a receiver run by the test.

Why a receiver and not the SDK's in-memory exporter: the runtime runs as its own process,
as in a pod, and this checks the export path the product uses (OTEL_EXPORTER_OTLP_ENDPOINT,
the batch processor, the protobuf encoding) as well as the spans themselves.

The price table comes from the installation's settings (the operator's `modelPrices`,
rendered into the config); the SOP similarity threshold from the Agent spec."""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fleetward.llmstandin import StandinServer
from tests.support.runtime import (
    PII_GUARDRAIL,
    REFUND_SOP,
    EventReader,
    GitHouseTools,
    LocalAgent,
    OtlpReceiver,
    ReceivedSpan,
    agent_spec,
    billing_tools,
    produce,
    render_local_agent,
    user_message,
)

MODEL = "specialist-priced"
PRICE_IN, PRICE_OUT = 2.5, 10.0  # USD per million tokens, from the installation's table
EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"


class ToolLog(logging.Handler):
    """What the GitHouse tool service logs per call (it logs the trace id of the
    `traceparent` header it received)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Rig:
    bootstrap: str
    llm: StandinServer
    agent: LocalAgent
    events: EventReader
    otlp: OtlpReceiver
    tool_log: ToolLog


@pytest.fixture(scope="module")
def rig(kafka, tmp_path_factory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("runtime-tracing")
    tool_log = ToolLog()
    tools_logger = logging.getLogger("githouse.tools")
    tools_logger.addHandler(tool_log)
    tools_logger.setLevel(logging.INFO)
    tools = GitHouseTools(workdir / "jwks.json")
    with StandinServer(None) as llm, OtlpReceiver() as otlp:
        spec = agent_spec(
            llm.url,
            billing_tools(tools.port),
            model=MODEL,
            # Far above any real similarity: the SOP must be chosen by its trigger keywords.
            sopRetrieval={"similarityThreshold": 0.99},
        )
        agent = render_local_agent(
            workdir,
            bootstrap=kafka.bootstrap,
            spec=spec,
            sops={"refunds": REFUND_SOP},
            guardrails={"pii": PII_GUARDRAIL},
            extra_env=otlp.env(),
            model_prices={MODEL: {"inputPerMillionTokens": PRICE_IN, "outputPerMillionTokens": PRICE_OUT}},
        )
        tools.start()
        events = EventReader(kafka.bootstrap)
        agent.start()
        try:
            agent.wait_ready(90)
            yield Rig(kafka.bootstrap, llm, agent, events, otlp, tool_log)
        finally:
            agent.stop()
            events.close()
            tools.stop()
            tools_logger.removeHandler(tool_log)


REFUND_SCRIPT = [
    {"name": "reply", "match": {"toolResultFor": "verify_transaction"}, "respond": {"content": "It is verified."}},
    {
        "name": "verify",
        "match": {"lastRole": "user"},
        "respond": {
            "toolCalls": [
                {"name": "verify_transaction", "arguments": {"account": "jdoe", "transaction_id": "txn_1002"}}
            ]
        },
    },
]


def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def ancestors(span: ReceivedSpan, spans: dict[str, ReceivedSpan]) -> list[str]:
    """Names of the span's ancestors that were exported, nearest first."""
    out = []
    while span.parent_span_id in spans:
        span = spans[span.parent_span_id]
        out.append(span.name)
    return out


def complete(spans: list[ReceivedSpan]) -> bool:
    names = [s.name for s in spans]
    stages = {s.attributes.get("fleetward.guardrail.stage") for s in spans if s.name == "guardrail decision"}
    return (
        "agent run" in names
        and names.count("model call") >= 2
        and "tool verify_transaction" in names
        and {"input", "toolResults", "output"} <= stages
    )


def test_a_run_is_one_trace_continuing_the_kafka_traceparent_with_run_model_tool_and_guardrail_spans(rig: Rig):
    rig.llm.set_scenario(REFUND_SCRIPT)
    rig.llm.clear_requests()
    cost_before = rig.agent.metric("fleetward_agent_cost_usd_total", model=MODEL)
    prompt_before = rig.agent.metric("fleetward_agent_tokens_total", model=MODEL, kind="prompt")
    completion_before = rig.agent.metric("fleetward_agent_tokens_total", model=MODEL, kind="completion")

    trace_id, parent_span_id = secrets.token_hex(16), secrets.token_hex(8)
    session = f"s-{uuid.uuid4().hex[:12]}"
    cmd = user_message(rig.agent.ref, session, f"I was charged twice for txn_1002 on {CARD}, mail me at {EMAIL}")
    produce(
        rig.bootstrap,
        rig.agent.request_topic,
        cmd.to_json(),
        session,
        {"traceparent": f"00-{trace_id}-{parent_span_id}-01"},
    )
    events = rig.events.wait_for(session, "resolved")
    spans = rig.otlp.wait(trace_id, complete)

    # One trace: the Kafka record's, and the events carry it too.
    assert {e.trace_id for e in events} == {trace_id}
    runs = [s for s in spans if s.name == "agent run"]
    assert len(runs) == 1
    run = runs[0]
    assert run.parent_span_id == parent_span_id, "the run span is not a child of the Kafka record's span"
    assert run.attributes["fleetward.session_id"] == session and run.attributes["fleetward.run_id"] == events[0].run_id
    # Every other span descends from the run span.
    index = by_id(spans)
    for span in spans:
        if span is not run:
            assert "agent run" in ancestors(span, index), f"{span.name} is not under the run span"
    tool_span = next(s for s in spans if s.name == "tool verify_transaction")
    assert tool_span.attributes["fleetward.tool.ok"] is True
    decisions = {s.attributes["fleetward.guardrail.stage"]: s for s in spans if s.name == "guardrail decision"}
    assert "pii:email" in decisions["input"].attributes["fleetward.guardrail.finding_types"]
    assert "pii:credit_card" in decisions["input"].attributes["fleetward.guardrail.finding_types"]
    assert all(d.attributes["fleetward.guardrail.verdict"] == "allow" for d in decisions.values())

    # The tool service got a traceparent of this trace.
    assert any("tool=verify_transaction" in line and f"trace={trace_id}" in line for line in rig.tool_log.lines), (
        rig.tool_log.lines
    )

    # No PII in any exported span: names, attributes, events, resource.
    exported = json.dumps([[s.name, s.attributes, s.events, s.resource] for s in rig.otlp.trace(trace_id)], default=str)
    for secret in (EMAIL, CARD, CARD.replace(" ", "")):
        assert secret not in exported, f"{secret!r} reached a span"

    # Cost = tokens x the configured price, for the tokens the model reported.
    usage = [r["response"]["usage"] for r in rig.llm.requests(outcome="answered")]
    assert len(usage) == 2
    prompt = sum(u["prompt_tokens"] for u in usage)
    completion = sum(u["completion_tokens"] for u in usage)
    assert rig.agent.metric("fleetward_agent_tokens_total", model=MODEL, kind="prompt") - prompt_before == prompt
    assert (
        rig.agent.metric("fleetward_agent_tokens_total", model=MODEL, kind="completion") - completion_before
        == completion
    )
    expected = (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6
    cost = rig.agent.metric("fleetward_agent_cost_usd_total", model=MODEL) - cost_before
    assert cost == pytest.approx(expected, rel=1e-9, abs=1e-12)
    model_spans = [s for s in spans if s.name == "model call"]
    assert sum(s.attributes["fleetward.cost_usd"] for s in model_spans) == pytest.approx(expected, rel=1e-9)

    # The threshold from the spec (0.99) was applied: the SOP was chosen by keyword.
    detail = events[1].data.detail
    assert "refunds@1.0.0" in detail and "trigger keyword" in detail, detail


def test_without_a_traceparent_header_the_run_continues_the_commands_trace_id(rig: Rig):
    rig.llm.set_scenario([{"name": "answer", "match": {"lastRole": "user"}, "respond": {"content": "Noted."}}])
    trace_id = secrets.token_hex(16)
    session = f"s-{uuid.uuid4().hex[:12]}"
    cmd = user_message(rig.agent.ref, session, "please refund my duplicate charge", trace_id=trace_id)
    produce(rig.bootstrap, rig.agent.request_topic, cmd.to_json(), session)
    events = rig.events.wait_for(session, "resolved")
    assert {e.trace_id for e in events} == {trace_id}
    spans = rig.otlp.wait(
        trace_id, lambda s: "agent run" in [x.name for x in s] and "model call" in [x.name for x in s]
    )
    run = next(s for s in spans if s.name == "agent run")
    assert run.attributes["fleetward.session_id"] == session
    # The events' Kafka headers carry the run's context onwards (to the gateway).
    headers = [h for _, v, h in rig.events.snapshot() if session.encode() in v]
    assert headers and all(h["traceparent"].split("-")[1] == trace_id for h in headers)
