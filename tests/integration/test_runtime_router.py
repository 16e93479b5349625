"""The router (SPEC §4; issue "Agent runtime II" §1) as a local `fleetward runtime run`
against the real Kafka, with the LLM stand-in answering the classification in structured
output: fan-out to two specialists' request topics, an unknown topic and a missing specialist
escalated to the human queue (on the session and the alerts topic), the fallback agent and
the sensitivity filter, and a classification that does not validate (retried, then
escalated; never a crash)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from fleetward.api.envelopes import AgentCommand, parse_command, parse_event
from tests.support.runtime import (
    EventReader,
    LocalAgent,
    TopicReader,
    ensure_topics,
    produce,
    render_local_agent,
    running,
    user_message,
)

NS = "rt"
ENTERPRISE = (
    "Our CI/CD pipeline has been dead for three hours, I'm stuck in a 2FA lockout loop, "
    "and please give my Lead Dev permission to increase the budget."
)


def analysis(topics: list[str], parts: dict[str, str] | None = None, *, sensitive: bool = False) -> dict[str, Any]:
    """SPEC §4's QueryAnalysis; a request over several topics lists them all and its parts."""
    answer = {
        "intent": "restore access and change billing permissions",
        "urgency": "critical",
        "tone": "frustrated",
        "topic": topics[0],
        "is_sensitive": sensitive,
    }
    if len(topics) > 1 or parts:
        answer |= {"topics": topics, "parts": [{"topic": t, "text": text} for t, text in (parts or {}).items()]}
    return answer


def classify(answer: dict[str, Any], **rule: Any) -> dict[str, Any]:
    return {"name": "classify", "match": {"schemaName": "QueryAnalysis"}, "respond": {"json": answer}, **rule}


def request_topic(agent: str) -> str:
    return f"fleetward.requests.{NS}.{agent}"


def router(tmp_path: Path, kafka, llm, routes: dict[str, str], fallback: dict[str, str], **extra: Any) -> LocalAgent:
    spec = {
        "role": "router",
        "model": {"name": "router", "baseURL": llm.url, "timeoutSeconds": 30, "maxRetries": 0},
        "routes": routes,
        "fallback": fallback,
        **extra,
    }
    return render_local_agent(tmp_path, bootstrap=kafka.bootstrap, spec=spec, namespace=NS)


def ask(kafka, agent: LocalAgent, text: str = ENTERPRISE) -> str:
    session = f"s-{uuid.uuid4().hex[:12]}"
    produce(kafka.bootstrap, agent.request_topic, user_message(agent.ref, session, text).to_json(), session)
    return session


def commands(reader: TopicReader, session: str) -> list[AgentCommand]:
    return [parse_command(v) for k, v, _ in reader.snapshot() if k == session]


def test_fan_out_to_two_specialists_and_the_unserved_part_to_people(kafka, llm, events, tmp_path: Path):
    suffix = uuid.uuid4().hex[:6]
    billing, security = f"billing-{suffix}", f"account-security-{suffix}"
    ensure_topics(kafka.bootstrap, [request_topic(billing), request_topic(security)])
    parts = {
        "account-security": "I'm stuck in a 2FA lockout loop",
        "billing": "give my Lead Dev permission to increase the budget",
        "devsupport": "Our CI/CD pipeline has been dead for three hours",
    }
    llm.set_scenario([classify(analysis(list(parts), parts))])
    agent = router(
        tmp_path,
        kafka,
        llm,
        {"billing": billing, "account-security": security, "devsupport": f"devsupport-{suffix}"},
        {"humanQueue": "enterprise-oncall"},
    )
    to_billing = TopicReader(kafka.bootstrap, request_topic(billing))
    to_security = TopicReader(kafka.bootstrap, request_topic(security))
    alerts = TopicReader(kafka.bootstrap, "fleetward.alerts")
    try:
        with running(agent):
            session = ask(kafka, agent)
            stream = events.wait_for(session, "escalated", 60)
            routed = to_billing.wait(lambda _: commands(to_billing, session), 30, "the billing handoff")
            secured = to_security.wait(lambda _: commands(to_security, session), 30, "the security handoff")
            final = _wait_detail(events, session, "handed off")
            handoffs = agent.metric("fleetward_router_handoffs_total", topic="billing", target="specialist")
    finally:
        for r in (to_billing, to_security):
            r.close()
    # The handoffs: one command each, for the specialist's part, with the user and the analysis.
    (b,) = routed
    (s,) = secured
    assert (b.type, b.agent, b.data.topic, b.data.text) == ("handoff", f"{NS}/{billing}", "billing", parts["billing"])
    assert (s.agent, s.data.topic, s.data.text) == (f"{NS}/{security}", "account-security", parts["account-security"])
    for c in (b, s):
        assert c.user is not None and c.user.sub == "jdoe@example.test"
        assert c.data.from_agent == agent.ref and c.data.parent_run_id == stream[0].run_id
        assert c.data.analysis.urgency == "critical" and c.data.analysis.is_sensitive is False
        assert c.trace_id == stream[0].trace_id
    # The session shows the whole path: classification, two handoffs, the escalation.
    full = events.session(session)
    details = [e.data.detail for e in full if e.type == "status"]
    assert any(d.startswith("classified: topics account-security, billing, devsupport") for d in details), details
    assert any(f"topic billing handed to {NS}/{billing}" in d for d in details)
    assert any(f"topic account-security handed to {NS}/{security}" in d for d in details)
    (escalated,) = [e for e in full if e.type == "escalated"]
    assert escalated.data.queue == "enterprise-oncall" and escalated.data.topic == "devsupport"
    assert "not deployed" in escalated.data.reason
    assert "handed off" in final.data.detail and "escalated: devsupport -> enterprise-oncall" in final.data.detail
    copies = alerts.wait(
        lambda rs: [parse_event(v) for _, v, h in rs if h.get("fleetward-alert-type") == "escalated"],
        30,
        "the escalation on the alerts topic",
    )
    alerts.close()
    assert escalated.id in {c.id for c in copies}
    assert handoffs == 1


