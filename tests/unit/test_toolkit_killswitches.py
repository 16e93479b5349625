"""The verifier's own view of KillSwitches (fleetward.toolkit.killswitches): a key whose
agent an engaged switch covers is refused at once, by the operator's scope rules, and
that view only ever removes trust (stale or not yet listed, it is ignored)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetward.api.scope import covers, revokes, selector_matches
from fleetward.toolkit import RefusalReason, TokenRefused, ToolTokenVerifier, TrustBundle, mint_tool_token, public_jwk
from fleetward.toolkit.jwks import parse_jwks


def switch(name: str, *, engaged: bool = True, revoke: bool | None = None, **scope) -> dict:
    spec: dict = {"engaged": engaged, "reason": "test", "scope": scope}
    if revoke is not None:
        spec["actions"] = {"revokeCredentials": revoke}
    return {"metadata": {"name": name}, "spec": spec}


class Fleet:
    """Agent keys published with their labels, as the operator writes them."""

    def __init__(self) -> None:
        self.private: dict[str, Ed25519PrivateKey] = {}
        self.entries: list[dict] = []

    def add(self, kid: str, agent: str, labels: dict[str, str] | None = None) -> None:
        key = self.private[kid] = Ed25519PrivateKey.generate()
        self.entries.append(public_jwk(key.public_key(), kid, agent, labels))

    def bundle(self, **kwargs) -> TrustBundle:
        bundle = TrustBundle(**kwargs)
        bundle.load({"keys": self.entries})
        return bundle

    def token(self, kid: str, agent: str) -> str:
        return mint_tool_token(self.private[kid], kid, agent, "issue_refund", "run-1", "idem-1")


def refusal(bundle: TrustBundle, kid: str) -> RefusalReason | None:
    try:
        bundle.lookup(kid)
    except TokenRefused as e:
        return e.reason
    return None


@pytest.fixture
def fleet() -> Fleet:
    f = Fleet()
    f.add("billing", "githouse/billing", {"tier": "payments", "team": "support"})
    f.add("triage", "githouse/triage", {"tier": "front"})
    f.add("ops", "platform/ops", {})
    return f


def test_scope_rules_match_the_api():
    labels = {"tier": "payments"}
    assert covers(switch("s"), "any", None), "an empty scope covers every agent"
    assert covers(switch("s", namespaces=["githouse"]), "githouse", labels)
    assert not covers(switch("s", namespaces=["githouse"]), "platform", labels)
    assert covers(switch("s", agentSelector={}), "x", {}), "an empty selector matches everything"
    assert covers(switch("s", agentSelector={"matchLabels": {"tier": "payments"}}), "x", labels)
    assert not covers(switch("s", namespaces=["x"], agentSelector={"matchLabels": {"tier": "front"}}), "x", labels)
    exprs = [
        ({"key": "tier", "operator": "In", "values": ["payments", "x"]}, True),
        ({"key": "tier", "operator": "In", "values": ["x"]}, False),
        ({"key": "tier", "operator": "NotIn", "values": ["x"]}, True),
        ({"key": "tier", "operator": "NotIn", "values": ["payments"]}, False),
        ({"key": "tier", "operator": "Exists"}, True),
        ({"key": "team", "operator": "Exists"}, False),
        ({"key": "team", "operator": "DoesNotExist"}, True),
        ({"key": "tier", "operator": "DoesNotExist"}, False),
    ]
    for expr, expected in exprs:
        assert selector_matches({"matchExpressions": [expr]}, labels) is expected, expr
    assert revokes(switch("s")) and not revokes(switch("s", engaged=False))
    assert not revokes(switch("s", revoke=False))


def test_an_engaged_switch_revokes_the_keys_it_covers_at_once(fleet):
    bundle = fleet.bundle()
    changes = []
    bundle.on_change(changes.append)
    verifier = ToolTokenVerifier(bundle)
    bundle.set_kill_switches({})
    assert verifier.verify(fleet.token("billing", "githouse/billing"), "issue_refund").agent == "githouse/billing"

    bundle.set_kill_switches(
        {"pay": switch("pay", namespaces=["githouse"], agentSelector={"matchLabels": {"tier": "payments"}})}
    )
    assert refusal(bundle, "billing") == RefusalReason.REVOKED
    with pytest.raises(TokenRefused) as err:
        verifier.verify(fleet.token("billing", "githouse/billing"), "issue_refund")
    assert err.value.reason == RefusalReason.REVOKED and "kill switch 'pay'" in err.value.detail
    assert refusal(bundle, "triage") is None and refusal(bundle, "ops") is None
    assert set(bundle.trusted_keys()) == {"triage", "ops"}
    assert [(c.added, c.removed, c.total) for c in changes] == [(set(), {"billing"}, 2)]
    assert bundle.status()["keys"] == 2 and bundle.status()["bundleKeys"] == 3

    # The bundle changing under an engaged switch (a rotation elsewhere) keeps the key refused.
    fleet.add("ops-2", "platform/ops", {})
    bundle.load({"keys": fleet.entries})
    assert refusal(bundle, "billing") == RefusalReason.REVOKED and refusal(bundle, "ops-2") is None

    # A second switch covering everything; releasing the first leaves everything refused.
    bundle.set_kill_switches({"pay": switch("pay", namespaces=["githouse"]), "all": switch("all")})
    assert bundle.trusted_keys() == {}
    bundle.set_kill_switches({"pay": switch("pay", engaged=False), "all": switch("all")})
    assert bundle.trusted_keys() == {}
    bundle.set_kill_switches({"pay": switch("pay", engaged=False)})
    assert set(bundle.trusted_keys()) == {"billing", "triage", "ops", "ops-2"}


def test_a_switch_without_credential_revocation_refuses_nothing(fleet):
    bundle = fleet.bundle()
    bundle.set_kill_switches({"halt-only": switch("halt-only", revoke=False)})
    assert len(bundle.trusted_keys()) == 3 and refusal(bundle, "billing") is None


def test_a_stale_switch_view_is_ignored_and_only_the_bundle_decides(fleet):
    now = [1000.0]
    bundle = fleet.bundle(max_staleness=10, clock=lambda: now[0])
    bundle.set_kill_switches({"all": switch("all")})
    assert refusal(bundle, "ops") == RefusalReason.REVOKED
    bundle.kill_switch_source_down("watch connection reset")
    now[0] += 9
    assert refusal(bundle, "ops") == RefusalReason.REVOKED, "within the bound, the last view holds"
    now[0] += 2
    # Past the bound the switch may have been released unseen: the bundle alone decides
    # (the operator withdraws covered keys from it too), and the bundle stays usable.
    assert refusal(bundle, "ops") is None and bundle.ready()
    assert "stale" in bundle.status()["killSwitches"]
    bundle.kill_switch_source_up()
    assert refusal(bundle, "ops") == RefusalReason.REVOKED


def test_no_switch_view_yet_refuses_nothing_on_its_account(fleet):
    bundle = fleet.bundle()
    assert len(bundle.trusted_keys()) == 3
    assert bundle.status()["killSwitches"] == "not watched"


def test_labels_ride_with_the_key_and_bad_labels_are_ignored_not_fatal(fleet):
    parsed = parse_jwks({"keys": fleet.entries})
    assert parsed.keys["billing"].labels == {"tier": "payments", "team": "support"}
    assert parsed.keys["billing"].namespace == "githouse"
    bad = dict(fleet.entries[2], labels=["not", "an", "object"])
    parsed = parse_jwks({"keys": [bad]})
    assert parsed.keys["ops"].labels == {} and "labels must be an object of strings" in parsed.problems[0]
    no_labels = {k: v for k, v in fleet.entries[1].items() if k != "labels"}
    assert parse_jwks({"keys": [no_labels]}).keys["triage"].labels == {}


def test_a_key_bound_to_no_agent_is_covered_by_any_revoking_switch():
    """A hand-written bundle entry without `agent` (and a kid not of the operator's form):
    nothing says it is outside a namespace scope, so an engaged switch refuses it."""
    fleet = Fleet()
    fleet.add("githouse.billing.k1", "githouse/billing")
    loose = Ed25519PrivateKey.generate()
    entry = public_jwk(loose.public_key(), "test-key", "other/agent")
    del entry["agent"]
    bundle = TrustBundle()
    bundle.load({"keys": [*fleet.entries, entry]})
    bundle.set_kill_switches({"ops": switch("ops", namespaces=["elsewhere"])})
    verifier = ToolTokenVerifier(bundle)
    token = mint_tool_token(loose, "test-key", "other/agent", "issue_refund", "run-1", "idem-1")
    with pytest.raises(TokenRefused) as err:
        verifier.verify(token, "issue_refund")
    assert err.value.reason == RefusalReason.REVOKED and "(unbound)" in err.value.detail
    assert verifier.verify(fleet.token("githouse.billing.k1", "githouse/billing"), "issue_refund")
