"""The API server rejects invalid Fleetward resources (schema and CEL), and the error
names the offending field and what is allowed. Each case starts from a valid object
and breaks one thing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support.agents import approve_as

GROUP, VERSION = "fleetward.dev", "v1alpha1"
NS = "default"

TOOL = {
    "name": "lookup",
    "description": "Look something up.",
    "inputSchema": {"type": "object"},
    "endpoint": "http://127.0.0.1:18080/tools/lookup",
}
AGENT = {
    "apiVersion": "fleetward.dev/v1alpha1",
    "kind": "Agent",
    "metadata": {"name": "bad-agent"},
    "spec": {"role": "specialist", "model": {"name": "m", "baseURL": "http://127.0.0.1:18000/v1"}, "tools": [TOOL]},
}
ROUTER = {
    "apiVersion": "fleetward.dev/v1alpha1",
    "kind": "Agent",
    "metadata": {"name": "bad-router"},
    "spec": {
        "role": "router",
        "model": {"name": "m", "baseURL": "http://127.0.0.1:18000/v1"},
        "routes": {"billing": "billing"},
    },
}
SOP = {
    "apiVersion": "fleetward.dev/v1alpha1",
    "kind": "SOP",
    "metadata": {"name": "bad-sop"},
    "spec": {
        "domain": "billing",
        "title": "Refund",
        "version": "1.0.0",
        "instructions": "Refund carefully.",
        "steps": [
            {"id": "verify", "instruction": "Verify.", "tool": "verify_transaction"},
            {"id": "refund", "instruction": "Refund.", "tool": "issue_refund", "requires": ["verify"]},
        ],
    },
}
GUARDRAIL = {
    "apiVersion": "fleetward.dev/v1alpha1",
    "kind": "Guardrail",
    "metadata": {"name": "bad-guardrail"},
    "spec": {"pii": {"entities": [{"type": "email", "strategy": "redact"}]}},
}
KILLSWITCH = {
    "apiVersion": "fleetward.dev/v1alpha1",
    "kind": "KillSwitch",
    "metadata": {"name": "bad-switch"},
    "spec": {"engaged": True, "reason": "incident 42"},
}


def broken(base: dict, change: Callable[[dict], None]) -> dict:
    obj = copy.deepcopy(base)
    change(obj)
    return obj


def setter(path: str, value) -> Callable[[dict], None]:
    """setter("spec.model.temperature", 3): set one (dotted, [i]-indexed) path."""

    def change(obj: dict) -> None:
        keys = path.replace("]", "").replace("[", ".").split(".")
        target = obj
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target.setdefault(k, {})
        last = keys[-1]
        if value is DELETE:
            del target[last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return change


DELETE = object()

# (id, manifest, fragments that must all appear in the API server's message)
CASES = [
    (
        "agent-role-enum",
        broken(AGENT, setter("spec.role", "boss")),
        ["spec.role", 'Unsupported value: "boss"', '"router"', '"specialist"'],
    ),
    ("agent-model-required", broken(AGENT, setter("spec.model", DELETE)), ["spec.model", "Required value"]),
    (
        "agent-replicas-xor-autoscaling",
        broken(AGENT, lambda o: o["spec"].update(replicas=2, autoscaling={"minReplicas": 1, "maxReplicas": 3})),
        ["spec", "set either replicas or autoscaling, not both"],
    ),
    (
        "agent-autoscaling-min-gt-max",
        broken(AGENT, setter("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2})),
        ["spec.autoscaling.minReplicas", "minReplicas must not exceed maxReplicas"],
    ),
    (
        "agent-budget-positive",
        broken(AGENT, setter("spec.budget", {"maxTokensPerRun": 0})),
        ["spec.budget.maxTokensPerRun", "should be greater than or equal to 1"],
    ),
    (
        "agent-alert-threshold-fraction",
        broken(AGENT, setter("spec.budget", {"alertThresholds": [0.5, 1.5]})),
        ["spec.budget.alertThresholds", "alertThresholds must be fractions in (0, 1]"],
    ),
    (
        "agent-tool-names-unique",
        broken(AGENT, lambda o: o["spec"]["tools"].append(dict(TOOL))),
        ["spec.tools[1]", "Duplicate value", '"lookup"'],
    ),
    (
        "agent-circuit-breaker-threshold",
        broken(AGENT, setter("spec.tools[0].circuitBreaker", {"failureThreshold": 0})),
        ["spec.tools[0].circuitBreaker.failureThreshold", "should be greater than or equal to 1"],
    ),
    (
        "agent-tool-endpoint-url",
        broken(AGENT, setter("spec.tools[0].endpoint", "ftp://files.example/lookup")),
        ["spec.tools[0].endpoint", "endpoint must be an http(s) URL"],
    ),
    (
        "agent-tool-input-schema-object",
        broken(AGENT, setter("spec.tools[0].inputSchema", {"type": "string"})),
        ["spec.tools[0].inputSchema.type", 'Unsupported value: "string"', '"object"'],
    ),
    (
        "agent-tool-name-pattern",
        broken(AGENT, setter("spec.tools[0].name", "look up!")),
        ["spec.tools[0].name", "should match"],
    ),
    (
        "agent-model-base-url",
        broken(AGENT, setter("spec.model.baseURL", "not a url")),
        ["spec.model.baseURL", "baseURL must be an http(s) URL"],
    ),
    (
        "agent-temperature-range",
        broken(AGENT, setter("spec.model.temperature", 3)),
        ["spec.model.temperature", "should be less than or equal to 2"],
    ),
    (
        "agent-risk-above-needs-threshold",
        broken(AGENT, setter("spec.humanReview", {"draftApproval": "riskAbove"})),
        ["spec.humanReview.riskThreshold", "draftApproval 'riskAbove' needs riskThreshold (0-100)"],
    ),
    (
        "agent-draft-approval-enum",
        broken(AGENT, setter("spec.humanReview", {"draftApproval": "sometimes"})),
        ["spec.humanReview.draftApproval", 'Unsupported value: "sometimes"'],
    ),
    (
        "agent-router-needs-routes",
        broken(ROUTER, setter("spec.routes", DELETE)),
        ["spec.routes", "a router needs routes or a fallback"],
    ),
    (
        "agent-router-empty-routes",
        broken(ROUTER, setter("spec.routes", {})),
        ["spec.routes", "a router needs routes or a fallback"],
    ),
    (
        "agent-specialist-takes-no-routes",
        broken(AGENT, setter("spec.routes", {"x": "y"})),
        ["spec.routes", "only a router takes routes and fallback"],
    ),
    (
        "agent-route-topic-malformed",
        broken(ROUTER, setter("spec.routes", {"Billing Team": "billing"})),
        ["spec.routes", "each key is a classification topic"],
    ),
    (
        "agent-route-agent-malformed",
        broken(ROUTER, setter("spec.routes", {"billing": "Billing_Agent"})),
        ["spec.routes.billing", "should match"],
    ),
    (
        "agent-routes-as-list",
        broken(ROUTER, setter("spec.routes", [{"topic": "billing", "agent": "billing"}])),
        ["spec.routes", "must be of type object"],
    ),
    (
        "agent-fallback-exactly-one",
        broken(ROUTER, setter("spec.fallback", {"agent": "general", "humanQueue": "human-support"})),
        ["spec.fallback", "fallback needs exactly one of 'agent' or 'humanQueue'"],
    ),
    (
        "agent-name-becomes-object-names",
        broken(AGENT, setter("metadata.name", "9-lives")),
        ["metadata.name", "use at most 52 lowercase letters"],
    ),
    (
        "agent-selector-in-needs-values",
        broken(AGENT, setter("spec.sopSelector", {"matchExpressions": [{"key": "domain", "operator": "In"}]})),
        ["spec.sopSelector", "operators In and NotIn need a non-empty 'values'"],
    ),
    (
        "sop-requires-later-step",
        broken(SOP, lambda o: o["spec"]["steps"][0].update(requires=["refund"])),
        ["spec.steps", "steps[].requires may only name steps defined earlier in the list"],
    ),
    (
        "sop-requires-unknown-step",
        broken(SOP, setter("spec.steps[1].requires", ["verify-identity"])),
        ["spec.steps", "steps[].requires may only name steps defined earlier in the list"],
    ),
    (
        "sop-step-ids-unique",
        broken(SOP, setter("spec.steps[1].id", "verify")),
        ["spec.steps[1]", "Duplicate value", '"verify"'],
    ),
    ("sop-version-pattern", broken(SOP, setter("spec.version", "latest")), ["spec.version", "should match"]),
    (
        "sop-approval-enum",
        broken(SOP, setter("spec.steps[1].approval", "maybe")),
        ["spec.steps[1].approval", 'Unsupported value: "maybe"', '"none"', '"human"'],
    ),
    (
        "sop-instructions-required",
        broken(SOP, setter("spec.instructions", DELETE)),
        ["spec.instructions", "Required value"],
    ),
    (
        "guardrail-strategy-enum",
        broken(GUARDRAIL, setter("spec.pii.entities[0].strategy", "shred")),
        ["spec.pii.entities[0].strategy", 'Unsupported value: "shred"', '"redact"', '"mask"', '"hash"', '"block"'],
    ),
    (
        "guardrail-pii-type-enum",
        broken(GUARDRAIL, setter("spec.pii.entities[0].type", "passport")),
        ["spec.pii.entities[0].type", 'Unsupported value: "passport"', '"credit_card"'],
    ),
    (
        "guardrail-custom-needs-detector",
        broken(GUARDRAIL, setter("spec.pii.entities[0]", {"type": "custom"})),
        ["spec.pii.entities[0]", "a custom PII entity needs 'detector' (a regular expression)"],
    ),
    (
        "guardrail-not-empty",
        broken(GUARDRAIL, setter("spec", {})),
        ["spec", "a Guardrail needs at least one of pii, injection, policy or limits"],
    ),
    (
        "guardrail-injection-mode",
        broken(GUARDRAIL, setter("spec.injection", {"mode": "loud"})),
        ["spec.injection.mode", 'Unsupported value: "loud"', '"enforce"', '"observe"', '"off"'],
    ),
    (
        "guardrail-apply-to-enum",
        broken(GUARDRAIL, setter("spec.pii.applyTo", ["logs"])),
        ["spec.pii.applyTo[0]", 'Unsupported value: "logs"', '"toolResults"'],
    ),
    (
        "killswitch-reason-when-engaged",
        broken(KILLSWITCH, setter("spec.reason", DELETE)),
        ["spec.reason", "reason is required when engaged"],
    ),
    (
        "killswitch-reason-not-blank",
        broken(KILLSWITCH, setter("spec.reason", "   ")),
        ["spec.reason", "reason is required when engaged"],
    ),
    (
        "killswitch-drain-timeout",
        broken(KILLSWITCH, setter("spec.drainTimeoutSeconds", 0)),
        ["spec.drainTimeoutSeconds", "should be greater than or equal to 1"],
    ),
    (
        "killswitch-scope-namespace-name",
        broken(KILLSWITCH, setter("spec.scope", {"namespaces": ["Bad_NS"]})),
        ["spec.scope.namespaces[0]", "should match"],
    ),
    # Wrong types reach the mutating webhook (installed when a module before this one installed
    # Fleetward) before the schema: it lets them through for the schema's message (it failed
    # with "AttributeError: 'str' object has no attribute 'get'"; unit test in
    # test_operator_killswitch.py).
    (
        "killswitch-approvals-not-objects",
        broken(KILLSWITCH, setter("spec.approvals", ["alice"])),
        ["spec.approvals[0]", "must be of type object"],
    ),
    (
        # what `-l tier==payments` turned into before the CLI parsed kubectl's syntax
        "killswitch-selector-label-key",
        broken(KILLSWITCH, setter("spec.scope", {"agentSelector": {"matchLabels": {"tier!": "payments"}}})),
        ["spec.scope.agentSelector.matchLabels", "a label key is a name of at most 63 characters"],
    ),
    (
        "killswitch-selector-label-value",
        broken(KILLSWITCH, setter("spec.scope", {"agentSelector": {"matchLabels": {"tier": "=payments"}}})),
        ["spec.scope.agentSelector.matchLabels.tier", "should match"],
    ),
    (
        "killswitch-selector-expression-key",
        broken(
            KILLSWITCH,
            setter("spec.scope", {"agentSelector": {"matchExpressions": [{"key": " team", "operator": "Exists"}]}}),
        ),
        ["spec.scope.agentSelector.matchExpressions[0].key", "should match"],
    ),
    (
        "agent-pod-label-key",
        broken(AGENT, setter("spec.deployment", {"podLabels": {"team name": "billing"}})),
        ["spec.deployment.podLabels", "a label key is a name of at most 63 characters"],
    ),
    (
        "agent-sop-selector-label-value",
        broken(AGENT, setter("spec.sopSelector", {"matchLabels": {"domain": "billing and refunds"}})),
        ["spec.sopSelector.matchLabels.domain", "should match"],
    ),
    (
        "killswitch-scope-not-an-object",
        broken(KILLSWITCH, setter("spec.scope", "all")),
        ["spec.scope", "must be of type object"],
    ),
    (
        "killswitch-engaged-required",
        broken(KILLSWITCH, setter("spec.engaged", DELETE)),
        ["spec.engaged", "Required value"],
    ),
]


def _create(objs: client.CustomObjectsApi, manifest: dict, **kwargs) -> dict:
    plural = {"Agent": "agents", "SOP": "sops", "Guardrail": "guardrails", "KillSwitch": "killswitches"}[
        manifest["kind"]
    ]
    if manifest["kind"] == "KillSwitch":
        return objs.create_cluster_custom_object(GROUP, VERSION, plural, manifest, **kwargs)
    return objs.create_namespaced_custom_object(GROUP, VERSION, NS, plural, manifest, **kwargs)


def _message(err: ApiException) -> str:
    return json.loads(err.body)["message"]


@pytest.fixture(scope="module")
def objs(crds, api) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.mark.parametrize("base", [AGENT, ROUTER, SOP, GUARDRAIL, KILLSWITCH], ids=lambda b: b["kind"])
def test_the_valid_bases_are_accepted(objs, base):
    # dry run: proves every rejection below comes from the one thing each case breaks
    _create(objs, copy.deepcopy(base), dry_run="All")


@pytest.mark.parametrize("case_id,manifest,fragments", CASES, ids=[c[0] for c in CASES])
def test_invalid_manifest_is_rejected_naming_the_field(objs, case_id, manifest, fragments):
    with pytest.raises(ApiException) as err:
        _create(objs, manifest, dry_run="All")
    assert err.value.status == 422, err.value.body
    message = _message(err.value)
    for fragment in fragments:
        assert fragment in message, f"{case_id}: {fragment!r} not in {message!r}"


def test_spelling_variants_of_the_spec_are_accepted(objs):
    """What a reader of SPEC §2 may write: `provider: openai`, a tool with only a name and an
    endpoint (description and inputSchema defaulted), an env entry with only a name, an SOP
    `version: 2` (a YAML integer)."""
    agent = broken(AGENT, setter("spec.model.provider", "openai"))
    agent["spec"]["tools"] = [{"name": "ping", "endpoint": "http://127.0.0.1:18080/tools/ping"}]
    created = _create(objs, agent, dry_run="All")
    assert created["spec"]["tools"][0]["inputSchema"] == {"type": "object", "properties": {}}
    agent["spec"]["deployment"] = {"env": [{"name": "FEATURE_FLAG"}]}  # empty, as in a Pod spec
    _create(objs, agent, dry_run="All")
    sop = _create(objs, broken(SOP, setter("spec.version", 2)), dry_run="All")
    assert sop["spec"]["version"] == 2


def test_unknown_fields_are_rejected_with_strict_validation(objs):
    # kubectl apply validates strictly by default; the schema knows every field.
    manifest = broken(AGENT, setter("spec.colour", "red"))
    with pytest.raises(ApiException) as err:
        _create(objs, manifest, dry_run="All", field_validation="Strict")
    assert 'unknown field "spec.colour"' in _message(err.value)


def test_releasing_a_kill_switch_needs_two_approvals(objs, user_kubeconfigs):
    name = "release-needs-approvals"
    engaged = broken(KILLSWITCH, setter("metadata.name", name))
    # A scope that covers no Agent: the operator in this cluster would otherwise really halt
    # every agent of the test cluster while this test checks the admission rules.
    engaged["spec"]["scope"] = {"namespaces": ["no-agents-here"]}
    _create(objs, engaged)
    try:
        patch = {"spec": {"engaged": False}}
        with pytest.raises(ApiException) as err:
            objs.patch_cluster_custom_object(GROUP, VERSION, "killswitches", name, patch)
        assert err.value.status == 422
        assert "spec.approvals" in _message(err.value)
        assert "at least two distinct users" in _message(err.value)

        one = {"spec": {"engaged": False, "approvals": [{"user": "alice"}]}}
        with pytest.raises(ApiException):
            objs.patch_cluster_custom_object(GROUP, VERSION, "killswitches", name, one)

        # Approvals are added by the approvers themselves (with the admission webhook installed
        # a user cannot write another user's approval), then anyone may release.
        approve_as(user_kubeconfigs, name, "bob", "carol")
        released = objs.patch_cluster_custom_object(GROUP, VERSION, "killswitches", name, {"spec": {"engaged": False}})
        assert released["spec"]["engaged"] is False
    finally:
        objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", name)


def test_the_same_approver_twice_is_rejected(objs):
    manifest = broken(KILLSWITCH, setter("spec.approvals", [{"user": "alice"}, {"user": "alice"}]))
    with pytest.raises(ApiException) as err:
        _create(objs, manifest, dry_run="All")
    assert "spec.approvals[1]" in _message(err.value) and "Duplicate value" in _message(err.value)
