"""The CRDs install into the real kube-apiserver and the GitHouse example applies."""

from __future__ import annotations

from kubernetes import client

from fleetward.devcluster.kube import apply_manifest
from fleetward.devcluster.layout import REPO

EXAMPLE = REPO / "examples" / "githouse"


def test_crds_are_established(crds, api):
    assert sorted(crds) == [
        "agents.fleetward.dev",
        "guardrails.fleetward.dev",
        "killswitches.fleetward.dev",
        "sops.fleetward.dev",
    ]
    served = {r.name: r for r in client.CustomObjectsApi(api).get_api_resources("fleetward.dev", "v1alpha1").resources}
    assert served["agents"].short_names == ["agt", "fwagent"]
    assert served["killswitches"].namespaced is False
    assert all("fleetward" in (served[n].categories or []) for n in ("agents", "sops", "guardrails", "killswitches"))


def test_githouse_example_applies_and_lists_under_the_fleetward_category(crds, githouse_example, kubectl):
    applied = githouse_example
    assert "Agent/router" in applied and "KillSwitch/githouse-stop" in applied

    listing = kubectl("get", "fleetward", "-A").stdout
    for name in (
        "agent.fleetward.dev/router",
        "agent.fleetward.dev/billing",
        "sop.fleetward.dev/billing-refund",
        "guardrail.fleetward.dev/pii-redaction",
        "killswitch.fleetward.dev/githouse-stop",
    ):
        assert name in listing, listing

    agents = kubectl("get", "agents", "-n", "githouse").stdout.splitlines()
    assert agents[0].split() == ["NAME", "ROLE", "MODEL", "PHASE", "READY", "REPLICAS", "AGE"]
    row = next(line.split() for line in agents if line.startswith("router "))
    assert row[1:3] == ["router", "githouse-scripted"]
    assert len(agents) - 1 == 10  # router, 7 specialists, drafts, feedback

    sops = kubectl("get", "sops", "-n", "githouse", "-o", "wide").stdout.splitlines()
    assert sops[0].split()[:4] == ["NAME", "DOMAIN", "VERSION", "TITLE"]
    assert any(line.startswith("billing-refund ") and " billing " in line and "2.1.0" in line for line in sops)

    ks = kubectl("get", "ks").stdout.splitlines()
    assert ks[0].split() == ["NAME", "ENGAGED", "PHASE", "AFFECTED", "READY", "AGE"]
    assert ks[1].split()[:2] == ["githouse-stop", "false"]


def test_server_side_defaults_are_applied(crds, api):
    objs = client.CustomObjectsApi(api)
    apply_manifest(api, (EXAMPLE / "40-killswitch.yaml").read_text())
    ks = objs.get_cluster_custom_object("fleetward.dev", "v1alpha1", "killswitches", "githouse-stop")
    assert ks["spec"]["actions"] == {
        "revokeCredentials": True,
        "drainQueues": True,
        "closeSessions": True,
        "scaleToZero": True,
    }
    body = {
        "apiVersion": "fleetward.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "defaults"},
        "spec": {"role": "specialist", "model": {"name": "m", "baseURL": "http://127.0.0.1:9/v1"}},
    }
    created = objs.create_namespaced_custom_object("fleetward.dev", "v1alpha1", "default", "agents", body)
    try:
        assert created["spec"]["budget"] == {"alertThresholds": [0.5, 0.8, 0.95]}
        assert created["spec"]["humanReview"] == {
            "draftApproval": "never",
            "reviewTimeoutSeconds": 3600,
            "onTimeout": "escalate",
        }
        assert created["spec"]["model"]["provider"] == "openai-compatible"
    finally:
        objs.delete_namespaced_custom_object("fleetward.dev", "v1alpha1", "default", "agents", "defaults")
