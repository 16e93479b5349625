"""Failure handling of the specialist runtime end to end (SPEC §4 "Failure handling"): a
local `fleetward runtime run` against the real Kafka, the real GitHouse tool service behind
a small fault-injecting HTTP proxy, and the LLM stand-in scripted to fail.

The Agent has a primary model (`maxRetries: 2`) and one fallback (`maxRetries: 1`), each
with its own API key (the stand-in's rules match the key, so a model called with the other
one's key would not be answered). One runtime serves the module; each test has its own
session and replaces the stand-in's script."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fleetward.runtime.runs import DEGRADED_REPLY

from fleetward.api.envelopes import AgentCommand, parse_ack
from fleetward.api.runtimeconfig import Credentials, ModelCredential
from fleetward.llmstandin import StandinServer
from tests.support.runtime import (
    DEPLOY_SOP,
    REFUND_SOP,
    EventReader,
    GitHouseTools,
    LocalAgent,
    TopicReader,
    agent_spec,
    billing_tools,
    committed_offset,
    control,
    produce,
    render_local_agent,
    user_message,
)

PRIMARY_KEY = "sk-test-runtime-key"  # what render_local_agent mounts for model 0
BACKUP_KEY = "sk-backup-model-key"
RESET_SECONDS = 5
PRIMARY = {"model": "primary", "apiKey": PRIMARY_KEY}
BACKUP = {"model": "backup", "apiKey": BACKUP_KEY}


# --- a fault-injecting proxy in front of the tool service ---------------------------------------------


class FlakyTools:
    """Forwards tool calls to the GitHouse service, except as scripted per tool:
    `refuse` answers 503 without contacting the service (an outage), `lose` forwards the
    call (the service applies it) and answers 503 instead of its reply (a lost answer),
    `slow` forwards after a delay. Records what each call carried."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.plans: dict[str, list[tuple[str, float]]] = {}
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                tool = self.path.rsplit("/", 1)[-1]
                with outer._lock:
                    plan = outer.plans.get(tool) or []
                    kind, arg = plan.pop(0) if plan else ("pass", 0.0)
                    outer.seen.append(
                        {
                            "tool": tool,
                            "action": kind,
                            "at": time.monotonic(),
                            "idempotencyKey": self.headers.get("Idempotency-Key"),
                            "authorization": self.headers.get("Authorization"),
                        }
                    )
                if kind == "refuse":
                    self._reply(503, {"error": "unavailable", "message": "scripted outage"}, {})
                    return
                if kind == "slow":
                    time.sleep(arg)
                status, payload, headers = outer._forward(self.path, body, self.headers)
                if kind == "lose":
                    self._reply(503, {"error": "unavailable", "message": "scripted lost answer"}, {})
                    return
                self._reply(status, payload, headers)

            def _reply(self, status: int, payload: Any, headers: dict[str, str]) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="flaky-tools")

    def _forward(self, path: str, body: bytes, headers: Any) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=20)
        try:
            forwarded = {
                k: v
                for k in ("Authorization", "Idempotency-Key", "traceparent", "Content-Type")
                if (v := headers.get(k)) is not None
            }
            conn.request("POST", path, body, forwarded)
            response = conn.getresponse()
            extra = {k: v for k in ("Idempotent-Replayed",) if (v := response.getheader(k)) is not None}
            return response.status, response.read(), extra
        finally:
            conn.close()

    def script(self, tool: str, *actions: tuple[str, float]) -> None:
        with self._lock:
            self.plans[tool] = list(actions)

    def calls(self, tool: str) -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.seen if c["tool"] == tool]

    def start(self) -> FlakyTools:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- the rig -----------------------------------------------------------------------------------------------


