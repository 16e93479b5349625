"""The Guardrail admission webhook's decisions (operator/fleetward/operator/webhooks.py) and
its AdmissionReview answers (killswitch/admission.py, path /guardrail-check): every regular
expression the agent runtime compiles is compiled in the runtime's dialect, and a refusal
names each field. The API server calling it for real: tests/integration/test_guardrail_webhook.py."""

from __future__ import annotations

import copy

import pytest
from fleetward.operator.killswitch.admission import GUARDRAIL_NORMALIZE_PATH, GUARDRAIL_PATH, review
from fleetward.operator.settings import OperatorSettings
from fleetward.operator.webhooks import Invalid, check_guardrail, guardrail_problems, serves_namespace
from fleetward.runtime.guardrails import GuardrailConfigError, GuardrailEngine

from fleetward.api.guardrail import GuardrailSpec

VALID = {
    "pii": {
        "entities": [
            {"type": "email"},
            {"type": "custom", "detector": r"TCK-\d{4}"},
            {"type": "phone", "detector": r"\+1 \d{3} \d{4}", "strategy": "mask"},
        ]
    },
    "injection": {"mode": "enforce", "patterns": [r"(?i)ignore\s+all", "jailbreak", r"\bDAN\b"]},
    "policy": {"bannedPhrases": ["bypass"]},
}


def guardrail(spec: dict, name: str = "g", **meta) -> dict:
    return {"metadata": {"name": name, "namespace": "shop", **meta}, "spec": copy.deepcopy(spec)}


def with_(path: str, value) -> dict:
    """VALID with one field (dotted, [i]-indexed) replaced."""
    spec = copy.deepcopy(VALID)
    keys = path.replace("]", "").replace("[", ".").split(".")
    target = spec
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    target[int(last) if last.isdigit() else last] = value
    return spec


def test_a_valid_guardrail_has_no_problems():
    assert guardrail_problems(VALID) == []
    check_guardrail("CREATE", None, guardrail(VALID))


@pytest.mark.parametrize(
    ("path", "pattern", "error"),
    [
        ("pii.entities[1].detector", "TCK-(", "missing ), unterminated subpattern at position 4"),
        ("pii.entities[2].detector", "[0-9", "unterminated character set"),  # a built-in type's replacement
        ("injection.patterns[0]", "*ignore", "nothing to repeat at position 0"),
        ("injection.patterns[2]", r"\bDAN\b(", "missing ), unterminated subpattern"),
        ("injection.patterns[1]", r"x{3,1}", "min repeat greater than max repeat"),
        ("injection.patterns[1]", r"\p{L}+", r"bad escape \p"),  # PCRE and RE2 accept it; Python re does not
        ("injection.patterns[1]", r"ab(?i)c", "global flags not at the start"),
        ("injection.patterns[1]", r"(?<=a|bb)c", "look-behind requires fixed-width pattern"),
    ],
)
def test_each_invalid_pattern_is_named_with_the_compilers_error(path, pattern, error):
    spec = with_(path, pattern)
    problems = guardrail_problems(spec)
    assert [field for field, _ in problems] == [f"spec.{path}"]
    assert error in problems[0][1] and repr(pattern) in problems[0][1]
    assert "allowed: a regular expression in Python `re` syntax" in problems[0][1]
    with pytest.raises(Invalid) as refused:
        check_guardrail("CREATE", None, guardrail(spec, name="shop-guard"))
    message = str(refused.value)
    assert (
        message.startswith("Guardrail 'shop-guard' is invalid: ") and f"spec.{path}: " in message and error in message
    )


def test_every_invalid_field_is_named_in_one_refusal():
    spec = with_("injection.patterns[2]", "(")
    spec["pii"]["entities"][0]["detector"] = "[a-"
    spec["injection"]["patterns"][0] = "+"
    with pytest.raises(Invalid) as refused:
        check_guardrail("CREATE", None, guardrail(spec))
    fields = [f for f, _ in refused.value.problems]
    assert fields == ["spec.pii.entities[0].detector", "spec.injection.patterns[0]", "spec.injection.patterns[2]"]
    status = refused.value.status()
    assert status["code"] == 422 and status["reason"] == "Invalid"
    assert [c["field"] for c in status["details"]["causes"]] == fields
    assert all(f in status["message"] for f in fields)


def test_patterns_are_checked_even_where_the_runtime_would_not_compile_them_today():
    off = with_("injection.mode", "off")
    off["injection"]["patterns"][1] = "("
    assert [f for f, _ in guardrail_problems(off)] == ["spec.injection.patterns[1]"]
    narrowed = with_("pii.entities[1].detector", "(")
    narrowed["pii"]["applyTo"] = ["output"]
    assert [f for f, _ in guardrail_problems(narrowed)] == ["spec.pii.entities[1].detector"]


def test_a_long_pattern_is_shortened_in_the_message():
    problems = guardrail_problems(with_("injection.patterns[0]", "(" + "a" * 500))
    assert len(problems[0][1]) < 300 and "aaa...'" in problems[0][1]


