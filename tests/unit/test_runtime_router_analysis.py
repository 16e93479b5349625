"""The router's structured output (agent-runtime/fleetward/runtime/graphs/router.py) is SPEC
§4's `QueryAnalysis`: the schema the model is given has that name and its fields (intent,
urgency, tone, topic, is_sensitive), so a model or a scripted stand-in answering in the
spec's shape is understood; a request over several topics adds `topics` and `parts`."""

from __future__ import annotations

import pytest
from fleetward.runtime.graphs.router import QueryAnalysis, plan_routes, wire_analysis
from langchain.agents.structured_output import ProviderStrategy
from pydantic import ValidationError

SPEC_SHAPE = {"intent": "refund", "urgency": "high", "tone": "angry", "topic": "billing", "is_sensitive": True}


def test_the_schema_the_model_is_given_is_the_specs_query_analysis():
    spec = ProviderStrategy(QueryAnalysis).schema_spec
    assert spec.name == "QueryAnalysis"  # what `match: {schemaName: QueryAnalysis}` sees
    schema = spec.json_schema
    assert set(schema["required"]) == {"intent", "urgency", "tone", "topic", "is_sensitive"}
    assert schema["properties"]["urgency"]["enum"] == ["low", "medium", "high", "critical"]
    assert {"topics", "parts"} <= set(schema["properties"])  # optional, for a fan-out


def test_the_specs_shape_is_a_one_topic_analysis():
    analysis = QueryAnalysis.model_validate(SPEC_SHAPE)
    assert analysis.all_topics == ["billing"] and analysis.is_sensitive and analysis.parts == []
    wire = wire_analysis(analysis.model_dump(), "billing")
    assert wire == {"intent": "refund", "urgency": "high", "tone": "angry", "topic": "billing", "isSensitive": True}


def test_a_request_over_several_topics_lists_them_and_its_parts():
    analysis = QueryAnalysis.model_validate(
        {
            **SPEC_SHAPE,
            "topic": "account",
            "topics": ["billing", "account", "security"],
            "parts": [{"topic": "security", "text": "my deploy keys"}],
        }
    )
    assert analysis.all_topics == ["account", "billing", "security"]  # the main topic first, each once
    plan = plan_routes(
        analysis,
        "the whole request",
        {"account": "req.account", "billing": "req.billing"},
        None,
        "human-support",
        lambda topic: True,
        lambda text: (text, ""),
    )
    assert [(p["topic"], p["action"], p.get("text")) for p in plan] == [
        ("account", "handoff", "the whole request"),
        ("billing", "handoff", "the whole request"),
        ("security", "escalate", "my deploy keys"),
    ]


def test_the_earlier_list_shape_is_still_read():
    """A run checkpointed before the rename, or a scenario written for it."""
    old = {"intents": ["a", "b"], "urgency": "low", "tone": "calm", "topics": ["billing", "account"]}
    analysis = QueryAnalysis.model_validate({**old, "isSensitive": False})
    assert (analysis.intent, analysis.topic, analysis.all_topics) == ("a; b", "billing", ["billing", "account"])
    assert wire_analysis({**old, "is_sensitive": False}, "account")["intent"] == "a; b"


def test_the_classification_is_still_validated():
    with pytest.raises(ValidationError, match="urgency"):
        QueryAnalysis.model_validate({**SPEC_SHAPE, "urgency": "whenever"})
    with pytest.raises(ValidationError, match="topic"):
        QueryAnalysis.model_validate({**SPEC_SHAPE, "topic": "Not A Topic!"})
    with pytest.raises(ValidationError, match="parts"):
        QueryAnalysis.model_validate({**SPEC_SHAPE, "parts": [{"topic": "elsewhere", "text": "x"}]})
    with pytest.raises(ValidationError, match="intents"):  # both shapes at once is not guessed at
        QueryAnalysis.model_validate({**SPEC_SHAPE, "intents": ["x"]})
    with pytest.raises(ValidationError, match="is_sensitive"):
        QueryAnalysis.model_validate({k: v for k, v in SPEC_SHAPE.items() if k != "is_sensitive"})
