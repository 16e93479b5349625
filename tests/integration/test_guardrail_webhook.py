"""The Guardrail admission webhook called by the real API server: the operator `helm install`
put on the shared cluster refuses a Guardrail whose regular expressions the agent runtime
could not compile, and the refusal names each field and the compiler's error. The decisions
themselves are unit-tested in tests/unit/test_operator_guardrail_admission.py."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fleetward.devcluster.install import RELEASE
from fleetward.devcluster.process import wait_for

GROUP, VERSION, PLURAL = "fleetward.dev", "v1alpha1", "guardrails"
WEBHOOK = f"check.guardrails.{RELEASE}.fleetward.dev"

VALID = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "Guardrail",
    "metadata": {"name": "shop-guard"},
    "spec": {
        "pii": {
            "entities": [
                {"type": "email"},
                # no name: a custom entity needs only its detector (its findings are type `custom`)
                {"type": "custom", "detector": r"TCK-\d{4}"},
                {"type": "custom", "detector": r"EMP-\d{6}", "strategy": "hash"},
            ]
        },
        "injection": {"patterns": [r"(?i)ignore\s+all", "jailbreak", r"\bDAN\b"]},
    },
}


def invalid() -> dict:
    bad = copy.deepcopy(VALID)
    bad["spec"]["pii"]["entities"][1]["detector"] = "TCK-("
    bad["spec"]["injection"]["patterns"][2] = r"\p{L}+"  # PCRE/RE2 syntax; the runtime's Python re refuses it
    return bad


@pytest.fixture(scope="module")
def objs(api, fleetward) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _message(err: ApiException) -> str:
    return json.loads(err.body)["message"]


def _refused(objs: client.CustomObjectsApi, namespace: str, manifest: dict, **kwargs) -> ApiException:
    with pytest.raises(ApiException) as err:
        objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest, **kwargs)
    return err.value


def test_an_invalid_guardrail_is_refused_naming_every_field(objs, namespace):
    for kwargs in ({"dry_run": "All"}, {}):
        err = _refused(objs, namespace, invalid(), **kwargs)
        assert err.status == 422, err.body
        message = _message(err)
        assert f'admission webhook "{WEBHOOK}" denied the request' in message, message
        assert "spec.pii.entities[1].detector: invalid regular expression 'TCK-(': missing ), unterminated" in message
        assert r"spec.injection.patterns[2]: invalid regular expression '\\p{L}+': bad escape \p" in message
        assert "allowed: a regular expression in Python `re` syntax" in message
        causes = json.loads(err.body)["details"]["causes"]
        assert [c["field"] for c in causes] == ["spec.pii.entities[1].detector", "spec.injection.patterns[2]"]
    with pytest.raises(ApiException) as gone:
        objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "shop-guard")
    assert gone.value.status == 404


def test_kubectl_apply_shows_the_field(kubectl, namespace, fleetward, tmp_path):
    path = tmp_path / "guardrail.yaml"
    path.write_text(json.dumps(invalid()))
    out = kubectl("apply", "--namespace", namespace, "-f", str(path), check=False)
    assert out.returncode != 0
    assert "spec.injection.patterns[2]: invalid regular expression" in out.stderr, out.stderr


def test_a_valid_guardrail_with_unnamed_custom_entities_is_admitted_and_bad_edits_are_refused(objs, namespace):
    created = objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, copy.deepcopy(VALID))
    assert [e.get("name") for e in created["spec"]["pii"]["entities"]] == [None, None, None]

    patch = {"spec": {"injection": {"patterns": ["ok", "[unclosed"]}}}
    with pytest.raises(ApiException) as err:
        objs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "shop-guard", patch)
    assert err.value.status == 422
    assert "spec.injection.patterns[1]: invalid regular expression '[unclosed'" in _message(err.value)

    # metadata-only writes never reach the webhook (matchConditions); spec edits that compile pass
    labelled = objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "shop-guard", {"metadata": {"labels": {"team": "shop"}}}
    )
    assert labelled["metadata"]["labels"] == {"team": "shop"}
    fixed = objs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "shop-guard", {"spec": {"injection": {"patterns": [r"\[unclosed"]}}}
    )
    assert fixed["spec"]["injection"]["patterns"] == [r"\[unclosed"]


@pytest.fixture
def excluded_namespace(core: client.CoreV1Api) -> Iterator[str]:
    """A namespace the shared installation excludes (excludeNamespaces: scoped-*)."""
    name = "scoped-guardrail-webhook"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)

        def gone() -> bool:
            try:
                core.read_namespace(name)
            except ApiException as e:
                return e.status == 404
            return False

        wait_for(gone, 120, f"namespace {name} deleted")


def test_guardrails_in_another_installations_namespaces_are_not_judged(objs, excluded_namespace):
    # The shared installation excludes scoped-* by glob (left to the installation that watches
    # them, see test_operator_scoped.py), so its webhook admits what it does not serve.
    objs.create_namespaced_custom_object(GROUP, VERSION, excluded_namespace, PLURAL, invalid(), dry_run="All")


def test_kubectl_apply_of_an_unquoted_injection_mode_off_stores_off(kubectl, namespace, objs, tmp_path):
    """kubectl reads YAML 1.1, where an unquoted `off` is the boolean false; the CRD's string
    enum refused it ("must be of type string"). The mutating webhook writes it as "off"."""
    path = tmp_path / "guardrail.yaml"
    path.write_text(
        f"apiVersion: {GROUP}/{VERSION}\nkind: Guardrail\nmetadata:\n  name: injection-off\n"
        "spec:\n  injection:\n    mode: off\n  policy:\n    bannedPhrases: [bypass]\n"
    )
    for _ in range(2):  # the second apply changes nothing
        out = kubectl("apply", "--namespace", namespace, "-f", str(path), check=False)
        assert out.returncode == 0, out.stderr
    stored = objs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "injection-off")
    assert stored["spec"]["injection"]["mode"] == "off"
    assert stored["metadata"]["generation"] == 1
    # true (an unquoted on/yes) names no mode: still refused by the schema
    with pytest.raises(ApiException) as err:
        objs.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "injection-off", {"spec": {"injection": {"mode": True}}}
        )
    assert err.value.status == 422 and "spec.injection.mode" in _message(err.value)
