"""Long-term memory in a running specialist (issue "Agent runtime II" §4): the outcome of a
user's run is stored (LangGraph store on the real PostgreSQL) and the same user's next run,
in another session, shows it to the model; another user's run does not."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tests.support.runtime import (
    REFUND_SOP,
    GitHouseTools,
    agent_spec,
    billing_tools,
    produce,
    render_local_agent,
    running,
    user_message,
)

SECTION = "Earlier conversations with this user"
REFUND_ARGS = {"transaction_id": "txn_1002", "amount_cents": 2100}
REPLY = "Your refund of $21.00 for txn_1002 is on its way."


def system_text(request: dict) -> str:
    return "\n".join(
        str(m.get("content")) for m in (request["body"] or {}).get("messages", []) if m.get("role") == "system"
    )


def test_the_next_run_of_the_same_user_sees_the_earlier_outcome(kafka, postgres_dsn, llm, events, tmp_path: Path):
    llm.set_scenario(
        [
            {"name": "reply", "match": {"toolResultFor": "issue_refund"}, "respond": {"content": REPLY}},
            {
                "name": "refund",
                "match": {"toolResultFor": "verify_transaction"},
                "respond": {"toolCalls": [{"name": "issue_refund", "arguments": REFUND_ARGS}]},
            },
            {"name": "follow-up", "match": {"lastUser": "last time"}, "respond": {"content": "See above."}},
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
    )
    with GitHouseTools(tmp_path / "jwks.json") as tools:
        agent = render_local_agent(
            tmp_path,
            bootstrap=kafka.bootstrap,
            spec=agent_spec(llm.url, billing_tools(tools.port)),
            sops={"refunds": REFUND_SOP},
            dsn=postgres_dsn,
        )
        user = f"user-{uuid.uuid4().hex[:8]}@example.test"
        other = f"other-{uuid.uuid4().hex[:8]}@example.test"

        def ask(sub: str, text: str) -> str:
            session = f"s-{uuid.uuid4().hex[:12]}"
            cmd = user_message(agent.ref, session, text).to_wire()
            cmd["user"] = {"sub": sub, "role": "user"}
            produce(kafka.bootstrap, agent.request_topic, json.dumps(cmd), session)
            return session

        with running(agent):
            events.wait_for(ask(user, "refund txn_1002 please"), "resolved", 90)
            events.wait_for(ask(user, "is my refund from last time done?"), "resolved", 60)
            events.wait_for(ask(other, "is my refund from last time done?"), "resolved", 60)
    follow_ups = llm.requests(rule="follow-up")
    assert len(follow_ups) == 2
    mine, theirs = system_text(follow_ups[0]), system_text(follow_ups[1])
    assert SECTION in mine and REPLY in mine and "refund txn_1002 please" in mine
    assert "issue_refund" in mine
    assert SECTION not in theirs and REPLY not in theirs
    # The first run had no memory yet.
    assert SECTION not in system_text(llm.requests(rule="verify")[0])
