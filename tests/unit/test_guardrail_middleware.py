"""LangChain middleware built from Guardrail specs, run inside a real LangChain agent (the
only stand-in is the chat model, a scripted fake that records what it was sent)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from fleetward.runtime.guardrails import GuardrailEngine, pii_middleware
from fleetward.runtime.middleware.steps import one_step_per_hook
from langchain.agents import create_agent
from langchain.agents.middleware import PIIDetectionError, PIIMiddleware
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatResult

from fleetward.api.guardrail import GuardrailSpec

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_SPECS = [
    GuardrailSpec.model_validate(d["spec"])
    for d in yaml.safe_load_all((REPO / "examples/githouse/10-guardrails.yaml").read_text())
]


class RecordingModel(GenericFakeChatModel):
    """Scripted replies; remembers the messages each call received."""

    seen: ClassVar[list[list[BaseMessage]]] = []

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


@pytest.fixture(params=["listed", "grouped", "grouped-async"])
def layout(request: pytest.FixtureRequest) -> str:
    """Each behaviour holds with the PIIMiddleware listed one by one (LangChain's own wiring)
    and run as one step each side of the model (what the runtime does, one_step_per_hook),
    invoked synchronously and, as the runtime does, asynchronously."""
    return request.param


def agent_for(specs: list[GuardrailSpec], reply: str, layout: str, key: bytes | None = None):
    RecordingModel.seen = []
    model = RecordingModel(messages=iter([AIMessage(reply)]))
    middleware = pii_middleware(specs, hash_key=key)
    if layout.startswith("grouped"):
        middleware = one_step_per_hook(middleware)
    return create_agent(model, middleware=middleware), model


def test_one_middleware_per_entity_with_its_stages():
    middlewares = pii_middleware(EXAMPLE_SPECS)
    assert all(isinstance(m, PIIMiddleware) for m in middlewares)
    assert len({m.name for m in middlewares}) == len(middlewares) == 9
    assert [m.pii_type for m in middlewares][:3] == ["githouse_token", "jwt", "api_key"]  # most specific first
    assert all(m.apply_to_input and m.apply_to_output and m.apply_to_tool_results for m in middlewares)


def run(agent: Any, message: HumanMessage, layout: str) -> dict[str, Any]:
    if layout.endswith("-async"):
        return asyncio.run(agent.ainvoke({"messages": [message]}))
    return agent.invoke({"messages": [message]})


def test_grouped_they_are_one_step_each_side_of_the_model_and_keep_every_stream_transformer():
    members = pii_middleware(EXAMPLE_SPECS)
    grouped = one_step_per_hook(members)
    listed_nodes = set(create_agent(RecordingModel(messages=iter([])), middleware=members).get_graph().nodes)
    grouped_nodes = set(create_agent(RecordingModel(messages=iter([])), middleware=grouped).get_graph().nodes)
    assert len([n for n in listed_nodes if "PII" in n]) == 2 * len(members)
    assert not [n for n in grouped_nodes if "PII" in n]
    assert {"RunSteps.before_model", "RunSteps.after_model"} <= grouped_nodes
    # the members stay in the list (each scrubs its type on the wire), under their names
    assert [m.name for m in grouped[:-1]] == [m.name for m in members]
    assert [len(m.transformers) for m in grouped[:-1]] == [len(m.transformers) for m in members]


def test_the_model_sees_what_the_scan_engine_produces(layout: str):
    text = (
        "I'm jane@example.com, +1 (415) 555-0132, token ghp_abcdefghijklmnopqrstuvwxyz0123456789, IBAN "
        "DE89 3704 0044 0532 0130 00, host 10.1.2.3 and eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    )
    key = b"installation-key-for-tests-0001"
    agent, model = agent_for(EXAMPLE_SPECS, reply="Thanks, we will mail support@githouse.dev", layout=layout, key=key)
    result = run(agent, HumanMessage(text), layout)
    sent = model.seen[0][-1].content
    assert sent == GuardrailEngine(EXAMPLE_SPECS, hash_key=key).scan(text, "input").text
    assert "jane" not in sent and "0132" not in sent and "ghp_" not in sent and "3704" not in sent
    # the model's answer (output stage) is masked too
    assert result["messages"][-1].content == "Thanks, we will mail ****@githouse.dev"


def test_block_strategy_stops_the_run(layout: str):
    agent, model = agent_for(EXAMPLE_SPECS, reply="ok", layout=layout)
    with pytest.raises(PIIDetectionError):
        run(agent, HumanMessage("my card is 4111 1111 1111 1111"), layout)
    assert model.seen == []


def test_two_guardrails_on_one_type_compose_like_the_engine(layout: str):
    masking = GuardrailSpec.model_validate({"pii": {"entities": [{"type": "email", "strategy": "mask"}]}})
    redacting = GuardrailSpec.model_validate(
        {"pii": {"entities": [{"type": "email", "strategy": "redact"}], "applyTo": ["output"]}}
    )
    middlewares = pii_middleware([masking, redacting])
    assert sorted((m.strategy, m.apply_to_input, m.apply_to_output) for m in middlewares) == [
        ("mask", True, False),
        ("redact", False, True),
    ]
    agent, model = agent_for([masking, redacting], reply="write to ops@example.com", layout=layout)
    result = run(agent, HumanMessage("I am jane@example.com"), layout)
    assert model.seen[0][-1].content == "I am ****@example.com"
    assert result["messages"][-1].content == "write to [REDACTED_EMAIL]"


def test_unnamed_custom_entities_are_one_custom_middleware_like_the_engine(layout: str):
    specs = [
        GuardrailSpec.model_validate(
            {
                "pii": {
                    "entities": [
                        {"type": "custom", "detector": "TCK-[0-9]{4}"},
                        {"type": "custom", "detector": "EMP-[0-9]{6}"},
                    ]
                }
            }
        )
    ]
    middlewares = pii_middleware(specs)
    assert [m.pii_type for m in middlewares] == ["custom"]
    text = "ticket TCK-1234 for EMP-123456"
    agent, model = agent_for(specs, reply="ok", layout=layout)
    run(agent, HumanMessage(text), layout)
    assert model.seen[0][-1].content == GuardrailEngine(specs).scan(text, "input").text
    assert model.seen[0][-1].content == "ticket [REDACTED_CUSTOM] for [REDACTED_CUSTOM]"