@dataclass
class Rig:
    bootstrap: str
    llm: StandinServer
    tools: GitHouseTools
    flaky: FlakyTools
    agent: LocalAgent
    events: EventReader
    dlq: TopicReader

    def script(self, rules: list[dict[str, Any]]) -> None:
        """Replace the stand-in's rules and forget what it saw (rule names repeat across tests)."""
        self.llm.set_scenario(rules)
        self.llm.clear_requests()

    def send(self, text: str) -> tuple[str, AgentCommand, int, int]:
        session = f"s-{uuid.uuid4().hex[:12]}"
        cmd = user_message(self.agent.ref, session, text)
        partition, offset = produce(self.bootstrap, self.agent.request_topic, cmd.to_json(), session)
        return session, cmd, partition, offset

    def calls(self, rule: str) -> list[dict[str, Any]]:
        return self.llm.requests(rule=rule)

    def dead_letter(self, session: str, timeout: float = 30) -> tuple[dict[str, Any], dict[str, str]]:
        def mine(records: list[Any]) -> Any:
            for _, value, headers in records:
                body = json.loads(value)
                if body.get("agent") == self.agent.ref and (body.get("history") or {}).get("sessionId") == session:
                    return body, headers
            return None

        return self.dlq.wait(mine, timeout, f"the dead letter of session {session}")

    def circuit(self, tool: str) -> float:
        return self.agent.metric("fleetward_tool_circuit_state", tool=tool)


def with_fallback_key(agent: LocalAgent) -> None:
    """Mount the fallback's own key as credential index 1, as the operator does."""
    key_file = agent.dir / "api-key-1"
    key_file.write_text(BACKUP_KEY)
    credentials = agent.config.credentials
    config = agent.config.model_copy(
        update={
            "credentials": Credentials(
                signing_key_file=credentials.signing_key_file,
                key_id=credentials.key_id,
                models=[*credentials.models, ModelCredential(index=1, api_key_file=str(key_file))],
            )
        }
    ).with_hash()
    agent.config_path.write_text(config.to_json())
    agent.config = config


