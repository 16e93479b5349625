"""The revoker thread's pure parts: its view of which agents engaged switches cover, the
trust-bundle writer's refusal to publish a covered agent's key, and the admission
webhook's AdmissionReview answers (killswitch/revoker.py, killswitch/admission.py)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
from fleetward.operator.credentials import JWKS_KEY, KeyBlocked, TrustBundle
from fleetward.operator.killswitch.admission import MUTATE_PATH, VALIDATE_PATH, json_patch, review
from fleetward.operator.killswitch.revoker import SwitchView
from fleetward.operator.killswitch.scope import ENGAGED_AT, ENGAGED_BY
from fleetward.operator.kube import KubeError
from fleetward.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(namespace="fleetward-system", exclude_namespaces=["scoped-*"])


def switch(name: str, engaged: bool, scope: dict | None = None, revoke: bool = True, stamp: str = "t1") -> dict:
    return {
        "metadata": {"name": name, "annotations": {ENGAGED_AT: stamp} if engaged else {}},
        "spec": {"engaged": engaged, "scope": scope or {}, "actions": {"revokeCredentials": revoke}},
    }


def meta(ns: str, name: str, labels: dict | None = None) -> dict:
    return {"metadata": {"namespace": ns, "name": name, "labels": labels or {}, "resourceVersion": "1"}}


# -- the view ---------------------------------------------------------------------------


def test_the_view_blocks_what_engaged_revoking_switches_cover_and_nothing_else():
    view = SwitchView(SETTINGS)
    for ns, name, labels in [("a", "x", {"tier": "gold"}), ("a", "y", {}), ("b", "z", {}), ("scoped-1", "s", {})]:
        view.set_agent(meta(ns, name, labels))
    assert "scoped-1/s" not in view.agents  # another installation's namespace

    view.set_switch(switch("gold", True, {"agentSelector": {"matchLabels": {"tier": "gold"}}}))
    view.set_switch(switch("keep-keys", True, {"namespaces": ["b"]}, revoke=False))
    view.set_switch(switch("staged", False))
    assert view.refresh_blocked() == {"gold": ("t1", frozenset({"a/x"}))}
    assert view.blocked == {"a/x"}

    view.set_switch(switch("all", True, stamp="t2"))
    view.refresh_blocked()
    assert view.blocked == {"a/x", "a/y", "b/z"}
    view.set_agent(meta("a", "y"), deleted=True)
    view.set_switch(switch("all", False))  # released
    view.refresh_blocked()
    assert view.blocked == {"a/x"}
    view.set_switch(switch("gold", True), deleted=True)
    view.refresh_blocked()
    assert view.blocked == frozenset()


# -- the writer -------------------------------------------------------------------------


class FakeKube:
    """The one ConfigMap the writer reads and replaces, with resourceVersions."""

    def __init__(self) -> None:
        self.cm: dict[str, Any] | None = None
        self.writes = 0

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return copy.deepcopy(self.cm)

    async def create(self, body: dict) -> dict:
        if self.cm is not None:
            raise KubeError(409, "AlreadyExists", "exists", "cm")
        return await self._store(body)

    async def replace(self, body: dict) -> dict:
        if self.cm is None or body["metadata"].get("resourceVersion") != self.cm["metadata"]["resourceVersion"]:
            raise KubeError(409, "Conflict", "changed", "cm")
        return await self._store(body)

    async def _store(self, body: dict) -> dict:
        self.writes += 1
        self.cm = copy.deepcopy(body)
        self.cm["metadata"]["resourceVersion"] = str(self.writes)
        return copy.deepcopy(self.cm)

    def agents(self) -> set[str]:
        return {k["agent"] for k in json.loads(self.cm["data"][JWKS_KEY])["keys"]} if self.cm else set()


def jwk(agent: str) -> dict:
    return {"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": f"{agent}.k", "agent": agent}


def test_a_covered_agents_key_is_refused_and_the_rest_of_the_batch_is_written():
    async def scenario() -> None:
        kube = FakeKube()
        covered = {"a/x"}
        bundle = TrustBundle(kube, "fleetward-system", "fleetward-trust-bundle", switch_blocked=covered.__contains__)
        results = await asyncio.gather(
            bundle.publish("a/x", jwk("a/x")), bundle.publish("a/y", jwk("a/y")), return_exceptions=True
        )
        assert isinstance(results[0], KeyBlocked) and "a/x" in str(results[0])
        assert results[1] is None
        assert kube.agents() == {"a/y"}

        # Kopf's own block (a halted reconcile) refuses too; unblocking lets the key in.
        bundle.block("a/y")
        with pytest.raises(KeyBlocked):
            await bundle.publish("a/y", jwk("a/y"))
        assert kube.agents() == set()
        bundle.unblock("a/y")
        covered.clear()
        await bundle.publish("a/x", jwk("a/x"))
        await bundle.publish("a/y", jwk("a/y"))
        assert kube.agents() == {"a/x", "a/y"}
        await bundle.withdraw_many(["a/x", "a/y"])
        assert kube.agents() == set()
        await bundle.stop()

    asyncio.run(scenario())


def test_a_burst_of_publishes_is_coalesced_and_a_withdrawal_does_not_wait_for_it():
    async def scenario() -> None:
        kube = FakeKube()
        bundle = TrustBundle(kube, "fleetward-system", "fleetward-trust-bundle", busy_window=0.5)
        loop = asyncio.get_running_loop()
        await bundle.publish("a/first", jwk("a/first"))  # alone: the short window
        assert kube.writes == 1

        # A burst right after a write: 40 publishes spread over 0.2 s share one busy window.
        async def later(i: int) -> None:
            await asyncio.sleep(i * 0.005)
            await bundle.publish(f"a/{i}", jwk(f"a/{i}"))

        await asyncio.gather(*(later(i) for i in range(40)))
        assert kube.writes <= 3, kube.writes
        assert len(kube.agents()) == 41

        # Busy again (a write just happened): a withdrawal arriving during the window ends it.
        publishing = asyncio.ensure_future(bundle.publish("a/late", jwk("a/late")))
        await asyncio.sleep(0.05)
        started = loop.time()
        await bundle.withdraw("a/first")
        assert loop.time() - started < 0.3
        assert "a/first" not in kube.agents()
        await publishing
        assert "a/late" in kube.agents()
        await bundle.stop()

    asyncio.run(scenario())


# -- the admission webhook ----------------------------------------------------------------


def admission(path: str, operation: str, new: dict | None, old: dict | None = None, user: str = "alice") -> dict:
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "req-1",
            "operation": operation,
            "object": new,
            "oldObject": old,
            "userInfo": {"username": user, "groups": ["oncall"]} if user else {},
        },
    }
    return review(path, body, SETTINGS, lambda: {"agents_by_namespace": {"a": [meta("a", "x")]}})["response"]


def patched(obj: dict, response: dict) -> dict:
    assert response["allowed"] and response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(obj, ops)


def ks(engaged: bool, annotations: dict | None = None, approvals: list | None = None) -> dict:
    obj = {"metadata": {"name": "stop"}, "spec": {"engaged": engaged, "reason": "incident"}}
    if annotations is not None:
        obj["metadata"]["annotations"] = annotations
    if approvals is not None:
        obj["spec"]["approvals"] = approvals
    return obj


def test_an_engage_is_stamped_with_the_authenticated_user_and_gets_the_finalizer():
    out = patched(ks(True), admission(MUTATE_PATH, "CREATE", ks(True)))
    assert out["metadata"]["annotations"][ENGAGED_BY] == "alice"
    assert out["metadata"]["annotations"][ENGAGED_AT].endswith("Z")
    assert out["metadata"]["finalizers"] == ["fleetward-system.fleetward.dev/cleanup"]

    # A typed engager on an object with other annotations: replaced, the others kept.
    typed = ks(True, {ENGAGED_BY: "mallory", "team/owner": "sre"})
    out = patched(typed, admission(MUTATE_PATH, "UPDATE", typed, old=ks(False), user="bob"))
    assert out["metadata"]["annotations"][ENGAGED_BY] == "bob" and out["metadata"]["annotations"]["team/owner"] == "sre"


def test_a_stamp_typed_later_is_put_back_and_one_added_is_removed():
    old = ks(True, {ENGAGED_BY: "alice", ENGAGED_AT: "t0"})
    edited = ks(True, {ENGAGED_BY: "mallory", ENGAGED_AT: "t0"})
    out = patched(edited, admission(MUTATE_PATH, "UPDATE", edited, old=old, user="mallory"))
    assert out["metadata"]["annotations"][ENGAGED_BY] == "alice"
    old = ks(False, {})
    added = ks(False, {ENGAGED_AT: "forged"})
    out = patched(added, admission(MUTATE_PATH, "UPDATE", added, old=old, user="mallory"))
    assert ENGAGED_AT not in out["metadata"]["annotations"]


def test_a_spoofed_approval_and_a_release_without_two_approvers_are_denied_with_the_reason():
    engaged = ks(True, {ENGAGED_BY: "alice", ENGAGED_AT: "t0"})
    spoofed = ks(True, {ENGAGED_BY: "alice", ENGAGED_AT: "t0"}, approvals=[{"user": "carol"}])
    denied = admission(MUTATE_PATH, "UPDATE", spoofed, old=engaged, user="bob")
    assert denied["allowed"] is False and denied["status"]["code"] == 403
    assert "'bob'" in denied["status"]["message"] and "'carol'" in denied["status"]["message"]

    own = ks(True, {ENGAGED_BY: "alice", ENGAGED_AT: "t0"}, approvals=[{"user": "bob"}])
    out = patched(own, admission(MUTATE_PATH, "UPDATE", own, old=engaged, user="bob"))
    assert out["spec"]["approvals"][0]["user"] == "bob" and out["spec"]["approvals"][0]["approvedAt"]

    release = ks(False, {ENGAGED_BY: "alice", ENGAGED_AT: "t0"}, approvals=[{"user": "bob"}])
    denied = admission(VALIDATE_PATH, "UPDATE", release, old=out, user="bob")
    assert denied["allowed"] is False and "two distinct people" in denied["status"]["message"]
    assert admission(VALIDATE_PATH, "CREATE", ks(False), user="")["status"]["message"].startswith(
        "the API server sent no authenticated username"
    )


def test_json_patch_escapes_keys_and_adds_a_missing_spec():
    obj = {"metadata": {"annotations": {"a/b~c": "1"}}}
    ops = json_patch(obj, {"metadata": {"annotations": {"a/b~c": None, "x/y": "2"}}, "spec": {"approvals": []}})
    assert jsonpatch.apply_patch(obj, ops) == {"metadata": {"annotations": {"x/y": "2"}}, "spec": {"approvals": []}}
    assert json_patch({"metadata": {}}, {"metadata": {"annotations": {"gone": None}}}) == []


def test_the_writer_never_trusts_its_cached_copy_over_another_writer():
    """The writer starts from the object its last write returned; another writer's change
    since (another operator replica) must survive, and a withdraw that looks like a no-op
    against the stale copy must still happen."""

    async def scenario() -> None:
        kube = FakeKube()
        bundle = TrustBundle(kube, "fleetward-system", "fleetward-trust-bundle")
        other = TrustBundle(kube, "fleetward-system", "fleetward-trust-bundle")
        await bundle.publish("a/x", jwk("a/x"))
        await other.publish("a/y", jwk("a/y"))  # bundle's copy is stale now
        await bundle.publish("a/z", jwk("a/z"))  # 409 on the stale copy, then a fresh read
        assert kube.agents() == {"a/x", "a/y", "a/z"}
        await other.withdraw("a/y")
        await bundle.withdraw("a/x")
        await other.publish("a/x", jwk("a/x"))  # back, behind bundle's back
        writes = kube.writes
        await bundle.withdraw("a/x")  # a no-op for its stale copy: confirmed by a read, then written
        assert kube.agents() == {"a/z"} and kube.writes == writes + 1
        await bundle.stop()
        await other.stop()

    asyncio.run(scenario())
