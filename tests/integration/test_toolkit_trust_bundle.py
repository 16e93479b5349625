"""The trust bundle watches the real ConfigMap through the API server of the local cluster:
a key removed from the ConfigMap is refused within a second of the API write returning."""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kubernetes import client

from fleetward.toolkit import RefusalReason, TokenRefused, ToolTokenVerifier, TrustBundle, mint_tool_token
from fleetward.toolkit.bundle import DEFAULT_CONFIGMAP, JWKS_KEY
from fleetward.toolkit.jwks import jwks_document, public_jwk
from fleetward.toolkit.sources import ConfigMapSource
from tests.integration.test_killswitch import GROUP, VERSION, release_as_two, switch

REVOCATION_DEADLINE = 1.0


class Fleet:
    """Agent keys, and the ConfigMap that publishes a chosen subset of them."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.keys: dict[str, tuple[Ed25519PrivateKey, str]] = {}

        self.labels: dict[str, dict[str, str]] = {}

    def add(self, kid: str, agent: str, labels: dict[str, str] | None = None) -> None:
        self.keys[kid] = (Ed25519PrivateKey.generate(), agent)
        self.labels[kid] = labels or {}

    def document(self, kids: list[str]) -> str:
        entries = [public_jwk(self.keys[k][0].public_key(), k, self.keys[k][1], self.labels[k]) for k in kids]
        return jwks_document(entries)

    def create(self, kids: list[str]) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=DEFAULT_CONFIGMAP), data={JWKS_KEY: self.document(kids)}
        )
        self.core.create_namespaced_config_map(self.namespace, body)

    def publish(self, kids: list[str]) -> float:
        """Patch the ConfigMap; returns the monotonic time the API write returned."""
        self.core.patch_namespaced_config_map(
            DEFAULT_CONFIGMAP, self.namespace, {"data": {JWKS_KEY: self.document(kids)}}
        )
        return time.monotonic()

    def token(self, kid: str, tool: str = "issue_refund") -> str:
        key, agent = self.keys[kid]
        return mint_tool_token(key, kid, agent, tool, "run-1", f"idem-{time.monotonic_ns()}")


def seconds_until(predicate: Callable[[], bool], since: float, deadline: float) -> float | None:
    """Poll every millisecond; seconds from `since` until predicate() held, None past the deadline."""
    while time.monotonic() - since < deadline:
        if predicate():
            return time.monotonic() - since
        time.sleep(0.001)
    return None


def refused_as(verifier: ToolTokenVerifier, token: str) -> RefusalReason | None:
    try:
        verifier.verify(token, "issue_refund")
    except TokenRefused as e:
        return e.reason
    return None


def test_removing_a_key_from_the_configmap_refuses_its_tokens_within_a_second(api, core, namespace):
    fleet = Fleet(core, namespace)
    for i in range(6):
        fleet.add(f"billing-{i}", "githouse/billing")
    fleet.add("workers-0", "githouse/workers")
    fleet.create(["billing-0", "workers-0"])
    bundle = TrustBundle.from_configmap(namespace, api_client=api).start()
    try:
        assert bundle.wait_ready(10), bundle.status()
        verifier = ToolTokenVerifier(bundle)
        assert verifier.verify(fleet.token("billing-0"), "issue_refund").agent == "githouse/billing"

        # Five rotations: each publishes billing-<i+1> and removes billing-<i> (an unexpired
        # token of billing-<i> is minted beforehand), measured from the API write's return.
        latencies = []
        for i in range(5):
            old, new = f"billing-{i}", f"billing-{i + 1}"
            minted_before = fleet.token(old)
            written = fleet.publish([new, "workers-0"])
            latency = seconds_until(
                lambda: refused_as(verifier, fleet.token(old)) is not None,  # noqa: B023
                written,
                REVOCATION_DEADLINE,
            )
            assert latency is not None, f"{old} still accepted {REVOCATION_DEADLINE} s after the ConfigMap write"
            latencies.append(latency)
            assert refused_as(verifier, minted_before) == RefusalReason.REVOKED
            assert refused_as(verifier, fleet.token(new)) is None
            assert refused_as(verifier, fleet.token("workers-0")) is None
        print(
            f"\nrevocation latency after the API write: max {max(latencies) * 1000:.1f} ms, "
            f"all {[round(x * 1000, 1) for x in latencies]} ms"
        )

        # Deleting the ConfigMap trusts nothing; re-creating it is picked up by the same watch.
        core.delete_namespaced_config_map(DEFAULT_CONFIGMAP, namespace)
        deleted = time.monotonic()
        assert seconds_until(lambda: bundle.trusted_keys() == {}, deleted, REVOCATION_DEADLINE) is not None
        assert refused_as(verifier, fleet.token("workers-0")) == RefusalReason.REVOKED
        fleet.create(["workers-0"])
        assert seconds_until(lambda: "workers-0" in bundle.trusted_keys(), time.monotonic(), 5) is not None
        assert refused_as(verifier, fleet.token("workers-0")) is None
    finally:
        stopping = time.monotonic()
        bundle.stop()
    # the watch (60 s server timeout) is blocked in a read: stop() closes it instead of waiting
    assert time.monotonic() - stopping < 2


def test_the_watch_resumes_after_the_server_ends_it(api, core, namespace):
    """With 1-second watches the server closes the stream repeatedly; changes after that
    are still seen at once (the watch resumes from the last resourceVersion)."""
    fleet = Fleet(core, namespace)
    fleet.add("a-1", "githouse/billing")
    fleet.add("b-1", "githouse/billing")
    fleet.create(["a-1", "b-1"])
    source = ConfigMapSource(namespace, DEFAULT_CONFIGMAP, key=JWKS_KEY, api_client=api, watch_timeout=1)
    bundle = TrustBundle(source).start()
    try:
        assert bundle.wait_ready(10)
        time.sleep(3.5)  # at least two server-side watch expiries
        written = fleet.publish(["b-1"])
        latency = seconds_until(lambda: "a-1" not in bundle.trusted_keys(), written, REVOCATION_DEADLINE)
        assert latency is not None
        assert bundle.ready() and bundle.status()["sourceDown"] is None
    finally:
        bundle.stop()


def test_an_unreachable_source_fails_closed_after_the_staleness_bound(api, core, namespace):
    """A watch on a namespace the client may not read never loads: tokens are refused as
    `trust_bundle_unavailable`, and the status names the API error."""
    cfg = api.configuration
    anonymous = client.Configuration()
    anonymous.host, anonymous.ssl_ca_cert, anonymous.verify_ssl = cfg.host, cfg.ssl_ca_cert, cfg.verify_ssl
    bundle = TrustBundle.from_configmap(namespace, api_client=client.ApiClient(anonymous), max_staleness=0).start()
    try:
        assert not bundle.wait_ready(2)
        deadline = time.monotonic() + 10
        while bundle.status()["sourceDown"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "API error 40" in (bundle.status()["sourceDown"] or ""), bundle.status()
        try:
            bundle.lookup("any")
        except TokenRefused as e:
            assert e.reason == RefusalReason.TRUST_BUNDLE_UNAVAILABLE
        else:
            raise AssertionError("an unloaded bundle accepted a key")
    finally:
        bundle.stop()


def test_an_engaged_kill_switch_revokes_covered_keys_before_the_bundle_changes(
    api, core, namespace, fleetward, user_kubeconfigs
):
    """The verifier watches KillSwitches itself: a switch covering agents of namespace
    `<ns>-agents` with tier=payments refuses exactly their keys, while this test's bundle
    ConfigMap is never written (the operator does not own it). Released by two other
    people, the keys are trusted again. The latency is printed (timed in the kill switch bench)."""
    agents_ns = f"{namespace}-agents"[:63]
    fleet = Fleet(core, namespace)
    fleet.add("pay-1", f"{agents_ns}/billing", {"tier": "payments"})
    fleet.add("front-1", f"{agents_ns}/triage", {"tier": "front"})
    fleet.add("other-1", "elsewhere/billing", {"tier": "payments"})
    fleet.create(["pay-1", "front-1", "other-1"])
    bundle = TrustBundle.from_configmap(namespace, api_client=api).start()
    objs = client.CustomObjectsApi(api)
    name = f"fast-{namespace}"[:63]
    created = False
    try:
        assert bundle.wait_ready(10), bundle.status()
        watching = seconds_until(lambda: bundle.status()["killSwitches"].startswith("watching"), time.monotonic(), 10)
        assert watching is not None, bundle.status()
        verifier = ToolTokenVerifier(bundle)
        assert verifier.verify(fleet.token("pay-1"), "issue_refund").agent == f"{agents_ns}/billing"
        bundle_version = core.read_namespaced_config_map(DEFAULT_CONFIGMAP, namespace).metadata.resource_version

        spec = {
            "engaged": True,
            "reason": "fast path test",
            "scope": {"namespaces": [agents_ns], "agentSelector": {"matchLabels": {"tier": "payments"}}},
        }
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "KillSwitch", "metadata": {"name": name}, "spec": spec}
        objs.create_cluster_custom_object(GROUP, VERSION, "killswitches", body)
        accepted, created = time.monotonic(), True
        latency = seconds_until(lambda: refused_as(verifier, fleet.token("pay-1")) is not None, accepted, 10.0)
        assert latency is not None, f"pay-1 still accepted 10 s after the engage: {bundle.status()}"
        print(
            f"\nkill switch seen by the verifier: key refused {latency * 1000:.1f} ms after the API server accepted it"
        )
        assert refused_as(verifier, fleet.token("pay-1")) == RefusalReason.REVOKED
        assert refused_as(verifier, fleet.token("front-1")) is None, "outside the agentSelector"
        assert refused_as(verifier, fleet.token("other-1")) is None, "outside the switch's namespaces"
        assert set(bundle.trusted_keys()) == {"front-1", "other-1"}
        now = core.read_namespaced_config_map(DEFAULT_CONFIGMAP, namespace).metadata.resource_version
        assert now == bundle_version, "the refusal came from the switch, not from a bundle write"

        release_as_two(user_kubeconfigs, name)
        trusted_again = seconds_until(lambda: refused_as(verifier, fleet.token("pay-1")) is None, time.monotonic(), 10)
        assert trusted_again is not None, bundle.status()
    finally:
        bundle.stop()
        if created:
            if switch(objs, name)["spec"].get("engaged"):
                release_as_two(user_kubeconfigs, name)
            objs.delete_cluster_custom_object(GROUP, VERSION, "killswitches", name)
