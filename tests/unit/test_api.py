"""The typed API: the examples parse, the committed CRDs are what the models generate,
and the generated schemas are structural."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fleetward.api import crdgen
from fleetward.api.agent import Agent
from fleetward.api.guardrail import Guardrail
from fleetward.api.killswitch import KillSwitch
from fleetward.api.sop import SOP

REPO = Path(__file__).resolve().parents[2]
MODELS = {m.KIND.kind: m for m in crdgen.KINDS}


def example_docs() -> list[dict]:
    docs = []
    for path in sorted((REPO / "examples" / "githouse").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("folder", ["crds", "charts/fleetward/crds"])
def test_committed_crds_are_generated_from_the_models(folder):
    problems = crdgen.stale(REPO / folder)
    assert problems == [], "run `fleetward crds generate`: " + "; ".join(problems)


def test_stale_detection_notices_a_hand_edit(tmp_path):
    crdgen.generate(tmp_path)
    assert crdgen.stale(tmp_path) == []
    target = tmp_path / crdgen.file_name(Agent)
    target.write_text(target.read_text().replace("maxReplicas", "maxReplicaz"))
    assert crdgen.stale(tmp_path) == [f"{target.name}: differs from the models"]


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("model", crdgen.KINDS, ids=lambda m: m.KIND.kind)
def test_schemas_are_structural(model):
    schema = crdgen.openapi_schema(model)
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert node.get("default", 0) is not None, f"{path}: default null is not structural"
        if node.get("x-kubernetes-int-or-string"):
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path


@pytest.mark.parametrize("model", crdgen.KINDS, ids=lambda m: m.KIND.kind)
def test_crd_has_category_short_names_status_and_ready_column(model):
    crd = crdgen.crd(model)
    names = crd["spec"]["names"]
    assert names["categories"] == ["fleetward"]
    assert names["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions"} <= set(status)
    condition = status["conditions"]["items"]["properties"]
    assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}


def test_every_example_parses_with_its_model():
    kinds = set()
    for doc in example_docs():
        model = MODELS.get(doc["kind"])
        if model is None:
            continue  # Namespace, Secret
        obj = model.model_validate(doc)
        kinds.add(doc["kind"])
        assert obj.spec.to_wire() == model.model_validate(doc).spec.to_wire()
    assert kinds == {"Agent", "SOP", "Guardrail", "KillSwitch"}


def test_githouse_covers_the_seven_domains_router_drafts_and_feedback():
    agents = {d["metadata"]["name"]: d["spec"] for d in example_docs() if d["kind"] == "Agent"}
    domains = {"account-security", "billing", "enterprise", "devsupport", "workers", "shotgun", "discourse"}
    assert domains <= set(agents)
    router = agents["router"]
    assert router["role"] == "router" and set(router["routes"].values()) == domains
    assert router["fallback"] == {"humanQueue": "human-support"}
    assert agents["drafts"]["humanReview"]["draftApproval"] == "always"
    assert "feedback" in agents


def test_defaults_match_the_spec():
    agent = Agent.model_validate(
        {
            "kind": "Agent",
            "metadata": {"name": "a"},
            "spec": {"role": "specialist", "model": {"name": "m", "baseURL": "http://127.0.0.1:1/v1"}},
        }
    )
    assert agent.spec.budget.alert_thresholds == [0.5, 0.8, 0.95]
    assert agent.spec.human_review.draft_approval == "never"
    ks = KillSwitch.model_validate({"kind": "KillSwitch", "metadata": {"name": "k"}, "spec": {"engaged": False}})
    assert ks.spec.actions.model_dump() == {
        "revoke_credentials": True,
        "drain_queues": True,
        "close_sessions": True,
        "scale_to_zero": True,
    }
    assert ks.spec.drain_timeout_seconds == 30


def test_router_routes_map_topics_to_agents_and_old_lists_are_still_read():
    def router(routes):
        spec = {"role": "router", "model": {"name": "m", "baseURL": "http://127.0.0.1:1/v1"}, "routes": routes}
        return Agent.model_validate({"kind": "Agent", "metadata": {"name": "r"}, "spec": spec}).spec

    assert router({"billing": "billing", "account": "account-security"}).routes == {
        "billing": "billing",
        "account": "account-security",
    }
    # An Agent stored before routes became a mapping.
    assert router([{"topic": "billing", "agent": "billing"}]).routes == {"billing": "billing"}
    for bad, field in [
        ({"Billing Team": "billing"}, "routes.Billing Team"),
        ({"billing": "Bill_Agent"}, "routes.billing"),
    ]:
        with pytest.raises(ValidationError) as err:
            router(bad)
        assert field in str(err.value)
    routes = crdgen.openapi_schema(Agent)["properties"]["spec"]["properties"]["routes"]
    assert routes["type"] == "object" and routes["additionalProperties"]["pattern"]
    assert "self.all(" in routes["x-kubernetes-validations"][0]["rule"]


@pytest.mark.parametrize(
    "model,spec,field",
    [
        (Agent, {"role": "boss", "model": {"name": "m", "baseURL": "http://x"}}, "role"),
        (SOP, {"domain": "d", "title": "t", "version": "1", "instructions": "i", "colour": "red"}, "colour"),
        (Guardrail, {"pii": {"entities": [{"type": "email", "strategy": "shred"}]}}, "strategy"),
        (KillSwitch, {"engaged": True, "drainTimeoutSeconds": 0}, "drainTimeoutSeconds"),
    ],
    ids=["agent-role", "sop-unknown-field", "guardrail-strategy", "killswitch-drain"],
)
def test_models_reject_bad_input_naming_the_field(model, spec, field):
    with pytest.raises(ValidationError) as err:
        model.model_validate({"kind": model.KIND.kind, "metadata": {"name": "x"}, "spec": spec})
    assert field in str(err.value)


def test_helm_chart_lints_clean():
    import subprocess

    from fleetward.devcluster.layout import binaries

    out = subprocess.run(
        [str(binaries().helm), "lint", "--strict", str(REPO / "charts" / "fleetward")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_helm_chart_renders_without_a_cluster():
    """`helm template` (what ArgoCD and a CI check run) works without --kube-version: the
    chart's kubeVersion constraint is met by the Kubernetes version Helm assumes offline."""
    import subprocess

    import yaml

    from fleetward.devcluster.layout import binaries

    out = subprocess.run(
        [str(binaries().helm), "template", "fw", str(REPO / "charts" / "fleetward"), "--namespace", "fleetward"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc}
    assert {"Deployment", "ServiceAccount", "ValidatingWebhookConfiguration"} <= kinds, kinds
