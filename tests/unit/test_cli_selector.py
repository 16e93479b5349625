"""`fleetward kill -l` reads kubectl's selector syntax into the KillSwitch's agentSelector.
Before, `tier==payments` became matchLabels {tier: "=payments"} and `tier!=payments`
{"tier!": "payments"}: a switch engaged that covered no agent."""

from __future__ import annotations

import pytest

from fleetward.api.base import LabelSelector
from fleetward.cli.selector import SelectorError, parse_label_selector


@pytest.mark.parametrize(
    ("text", "selector"),
    [
        ("tier=payments", {"matchLabels": {"tier": "payments"}}),
        ("tier==payments", {"matchLabels": {"tier": "payments"}}),
        ("tier=payments, team=billing", {"matchLabels": {"tier": "payments", "team": "billing"}}),
        ("example.com/tier=a,empty=", {"matchLabels": {"example.com/tier": "a", "empty": ""}}),
        ("tier!=payments", {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["payments"]}]}),
        (
            "env in (prod, staging),env notin (qa)",
            {
                "matchExpressions": [
                    {"key": "env", "operator": "In", "values": ["prod", "staging"]},
                    {"key": "env", "operator": "NotIn", "values": ["qa"]},
                ]
            },
        ),
        (
            "gpu,!canary",
            {"matchExpressions": [{"key": "gpu", "operator": "Exists"}, {"key": "canary", "operator": "DoesNotExist"}]},
        ),
    ],
)
def test_kubectl_selector_syntax(text, selector):
    assert parse_label_selector(text) == selector
    # what the CLI sends is what the API accepts
    LabelSelector.model_validate(selector)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tier=pay ments", "expected key=value"),
        ("=payments", "is not a label key"),
        ("tier=-x", "is not a label value"),
        ("team name=billing", "expected key=value"),
        ("tier=a,,b=c", "an empty term"),
        ("", "an empty term"),
        ("env in ()", "needs at least one value"),
        ("env in (prod", "without its ')'"),
        ("x=1,x=2", "already required to be '1'"),
    ],
)
def test_what_is_not_a_selector_is_refused_naming_the_term(text, says):
    with pytest.raises(SelectorError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_label_selector(text)


def test_the_api_refuses_label_keys_and_values_the_api_server_would():
    for bad in ({"matchLabels": {"tier!": "x"}}, {"matchLabels": {"tier": "=x"}}, {"matchLabels": {" team": "x"}}):
        with pytest.raises(ValueError):
            LabelSelector.model_validate(bad)
