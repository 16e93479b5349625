"""The seed's enterprise query through the real GitHouse mesh (issue "Agent runtime II" §5,
SPEC §11): the example applied to the local cluster with the operator installed by Helm (the
router, seven specialists, the draft and feedback agents, the tool service and the LLM
stand-in all run as pods), the query produced to the router's request topic, and the session
followed on the events topic: classification, fan-out to account-security and billing, the
security part escalated to people, SOP-gated tool calls, reviews of the gated steps and of
the drafts, and after approval the final replies."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from fleetward.api.envelopes import AgentCommand
from tests.support.agents import wait_ready
from tests.support.runtime import FLEETWARD, TopicReader, produce, user_message

ENTERPRISE_QUERY = (
    "Our CI/CD pipeline has been dead for three hours, I'm stuck in a 2FA lockout loop, "
    "and please give my Lead Dev permission to increase the budget."
)
TOOLS_URL = "http://127.0.0.1:18080"


@pytest.fixture(scope="module")
def githouse(fleetward, githouse_example, api: client.ApiClient) -> Iterator[None]:
    for name in ("router", "account-security", "billing"):
        wait_ready(api, "githouse", name, timeout=300)
    apps = client.AppsV1Api(api)
    for name in ("githouse-tools", "githouse-llm"):
        deadline = time.monotonic() + 120
        while (apps.read_namespaced_deployment(name, "githouse").status.ready_replicas or 0) < 1:
            assert time.monotonic() < deadline, f"Deployment githouse/{name} not ready"
            time.sleep(1)
    _wait_http(f"{TOOLS_URL}/healthz", 60)
    _wait_http("http://127.0.0.1:18000/v1/models", 60)
    yield


def test_the_enterprise_query_end_to_end(githouse, kafka, events):
    session = f"gh-{uuid.uuid4().hex[:12]}"
    alerts = TopicReader(kafka.bootstrap, "fleetward.alerts")
    query = user_message("githouse/router", session, ENTERPRISE_QUERY).to_wire()
    query["user"] = {"sub": "octo-admin", "role": "user"}
    produce(kafka.bootstrap, "fleetward.requests.githouse.router", json.dumps(query), session)

    # Every review the session asks for is approved by a reviewer: billing's from the command
    # line (`fleetward sessions decide`), account-security's as the gateway would send it.
    answered: set[str] = set()
    deadline = time.monotonic() + 240
    replies: dict[str, str] = {}
    while time.monotonic() < deadline and len(replies) < 2:
        stream = events.session(session)
        for e in stream:
            key = f"{e.run_id}/{e.data.review_id}" if e.type == "approval_required" else ""
            if e.type == "approval_required" and key not in answered and e.agent == "githouse/billing":
                answered.add(key)  # as an on-call reviewer would from a shell
                subprocess.run(
                    [FLEETWARD, "sessions", "decide", session, e.run_id, "--agent", e.agent, "--decision", "approve",
                     "--reviewer", "rita.reviewer", "--bootstrap-server", kafka.bootstrap],
                    check=True, capture_output=True, timeout=30,
                )  # fmt: skip
            elif e.type == "approval_required" and key not in answered:
                answered.add(key)  # as the gateway sends a reviewer's approval_decision frame
                decision = AgentCommand.new(
                    "resume",
                    session_id=session,
                    agent=e.agent,
                    idempotency_key=f"review-{uuid.uuid4().hex}",
                    user={"sub": "rita.reviewer", "role": "reviewer"},
                    data={"runId": e.run_id, "decision": "approve", "reviewer": "rita.reviewer"},
                )
                topic = "fleetward.requests." + e.agent.replace("/", ".")
                produce(kafka.bootstrap, topic, decision.to_json(), session)
            if e.type == "message" and e.data.role == "assistant":
                replies[e.agent] = e.data.text
        time.sleep(0.2)
    stream = events.session(session)
    path = [(e.agent.split("/")[1], e.type, _brief(e)) for e in stream]
    assert set(replies) == {"githouse/account-security", "githouse/billing"}, json.dumps(path, indent=1)

    by_agent: dict[str, list[Any]] = {}
    for e in stream:
        by_agent.setdefault(e.agent, []).append(e)
    router = by_agent["githouse/router"]
    details = [e.data.detail for e in router if e.type == "status"]
    assert any(d.startswith("classified: topics account, billing, security") for d in details), details
    assert any("topic account handed to githouse/account-security" in d for d in details)
    assert any("topic billing handed to githouse/billing" in d for d in details)
    (escalated,) = [e for e in router if e.type == "escalated"]
    assert escalated.data.topic == "security" and escalated.data.queue == "human-support"
    assert alerts.wait(
        lambda rs: any(h.get("fleetward-alert-type") == "escalated" and session.encode() in v for _, v, h in rs),
        30,
        "the escalation on the alerts topic",
    )
    alerts.close()

    for agent, gated_tool in (("githouse/account-security", "reset_2fa"), ("githouse/billing", "set_billing_manager")):
        mine = by_agent[agent]
        types = [e.type for e in mine]
        calls = [e.data.tool for e in mine if e.type == "tool_call"]
        assert calls == ["verify_identity", gated_tool], calls
        required = [e.data for e in mine if e.type == "approval_required"]
        assert [(r.kind, r.tool) for r in required] == [("step", gated_tool), ("draft", None)], required
        assert "risk" in required[1].reason
        # The gated call ran only after its approval, and the reply only after the draft's.
        first_decision = types.index("approval_decision")
        assert types.index("tool_result", types.index("tool_call") + 1) < first_decision
        assert [e.data.ok for e in mine if e.type == "tool_result"] == [True, True]
        assert types.index("message") > types.index("approval_decision", first_decision + 1)
        assert types[-1] == "resolved"
    effects = _get_json(f"{TOOLS_URL}/_effects")
    tools_applied = {e["tool"] for e in effects if e["runId"] in {e.run_id for e in stream}}
    assert tools_applied == {"reset_2fa", "set_billing_manager"}


def _brief(e: Any) -> str:
    data = e.data.to_wire()
    return str(data.get("detail") or data.get("tool") or data.get("text") or data.get("kind") or "")[:100]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