@pytest.fixture(scope="module")
def rig(kafka, tmp_path_factory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("runtime-failure")
    tools = GitHouseTools(workdir / "jwks.json")
    flaky = FlakyTools(tools.port)
    with StandinServer(None) as llm:
        spec = agent_spec(llm.url, billing_tools(flaky.port), model="primary")
        spec["model"].update(
            maxRetries=2, fallbacks=[{"name": "backup", "baseURL": llm.url, "timeoutSeconds": 30, "maxRetries": 1}]
        )
        for t in spec["tools"]:
            if t["name"] == "worker_deploy_logs":
                t["circuitBreaker"] = {
                    "failureThreshold": 2,
                    "resetTimeoutSeconds": RESET_SECONDS,
                    "halfOpenRequests": 1,
                }
        agent = render_local_agent(
            workdir, bootstrap=kafka.bootstrap, spec=spec, sops={"refunds": REFUND_SOP, "deploys": DEPLOY_SOP}
        )
        with_fallback_key(agent)
        tools.start()
        flaky.start()
        events = EventReader(kafka.bootstrap)
        dlq = TopicReader(kafka.bootstrap, "fleetward.dlq")
        agent.start()
        try:
            agent.wait_ready(90)
            yield Rig(kafka.bootstrap, llm, tools, flaky, agent, events, dlq)
        finally:
            agent.stop()
            events.close()
            dlq.close()
            flaky.stop()
            tools.stop()


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def seconds(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["receivedAt"].replace("Z", "+00:00")).timestamp()


ANSWER_REFUND = "I can look into the refund for you."


# --- the model -----------------------------------------------------------------------------------------------


def test_a_429_is_retried_after_its_retry_after_and_then_answered(rig: Rig):
    rig.script(
        [
            {"name": "limited", "match": PRIMARY, "times": 2, "error": {"status": 429, "retryAfter": 0.3}},
            {"name": "answer", "match": PRIMARY, "respond": {"content": ANSWER_REFUND}},
            {"name": "backup", "match": BACKUP, "respond": {"content": "from the fallback"}},
        ]
    )
    session, *_ = rig.send("I want a refund for txn_1002")
    events = rig.events.wait_for(session, "resolved")
    assert types(events)[-2:] == ["message", "resolved"] and events[-2].data.text == ANSWER_REFUND
    limited, answered = rig.calls("limited"), rig.calls("answer")
    assert len(limited) == 2 and len(answered) == 1 and not rig.calls("backup")
    # The server's Retry-After was waited before each retry (the SDK itself never retries).
    times = [seconds(r) for r in [*limited, *answered]]
    assert all(b - a >= 0.28 for a, b in itertools.pairwise(times)), times


def test_a_model_failing_for_good_is_retried_then_served_by_the_fallback_with_its_own_key(rig: Rig):
    rig.script(
        [
            {"name": "primary-down", "match": PRIMARY, "error": {"status": 503}},
            {"name": "backup", "match": BACKUP, "respond": {"content": "The fallback model answers."}},
        ]
    )
    session, *_ = rig.send("Please refund txn_1002, I was charged twice")
    events = rig.events.wait_for(session, "resolved")
    assert events[-2].type == "message" and events[-2].data.text == "The fallback model answers."
    assert len(rig.calls("primary-down")) == 3  # the first attempt and maxRetries: 2, then the fallback
    assert len(rig.calls("backup")) == 1
    assert "failed" not in types(events)


def test_a_400_is_not_retried_and_the_fallback_answers(rig: Rig):
    rig.script(
        [
            {"name": "bad-request", "match": PRIMARY, "error": {"status": 400, "message": "unsupported parameter"}},
            {"name": "backup", "match": BACKUP, "respond": {"content": "Answered by the fallback."}},
        ]
    )
    session, *_ = rig.send("refund for txn_1002 please")
    events = rig.events.wait_for(session, "resolved")
    assert events[-2].data.text == "Answered by the fallback."
    assert len(rig.calls("bad-request")) == 1 and len(rig.calls("backup")) == 1
    assert len(rig.llm.requests(model="primary")) == 1  # not retried


def test_a_400_from_every_model_fails_the_run_after_one_call_each_and_is_dead_lettered(rig: Rig):
    rig.script(
        [
            {"name": "bad-primary", "match": PRIMARY, "error": {"status": 400}},
            {"name": "bad-backup", "match": BACKUP, "error": {"status": 401}},
        ]
    )
    session, *_ = rig.send("refund txn_1002")
    events = rig.events.wait_for(session, "failed")
    assert types(events)[-2:] == ["message", "failed"]
    assert len(rig.calls("bad-primary")) == 1 and len(rig.calls("bad-backup")) == 1
    letter, headers = rig.dead_letter(session)
    assert headers["fleetward-dlq-kind"] == "run_failed"
    assert [(a["model"], a["status"], a["then"]) for a in letter["history"]["attempts"]] == [
        ("primary", 400, "not retried: not a transient failure"),
        ("backup", 401, "not retried: not a transient failure"),
    ]


def test_when_every_model_keeps_failing_the_user_is_told_and_the_request_is_dead_lettered_with_its_history(
    rig: Rig,
):
    rig.script(
        [
            {"name": "primary-down", "match": PRIMARY, "error": {"status": 503}},
            {"name": "backup-down", "match": BACKUP, "error": {"status": 502}},
        ]
    )
    dead_before = rig.agent.metric("fleetward_runtime_requests_total", outcome="dead_lettered")
    session, cmd, partition, offset = rig.send("I was charged twice for txn_1002, refund it")
    events = rig.events.wait_for(session, "failed")
    # Not silence: a plain-words message, then `failed` naming what failed.
    assert types(events)[-2:] == ["message", "failed"]
    message, failed = events[-2].data, events[-1].data
    assert message.role == "assistant" and message.text == DEGRADED_REPLY
    assert "can't answer your request right now" in message.text and "passed on" in message.text
    assert "primary, backup failed" in failed.reason and "HTTP 502" in failed.reason
    assert failed.error == "OpenAIAPIError"  # langchain-openai's class for a 5xx (an openai.InternalServerError)
    assert [e.sequence for e in events] == list(range(len(events)))
    assert len(rig.calls("primary-down")) == 3 and len(rig.calls("backup-down")) == 2
    # The dead letter: the command as it came, where from, why, and the run's history.
    letter, headers = rig.dead_letter(session)
    assert headers["fleetward-dlq-kind"] == "run_failed" and letter["reason"] == failed.reason
    assert json.loads(letter["value"])["idempotencyKey"] == cmd.idempotency_key
    assert (letter["topic"], letter["partition"], letter["offset"]) == (rig.agent.request_topic, partition, offset)
    history = letter["history"]
    assert history["runId"] == events[0].run_id and history["step"] == "model"
    assert history["error"] == {"type": "OpenAIAPIError", "kind": "server_error", "status": 502}
    assert history["sop"] == {"name": "refunds", "version": "1.0.0"}
    assert [(a["model"], a["attempt"], a["status"]) for a in history["attempts"]] == [
        ("primary", 1, 503),
        ("primary", 2, 503),
        ("primary", 3, 503),
        ("backup", 1, 502),
        ("backup", 2, 502),
    ]
    assert [a["then"].split(" ")[0] for a in history["attempts"]] == ["retried", "retried", "gave", "retried", "gave"]
    assert history["messages"][0]["role"] == "human" and "charged twice" in history["messages"][0]["text"]
    # The command is done with: its offset is committed, and the counter says where it went.
    group = rig.agent.config.kafka.consumer_group
    rig.dlq.wait(
        lambda _: committed_offset(rig.bootstrap, group, rig.agent.request_topic, partition) > offset,
        30,
        "the failed command's offset committed",
    )
    assert rig.agent.metric("fleetward_runtime_requests_total", outcome="dead_lettered") == dead_before + 1


def test_a_halt_during_a_retry_after_wait_drains_at_once_and_the_retry_follows_the_resume(rig: Rig):
    retry_after = 6.0
    rig.script(
        [
            {"name": "limited", "match": PRIMARY, "times": 1, "error": {"status": 429, "retryAfter": retry_after}},
            {"name": "answer", "match": PRIMARY, "respond": {"content": ANSWER_REFUND}},
        ]
    )
    acks = TopicReader(rig.bootstrap, "fleetward.control-acks")
    instance = rig.agent.env["POD_NAME"]

    def my_acks(records: list[Any]) -> list[Any]:
        return [a for a in (parse_ack(v) for _, v, _ in records) if a.instance == instance]

    try:
        session, *_ = rig.send("refund txn_1002 please")
        deadline = time.monotonic() + 60
        while not rig.calls("limited") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rig.calls("limited"), rig.agent.log()
        halt_sent = time.monotonic()
        produce(
            rig.bootstrap,
            "fleetward.control",
            control("halt", [rig.agent.ref], 1, mode="drain", drain_timeout_seconds=30, reason="test").to_json(),
            None,
        )
        drained = acks.wait(lambda recs: [a for a in my_acks(recs) if a.type == "drained"], 30, "the drained ack")[0]
        drained_after = time.monotonic() - halt_sent
        # The 6 s backoff did not hold up the drain: the run parked at once, between attempts.
        assert [(r.session_id, r.outcome, r.step) for r in drained.runs] == [(session, "drained", "model")]
        assert drained.counts["drainMillis"] < 2000 and drained_after < retry_after - 2, drained.counts
        assert rig.events.wait_for(session, "halted", 10)[-1].data.step == "model"
        time.sleep(1.0)
        assert not rig.calls("answer")  # no attempt while halted
        produce(rig.bootstrap, "fleetward.control", control("resume", [rig.agent.ref], 1).to_json(), None)
        acks.wait(lambda recs: [a for a in my_acks(recs) if a.type == "resumed"], 30, "the resumed ack")
        events = rig.events.wait_for(session, "resolved", 60)
    finally:
        acks.close()
    assert types(events).index("halted") < types(events).index("resumed") < types(events).index("message")
    [limited], [answered] = rig.calls("limited"), rig.calls("answer")
    # After the resume the run waited out the rest of the server's Retry-After, then retried once.
    assert seconds(answered) - seconds(limited) >= retry_after - 0.2


# --- tools -------------------------------------------------------------------------------------------------------

VERIFY = {"name": "verify_transaction", "arguments": {"account": "jdoe", "transaction_id": "txn_1002"}}
REFUND = {"name": "issue_refund", "arguments": {"transaction_id": "txn_1002", "amount_cents": 2100}}
LOGS = {"name": "worker_deploy_logs", "arguments": {"deployment_id": "dep_42"}}


def test_a_keyed_refund_whose_answer_was_lost_behind_a_503_is_retried_and_applied_once(rig: Rig):
    rig.script(
        [
            {"name": "reply", "match": {**PRIMARY, "toolResultFor": "issue_refund"}, "respond": {"content": "Done."}},
            {
                "name": "refund",
                "match": {**PRIMARY, "toolResultFor": "verify_transaction"},
                "respond": {"toolCalls": [REFUND]},
            },
            {"name": "verify", "match": {**PRIMARY, "lastRole": "user"}, "respond": {"toolCalls": [VERIFY]}},
        ]
    )
    rig.flaky.script("issue_refund", ("lose", 0))  # the service applies the refund; its answer is lost
    before = len(rig.flaky.calls("issue_refund"))
    session, *_ = rig.send("I was charged twice for txn_1002, please refund it")
    events = rig.events.wait_for(session, "resolved")
    run_id = events[0].run_id
    refund_result = next(e.data for e in events if e.type == "tool_result" and e.data.tool == "issue_refund")
    assert refund_result.ok
    attempts = rig.flaky.calls("issue_refund")[before:]
    assert [a["action"] for a in attempts] == ["lose", "pass"]
    # Same Idempotency-Key, a fresh token for each attempt; the service applied it once.
    assert len({a["idempotencyKey"] for a in attempts}) == 1 and attempts[0]["idempotencyKey"].startswith("fw1-")
    assert len({a["authorization"] for a in attempts}) == 2
    effects = [e for e in rig.tools.effects() if e["runId"] == run_id and e["tool"] == "issue_refund"]
    assert len(effects) == 1 and effects[0]["idempotencyKey"] == attempts[0]["idempotencyKey"]
    assert rig.tools.metric("githouse_tool_calls_total", tool="issue_refund", outcome="idempotent_replay") >= 1
    assert rig.tools.metric("githouse_tool_token_refusals_total") == 0
    # One tool_call and one tool_result in the session, whatever happened underneath.
    assert sum(e.type == "tool_call" and e.data.tool == "issue_refund" for e in events) == 1


def logs_script() -> list[dict[str, Any]]:
    return [
        {
            "name": "explain",
            "match": {**PRIMARY, "toolResultFor": "worker_deploy_logs"},
            "respond": {"content": "Here is what I found about the deployment."},
        },
        {"name": "logs", "match": {**PRIMARY, "lastRole": "user"}, "respond": {"toolCalls": [LOGS]}},
    ]


def logs_result(rig: Rig, session: str) -> Any:
    events = rig.events.wait_for(session, "resolved")
    return next(e.data for e in events if e.type == "tool_result" and e.data.tool == "worker_deploy_logs")


def test_a_tool_circuit_opens_after_the_threshold_then_a_half_open_probe_closes_it(rig: Rig):
    tool = "worker_deploy_logs"
    rig.script(logs_script())
    assert rig.circuit(tool) == 0
    refusals_before = rig.agent.metric("fleetward_tool_errors_total", tool=tool, reason="circuit_open")
    # An outage: two failed calls (the first and its retry) open the circuit (failureThreshold 2);
    # the second retry is refused by the breaker without reaching the service.
    rig.flaky.script(tool, ("refuse", 0), ("refuse", 0))
    session, *_ = rig.send("why did my worker deployment dep_42 fail?")
    result = logs_result(rig, session)
    opened_by = time.monotonic()
    assert not result.ok and f"tool '{tool}' is unavailable" in result.error
    assert "opened after 2 consecutive failures" in result.error
    assert [c["action"] for c in rig.flaky.calls(tool)] == ["refuse", "refuse"]
    assert rig.circuit(tool) == 2  # open
    # While open, a call is refused at once, without contacting the tool.
    session, *_ = rig.send("why did my worker deployment dep_42 fail?")
    result = logs_result(rig, session)
    assert not result.ok and "circuit breaker" in result.error
    assert len(rig.flaky.calls(tool)) == 2
    assert rig.agent.metric("fleetward_tool_errors_total", tool=tool, reason="circuit_open") >= refusals_before + 2
    # After resetTimeoutSeconds one probe goes through (half-open); its success closes the circuit.
    time.sleep(max(0.0, opened_by + RESET_SECONDS + 0.5 - time.monotonic()))
    rig.flaky.script(tool, ("slow", 2.0))
    session, *_ = rig.send("why did my worker deployment dep_42 fail?")
    deadline = time.monotonic() + 30
    while len(rig.flaky.calls(tool)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(rig.flaky.calls(tool)) == 3, "the probe did not reach the tool"
    assert rig.circuit(tool) == 1  # half-open while the probe is in flight
    result = logs_result(rig, session)
    assert result.ok and result.result["deploymentId"] == "dep_42"
    assert rig.circuit(tool) == 0  # closed
    # Closed again: calls go straight through.
    session, *_ = rig.send("why did my worker deployment dep_42 fail?")
    assert logs_result(rig, session).ok
    assert [c["action"] for c in rig.flaky.calls(tool)] == ["refuse", "refuse", "slow", "pass"]