@pytest.mark.parametrize(
    "pattern",
    ["(", "[a-", r"\p{L}", "a{2,1}", "ab(?i)", r"(?P<x>a)(?P<x>b)", r"(?<=a+)b", r"\Z", r"(?P<n>a)(?P=n)", "é+"],
)
def test_the_webhook_and_the_runtime_engine_agree(pattern):
    """Same dialect: a pattern is refused at admission exactly when the runtime's engine
    (the one behind the agent runtime and `fleetward guardrail scan`) refuses it."""
    spec = {"injection": {"patterns": [pattern]}, "pii": {"entities": [{"type": "custom", "detector": pattern}]}}
    try:
        GuardrailEngine([GuardrailSpec.model_validate(spec)])
        runtime_ok = True
    except GuardrailConfigError:
        runtime_ok = False
    assert (guardrail_problems(spec) == []) == runtime_ok


def test_only_creates_and_spec_changes_are_checked():
    legacy = guardrail(with_("injection.patterns[0]", "("))  # stored before the webhook existed
    relabelled = copy.deepcopy(legacy)
    relabelled["metadata"]["labels"] = {"team": "shop"}
    check_guardrail("UPDATE", legacy, relabelled)  # metadata only: e.g. Kopf's annotations, finalizers
    check_guardrail("DELETE", legacy, None)
    deleting = copy.deepcopy(legacy)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    check_guardrail("UPDATE", legacy, deleting)
    edited = copy.deepcopy(legacy)
    edited["spec"]["injection"]["patterns"].append("fine")
    with pytest.raises(Invalid, match=r"spec.injection.patterns\[0\]"):
        check_guardrail("UPDATE", legacy, edited)
    fixed = copy.deepcopy(legacy)
    fixed["spec"]["injection"]["patterns"][0] = r"\("
    check_guardrail("UPDATE", legacy, fixed)


def test_scope_follows_watch_and_exclude_namespaces():
    assert serves_namespace("shop", [], [])
    assert serves_namespace("shop", ["shop", "b"], [])
    assert not serves_namespace("other", ["shop"], [])
    assert not serves_namespace("scoped-a", [], ["scoped-*"])
    assert not serves_namespace("shop", ["shop"], ["sh?p"])
    assert not serves_namespace(None, [], [])


# -- the AdmissionReview answers ------------------------------------------------------------------


def answer(
    settings: OperatorSettings, operation: str, new: dict | None, old: dict | None = None, path: str = GUARDRAIL_PATH
) -> dict:
    ns = (new or old or {}).get("metadata", {}).get("namespace")
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "req-7",
            "operation": operation,
            "namespace": ns,
            "object": new,
            "oldObject": old,
            "userInfo": {"username": "system:serviceaccount:ci:deployer"},
        },
    }
    out = review(path, body, settings, dict)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    return out["response"]


CLUSTERWIDE = OperatorSettings(namespace="fleetward-system", exclude_namespaces=["scoped-*"])


def test_an_invalid_guardrail_is_refused_with_422_naming_the_field():
    response = answer(CLUSTERWIDE, "CREATE", guardrail(with_("injection.patterns[2]", "(")))
    assert response["uid"] == "req-7" and response["allowed"] is False
    status = response["status"]
    assert status["code"] == 422
    assert "spec.injection.patterns[2]: invalid regular expression '('" in status["message"]
    assert status["details"]["causes"][0]["field"] == "spec.injection.patterns[2]"


def test_a_valid_guardrail_is_allowed_and_needs_no_particular_user():
    response = answer(CLUSTERWIDE, "CREATE", guardrail(VALID))
    assert response == {"uid": "req-7", "allowed": True}


def test_guardrails_outside_the_installations_namespaces_are_left_to_others():
    bad = with_("injection.patterns[0]", "(")
    excluded = guardrail(bad)
    excluded["metadata"]["namespace"] = "scoped-a"
    assert answer(CLUSTERWIDE, "CREATE", excluded)["allowed"] is True
    scoped = OperatorSettings(namespace="scoped-system", watch_namespaces=["scoped-a"])
    assert answer(scoped, "CREATE", excluded)["allowed"] is False
    elsewhere = guardrail(bad)  # namespace shop: not watched by the scoped installation
    assert answer(scoped, "CREATE", elsewhere)["allowed"] is True


def test_an_unquoted_injection_mode_off_is_written_as_the_string():
    """kubectl's YAML 1.1 reads `mode: off` as false; the mutating pass patches it to "off"
    (the schema, checked after it, would refuse a boolean)."""
    import base64
    import json

    spec = with_("injection.mode", False)
    response = answer(CLUSTERWIDE, "CREATE", guardrail(spec), path=GUARDRAIL_NORMALIZE_PATH)
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"])) == [
        {"op": "replace", "path": "/spec/injection/mode", "value": "off"}
    ]
    for untouched in (VALID, with_("injection.mode", True), {"policy": {"bannedPhrases": ["x"]}}):
        response = answer(CLUSTERWIDE, "UPDATE", guardrail(untouched), path=GUARDRAIL_NORMALIZE_PATH)
        assert response == {"uid": "req-7", "allowed": True}
    elsewhere = guardrail(spec)
    elsewhere["metadata"]["namespace"] = "scoped-a"  # another installation's: not changed here
    assert "patch" not in answer(CLUSTERWIDE, "CREATE", elsewhere, path=GUARDRAIL_NORMALIZE_PATH)
