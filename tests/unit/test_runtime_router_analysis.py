"""The router's structured output (agent-runtime/fleetward/runtime/graphs/router.py): the
schema the model is given lists intents and topics; an answer in SPEC §4's one-topic
`QueryAnalysis` shape is read as a one-topic analysis, not refused."""

from __future__ import annotations

import pytest
from fleetward.runtime.graphs.router import RouterAnalysis, wire_analysis
from pydantic import ValidationError


def test_the_specs_one_topic_shape_is_read_as_a_one_topic_analysis():
    spec_shape = {"intent": "refund", "urgency": "high", "tone": "angry", "topic": "billing", "is_sensitive": True}
    analysis = RouterAnalysis.model_validate(spec_shape)
    assert analysis.intents == ["refund"] and analysis.topics == ["billing"] and analysis.is_sensitive
    assert analysis.parts == []
    wire = wire_analysis(analysis.model_dump(), "billing")
    assert wire == {"intent": "refund", "urgency": "high", "tone": "angry", "topic": "billing", "isSensitive": True}
    camel = {**spec_shape, "isSensitive": False}
    del camel["is_sensitive"]
    assert RouterAnalysis.model_validate(camel).is_sensitive is False


def test_the_one_topic_shape_is_still_validated():
    with pytest.raises(ValidationError, match="urgency"):
        RouterAnalysis.model_validate(
            {"intent": "x", "urgency": "whenever", "tone": "t", "topic": "billing", "is_sensitive": False}
        )
    with pytest.raises(ValidationError, match="topics"):
        RouterAnalysis.model_validate(
            {"intent": "x", "urgency": "low", "tone": "t", "topic": "Not A Topic!", "is_sensitive": False}
        )
    # mixing the two shapes is not guessed at: the list form's own rules apply
    with pytest.raises(ValidationError, match="intent"):
        RouterAnalysis.model_validate(
            {"intent": "x", "intents": ["x"], "urgency": "low", "tone": "t", "topics": ["a"], "is_sensitive": False}
        )
