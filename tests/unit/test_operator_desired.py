"""Golden tests of the operator's desired state (fleetward.operator.desired) for every
GitHouse Agent: the objects the reconciler applies for a given spec, resolved SOPs and
Guardrails, and settings. Regenerate after an intended change with
`UPDATE_GOLDEN=1 make test-unit` and review the diff."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from fleetward.operator.desired.agent import (
    CONFIG_HASH_ANNOTATION,
    MODEL_CREDENTIALS_HASH_ANNOTATION,
    AgentInputs,
    AgentRef,
    desired_agent,
)
from fleetward.operator.resolve import resolve, selector_matches
from fleetward.operator.settings import OperatorSettings

from fleetward.api.agent import AgentSpec
from fleetward.api.runtimeconfig import RuntimeConfig

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "operator"
EXAMPLE = REPO / "examples" / "githouse"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLE / name).read_text()) if d]


AGENTS = {d["metadata"]["name"]: d for d in _docs("30-agents.yaml")}
SOPS = _docs("20-sops.yaml")
GUARDRAILS = {d["metadata"]["name"]: d for d in _docs("10-guardrails.yaml")}


def inputs_for(name: str, **overrides) -> AgentInputs:
    agent = AGENTS[name]
    spec = AgentSpec.model_validate(agent["spec"])
    res = resolve(spec, SOPS, GUARDRAILS, set(AGENTS))
    assert res.complete, res.missing_guardrails
    fields = dict(
        ref=AgentRef("githouse", name, f"uid-{name}", 1),
        spec=spec,
        settings=OperatorSettings(namespace="fleetward-system"),
        sops=res.sops,
        guardrails=res.guardrails,
        key_id=f"githouse.{name}.0000000000000000",
        kafka_username=f"fleetward.githouse.{name}",
        model_keys={0: b"sk-primary", 1: b"sk-fallback"},
    )
    fields.update(overrides)
    return AgentInputs(**fields)


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_desired_objects_match_golden(name: str) -> None:
    desired = desired_agent(inputs_for(name))
    rendered = yaml.safe_dump_all(desired.objects, sort_keys=True)
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and review it"
    assert rendered == path.read_text(), f"desired objects of {name} changed; if intended, UPDATE_GOLDEN=1"


def test_every_object_is_owned_and_labelled() -> None:
    for name in AGENTS:
        for obj in desired_agent(inputs_for(name)).objects:
            meta = obj["metadata"]
            assert meta["ownerReferences"] == [
                {
                    "apiVersion": "fleetward.dev/v1alpha1",
                    "kind": "Agent",
                    "name": name,
                    "uid": f"uid-{name}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
            assert meta["labels"]["fleetward.dev/agent"] == name
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "fleetward"
            assert meta["namespace"] == "githouse"


def test_config_hash_rolls_pods_only_when_the_config_changes() -> None:
    base = desired_agent(inputs_for("billing"))
    same = desired_agent(inputs_for("billing"))
    assert base.config.config_hash == same.config.config_hash
    sops = inputs_for("billing").sops
    edited = sops[0].model_copy(update={"version": "9.9.9"})
    changed = desired_agent(inputs_for("billing", sops=[edited, *sops[1:]]))
    assert changed.config.config_hash != base.config.config_hash
    dep = next(o for o in changed.objects if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] == changed.config.config_hash


def test_rendered_config_round_trips_through_the_runtime_contract() -> None:
    desired = desired_agent(inputs_for("account-security"))
    cm = next(o for o in desired.objects if o["kind"] == "ConfigMap")
    loaded = RuntimeConfig.model_validate_json(cm["data"]["config.json"])
    assert loaded.content_hash() == loaded.config_hash == desired.config.config_hash
    assert [s.name for s in loaded.sops] == sorted(
        s["metadata"]["name"] for s in SOPS if s["metadata"]["labels"]["githouse.dev/domain"] == "account-security"
    )
    assert loaded.topics.request == "fleetward.requests.githouse.account-security"


def test_router_config_maps_routes_to_request_topics() -> None:
    config = desired_agent(inputs_for("router")).config
    assert config.topics.routes["billing"] == "fleetward.requests.githouse.billing"
    assert len(config.topics.routes) == len(AGENTS["router"]["spec"]["routes"])


def test_the_router_names_the_specialist_of_each_rendered_route() -> None:
    # The runtime reads the rendered config back: a handoff's request topic names its agent.
    from types import SimpleNamespace

    from fleetward.runtime.graphs.router import RouterNodes

    config = desired_agent(inputs_for("router")).config
    nodes = RouterNodes(SimpleNamespace(config=config), topics=None, send=None)
    for topic, agent in AGENTS["router"]["spec"]["routes"].items():
        assert nodes._agent_of(config.topics.routes[topic], "githouse") == f"githouse/{agent}"
    with pytest.raises(ValueError, match="no route"):
        nodes._agent_of("fleetward.requests.githouse.nobody", "githouse")


def test_paused_scales_to_zero_and_drops_the_hpa() -> None:
    spec = AgentSpec.model_validate({**AGENTS["router"]["spec"], "paused": True})
    desired = desired_agent(inputs_for("router", spec=spec))
    dep = next(o for o in desired.objects if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 0
    assert not any(o["kind"] == "HorizontalPodAutoscaler" for o in desired.objects)
    assert ("HorizontalPodAutoscaler", "fw-router") in desired.absent


def test_autoscaling_leaves_replicas_to_the_hpa() -> None:
    desired = desired_agent(inputs_for("router"))
    dep = next(o for o in desired.objects if o["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]
    hpa = next(o for o in desired.objects if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == AGENTS["router"]["spec"]["autoscaling"]["maxReplicas"]


def test_placement_block_passes_through() -> None:
    placement = {
        "nodeSelector": {"type": "kwok"},
        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
                }
            }
        },
        "priorityClassName": "agents",
        "podLabels": {"team": "support"},
        "podAnnotations": {"example.com/x": "1"},
        "env": [{"name": "LOG_LEVEL", "value": "debug"}],
    }
    spec = AgentSpec.model_validate({**AGENTS["billing"]["spec"], "deployment": placement})
    dep = next(o for o in desired_agent(inputs_for("billing", spec=spec)).objects if o["kind"] == "Deployment")
    pod = dep["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"type": "kwok"}
    assert pod["spec"]["tolerations"][0]["operator"] == "Exists"
    assert pod["spec"]["affinity"] == placement["affinity"]
    assert pod["spec"]["priorityClassName"] == "agents"
    assert pod["metadata"]["labels"]["team"] == "support"
    assert pod["metadata"]["annotations"]["example.com/x"] == "1"
    assert {"name": "LOG_LEVEL", "value": "debug"} in pod["spec"]["containers"][0]["env"]


def test_an_otlp_endpoint_reaches_the_runtime_pods_and_an_agent_can_override_it() -> None:
    otlp = "http://otel-collector.observability:4318"
    settings = OperatorSettings(namespace="fleetward-system", telemetry={"otlpEndpoint": otlp})

    def env_of(spec: AgentSpec | None = None) -> list[dict]:
        extra = {"spec": spec} if spec is not None else {}
        inputs = inputs_for("billing", settings=settings, **extra)
        dep = next(o for o in desired_agent(inputs).objects if o["kind"] == "Deployment")
        return dep["spec"]["template"]["spec"]["containers"][0]["env"]

    assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": otlp} in env_of()
    mine = {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://team-collector:4318"}
    spec = AgentSpec.model_validate({**AGENTS["billing"]["spec"], "deployment": {"env": [mine]}})
    names = [e["name"] for e in env_of(spec)]
    assert mine in env_of(spec) and names.count("OTEL_EXPORTER_OTLP_ENDPOINT") == 1  # SSA: one entry per name
    unset = desired_agent(inputs_for("billing")).objects
    dep = next(o for o in unset if o["kind"] == "Deployment")
    assert all(
        e["name"] != "OTEL_EXPORTER_OTLP_ENDPOINT" for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    )
    with pytest.raises(ValueError, match="otlpEndpoint"):
        OperatorSettings(telemetry={"otlpEndpoint": "otel-collector:4318"})  # no scheme


def test_runtime_pods_are_locked_down() -> None:
    dep = next(o for o in desired_agent(inputs_for("billing")).objects if o["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["command"][:3] == ["fleetward", "runtime", "run"]


@pytest.mark.parametrize(
    ("selector", "labels", "match"),
    [
        (None, {"a": "1"}, False),
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {}, True),
    ],
)
def test_label_selector_semantics(selector, labels, match) -> None:
    assert selector_matches(selector, labels) is match


def test_missing_guardrail_is_reported_not_dropped() -> None:
    spec = AgentSpec.model_validate({**AGENTS["billing"]["spec"], "guardrailRefs": [{"name": "nope"}]})
    res = resolve(spec, SOPS, GUARDRAILS, set(AGENTS))
    assert res.missing_guardrails == ["nope"] and not res.complete


def test_runtime_config_schema_is_generated_and_validates_rendered_configs() -> None:
    import json

    import jsonschema

    from fleetward.api import schemagen

    committed = REPO / "schemas" / "runtime-config.schema.json"
    assert committed.read_text() == schemagen.render_runtime_config(), "run `fleetward schemas generate`"
    schema = json.loads(committed.read_text())
    for name in AGENTS:
        config = json.loads(desired_agent(inputs_for(name)).config.to_json())
        jsonschema.validate(config, schema)
    broken = json.loads(desired_agent(inputs_for("billing")).config.to_json())
    broken["spec"]["model"]["temperature"] = 9
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_an_older_body_of_the_same_agent_is_recognised() -> None:
    # Index wake-ups (SOP, Guardrail, KillSwitch, Deployment) may carry a body older than
    # one reconciled already; reconcile_agent reads the Agent again instead of applying it.
    from fleetward.operator.reconcile import is_older_body

    newest = ("uid-1", 4)
    assert is_older_body(newest, AgentRef("ns", "a", "uid-1", 3))
    assert not is_older_body(newest, AgentRef("ns", "a", "uid-1", 4))
    assert not is_older_body(newest, AgentRef("ns", "a", "uid-1", 5))
    assert not is_older_body(newest, AgentRef("ns", "a", "uid-2", 1)), "a re-created Agent starts at 1"
    assert not is_older_body(None, AgentRef("ns", "a", "uid-1", 1))


def test_a_key_the_trust_bundle_refused_is_reported_and_nothing_mounts_it() -> None:
    # The bundle write fails: the apply reports it as the key's problem (CredentialsIssued
    # False, not "is in the trust bundle"), and the Deployment whose pods would mint tokens
    # with that key is not applied.
    import asyncio
    from types import SimpleNamespace

    from fleetward.operator.credentials import AgentCredentials
    from fleetward.operator.reconcile import _apply

    class Bundle:
        async def publish(self, agent: str, jwk: dict) -> None:
            raise RuntimeError("configmaps fleetward-trust-bundle is forbidden")

    class Kube:
        def __init__(self) -> None:
            self.applied: list[str] = []

        async def apply(self, obj: dict) -> dict:
            self.applied.append(obj["kind"])
            return obj

    inputs = inputs_for("billing")
    res = resolve(inputs.spec, SOPS, GUARDRAILS, set(AGENTS))
    kube = Kube()
    ctx = SimpleNamespace(settings=inputs.settings, bundle=Bundle(), kube=kube, applied={})
    creds = AgentCredentials(inputs.key_id, {"kid": inputs.key_id}, inputs.kafka_username, "pw")
    ref = inputs.ref
    result = asyncio.run(
        _apply(
            ctx,
            ref,
            inputs.spec,
            res,
            creds,
            inputs.model_keys,
            None,
            applied_before=False,
            skip_unchanged=False,
            timings={},
        )
    )
    assert result.key_published is False and result.config_hash is None
    assert f"Publishing signing key {inputs.key_id} in the trust bundle failed" in result.problem
    assert "forbidden" in result.problem and "Deployment" not in kube.applied
    assert ctx.applied == {}  # not remembered as applied: the next reconcile tries again


def test_a_deployment_event_older_than_the_applied_deployment_changes_nothing() -> None:
    import asyncio
    from collections import defaultdict
    from types import SimpleNamespace
    from unittest import mock

    from fleetward.operator import conditions as c
    from fleetward.operator.reconcile import AgentState, refresh_availability

    def deployment(generation: int, ready: int) -> dict:
        return {
            "metadata": {
                "namespace": "githouse",
                "name": "fw-billing",
                "uid": "dep-uid",
                "generation": generation,
                "labels": {"fleetward.dev/agent": "billing"},
                "ownerReferences": [{"kind": "Agent", "uid": "uid-billing"}],
            },
            "spec": {"replicas": 1},
            "status": {
                "observedGeneration": generation,
                "replicas": 1,
                "updatedReplicas": ready,
                "readyReplicas": ready,
                "conditions": [{"type": "Available", "status": "True" if ready else "False"}],
            },
        }

    class Kube:
        def __init__(self) -> None:
            self.statuses: list[dict] = []

        async def patch_status(self, kind, ns, name, status) -> None:
            self.statuses.append(status)

    kube = Kube()
    ctx = SimpleNamespace(kube=kube, locks=defaultdict(asyncio.Lock), statuses={}, unconfirmed=set())
    pending = {"phase": "Pending", "observedGeneration": 2, "conditions": []}
    parts = {t: c.Cond(t, True, "Fine", "") for t in c.AGENT_PARTS if t != c.AVAILABLE}
    ctx.statuses[("githouse", "billing")] = AgentState(
        parts=parts, paused=False, status=pending, expected_replicas=1, deployment=("dep-uid", 5)
    )
    with mock.patch("kopf.event"):
        # the old config's pods, available
        assert asyncio.run(refresh_availability(ctx, deployment(4, ready=1))) is True
        assert kube.statuses == []  # stale: the Agent is not reported Available on the old config
        assert asyncio.run(refresh_availability(ctx, deployment(5, ready=1))) is True
    [written] = kube.statuses
    assert c.get(written["conditions"], c.AVAILABLE)["status"] == "True"
    assert ctx.statuses[("githouse", "billing")].deployment == ("dep-uid", 5)
    # After a failover the cache is not built on: the event asks for a reconcile, which
    # starts from the live status (the handler runs it at once, not at the drift timer).
    ctx.unconfirmed.add(("githouse", "billing"))
    with mock.patch("kopf.event"):
        assert asyncio.run(refresh_availability(ctx, deployment(6, ready=0))) is False
    assert len(kube.statuses) == 1


def test_a_rotated_model_key_rolls_the_pods_without_showing_the_key():
    """The runtime builds its model clients at start: a key rotated in the referenced Secret
    must restart the pods once the copy is updated, like a changed config."""

    def template(keys: dict[int, bytes]) -> dict:
        objects = desired_agent(inputs_for("billing", model_keys=keys)).objects
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]

    before = template({0: b"sk-primary", 1: b"sk-fallback"})
    assert template({0: b"sk-primary", 1: b"sk-fallback"}) == before  # level-based: no roll
    for rotated in ({0: b"sk-primary-2", 1: b"sk-fallback"}, {0: b"sk-primary", 1: b"sk-fallback-2"}):
        after = template(rotated)
        assert after[MODEL_CREDENTIALS_HASH_ANNOTATION] != before[MODEL_CREDENTIALS_HASH_ANNOTATION]
        assert after[CONFIG_HASH_ANNOTATION] == before[CONFIG_HASH_ANNOTATION]
    # Keys swapped between models are a change too.
    assert template({0: b"sk-fallback", 1: b"sk-primary"}) != before
    assert "sk-primary" not in repr(before)
    assert MODEL_CREDENTIALS_HASH_ANNOTATION not in template({})  # no credentials named


def test_the_installation_pii_hash_key_reaches_the_runtime_through_the_model_secret():
    """Keyed PII hashes: the key is copied into the model Secret, named in the runtime config,
    and its digest (never the key) is on the pod template, so a rotated key rolls the pods."""
    import base64

    from fleetward.operator.desired.agent import PII_HASH_KEY_HASH_ANNOTATION

    def parts(key: bytes | None) -> tuple[dict, dict, dict]:
        desired = desired_agent(inputs_for("billing", pii_hash_key=key))
        secret = next(
            o for o in desired.objects if o["kind"] == "Secret" and o["metadata"]["name"] == "fw-billing-model"
        )
        deployment = next(o for o in desired.objects if o["kind"] == "Deployment")
        return secret["data"], desired.config.credentials.model_dump(by_alias=True), deployment["spec"]["template"]

    data, creds, template = parts(b"k" * 32)
    assert base64.b64decode(data["pii-hash-key"]) == b"k" * 32
    assert creds["piiHashKeyFile"] == "/etc/fleetward/model/pii-hash-key"
    annotation = template["metadata"]["annotations"][PII_HASH_KEY_HASH_ANNOTATION]
    assert "k" * 32 not in repr(template)
    assert parts(b"r" * 32)[2]["metadata"]["annotations"][PII_HASH_KEY_HASH_ANNOTATION] != annotation
    data, creds, template = parts(None)
    assert "pii-hash-key" not in data and creds["piiHashKeyFile"] is None
    assert PII_HASH_KEY_HASH_ANNOTATION not in template["metadata"]["annotations"]