def test_unknown_topic_goes_to_the_fallback_agent_unless_the_request_is_sensitive(kafka, llm, events, tmp_path):
    suffix = uuid.uuid4().hex[:6]
    general = f"general-{suffix}"
    ensure_topics(kafka.bootstrap, [request_topic(general)])
    llm.set_scenario(
        [
            classify(analysis(["shotgun"], sensitive=True), match={"schemaName": "QueryAnalysis", "lastUser": "key"}),
            classify(analysis(["shotgun"])),
        ]
    )
    agent = router(tmp_path, kafka, llm, {"billing": f"billing-{suffix}"}, {"agent": general})
    to_general = TopicReader(kafka.bootstrap, request_topic(general))
    try:
        with running(agent):
            plain = ask(kafka, agent, "ShotGun scans are slow")
            sensitive = ask(kafka, agent, "my ShotGun API key leaked")
            handed = to_general.wait(lambda _: commands(to_general, plain), 30, "the fallback handoff")
            escalated = events.wait_for(sensitive, "escalated", 60)[-1]
            _wait_detail(events, plain, "handed off")
            assert commands(to_general, sensitive) == []
    finally:
        to_general.close()
    assert handed[0].data.topic == "shotgun" and handed[0].agent == f"{NS}/{general}"
    assert escalated.data.queue == "human-support" and "sensitive" in escalated.data.reason


def test_a_classification_that_does_not_validate_is_retried_then_escalated(kafka, llm, events, tmp_path):
    suffix = uuid.uuid4().hex[:6]
    billing = f"billing-{suffix}"
    ensure_topics(kafka.bootstrap, [request_topic(billing)])
    bad = {**analysis(["billing"]), "urgency": "whenever"}
    broken = {"name": "broken", "match": {"schemaName": "QueryAnalysis"}, "respond": {"content": "It is billing."}}
    broken_once = {
        "name": "broken-once",
        "match": {"schemaName": "QueryAnalysis"},
        "times": 1,
        "respond": {"json": bad, "allowMismatch": True},
    }
    agent = router(tmp_path, kafka, llm, {"billing": billing}, {"humanQueue": "human-support"})
    to_billing = TopicReader(kafka.bootstrap, request_topic(billing))
    try:
        with running(agent):
            llm.set_scenario([broken])  # never valid: three answers, then people
            always = ask(kafka, agent, "this is always broken")
            escalated = events.wait_for(always, "escalated", 60)[-1]
            _wait_detail(events, always, "escalated")
            llm.set_scenario([broken_once, classify(analysis(["billing"]))])  # valid at the second answer
            once = ask(kafka, agent, "charged twice, fix it")
            to_billing.wait(lambda _: commands(to_billing, once), 30, "the handoff after one retry")
            log = agent.log()
    finally:
        to_billing.close()
    # The retry told the model what was wrong.
    retried = [r for r in llm.requests() if "did not match the required JSON schema" in str(r)]
    assert retried, "the second attempt carries the validation error"
    assert len(llm.requests(rule="broken")) == 3  # three answers, then people
    assert "could not be classified" in escalated.data.reason and "urgency" not in escalated.data.reason
    assert "failed" not in [e.type for e in events.session(always)]
    assert "Traceback" not in log


def _wait_detail(events: EventReader, session: str, text: str, timeout: float = 30):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events.session(session):
            if e.type == "status" and e.data.step == "dispatch" and text in (e.data.detail or ""):
                return e
        time.sleep(0.1)
    raise AssertionError(f"no dispatch status with {text!r} in {session}: {[e.type for e in events.session(session)]}")
