"""The kill switch's pure parts: which Agents a switch covers, and the admission
decisions that take identities from userInfo (operator/fleetward/operator/webhooks.py)."""

from __future__ import annotations

import copy

import pytest
from fleetward.operator.killswitch.scope import ENGAGED_AT, ENGAGED_BY, affected, covers, halts_for
from fleetward.operator.webhooks import Refused, Requester, admit, check

ALICE, BOB, CAROL = Requester("alice", ("fleetward:oncall",)), Requester("bob"), Requester("carol")
NOW = "2026-12-06T01:02:03.456789Z"


def switch(engaged: bool, *, by: str | None = None, approvals=None, scope=None, name="stop") -> dict:
    ann = {ENGAGED_BY: by, ENGAGED_AT: NOW} if by else {}
    spec = {"engaged": engaged, "reason": "incident", "scope": scope or {}}
    if approvals is not None:
        spec["approvals"] = [{"user": u} for u in approvals]
    return {"metadata": {"name": name, "generation": 1, "annotations": ann}, "spec": spec}


def agent(ns: str, name: str, labels=None) -> dict:
    return {"metadata": {"namespace": ns, "name": name, "labels": labels or {}}, "spec": {}}


# -- scope ------------------------------------------------------------------------------


def test_empty_scope_covers_every_agent():
    assert covers(switch(True), "any", {})


def test_namespaces_and_selector_both_narrow():
    sw = switch(True, scope={"namespaces": ["githouse"], "agentSelector": {"matchLabels": {"tier": "money"}}})
    assert covers(sw, "githouse", {"tier": "money"})
    assert not covers(sw, "githouse", {"tier": "docs"})
    assert not covers(sw, "other", {"tier": "money"})
    agents = [agent("githouse", "b", {"tier": "money"}), agent("githouse", "a", {"tier": "money"}), agent("x", "c")]
    assert [a["metadata"]["name"] for a in affected(sw, agents)] == ["a", "b"]


def test_only_engaged_switches_halt_and_overlaps_are_all_named():
    on1, on2, off = switch(True, name="b-stop", by="alice"), switch(True, name="a-stop", by="bob"), switch(False)
    halts = halts_for([on1, off, on2], "ns", {})
    assert [h.switch for h in halts] == ["a-stop", "b-stop"]
    assert halts[0].engaged_by == "bob" and not halts[0].drained


def test_a_switch_being_deleted_still_halts_until_released():
    sw = switch(True, by="alice")
    sw["metadata"]["deletionTimestamp"] = NOW
    assert halts_for([sw], "ns", {})


# -- admission: engage --------------------------------------------------------------------


def test_engage_on_create_stamps_the_authenticated_user_and_time():
    patch = admit("CREATE", None, switch(True), ALICE, now=NOW)
    assert patch["metadata"]["annotations"] == {ENGAGED_BY: "alice", ENGAGED_AT: NOW}


def test_engage_by_patch_stamps_the_patcher_not_a_typed_name():
    old = switch(False)
    new = switch(True)
    new["metadata"]["annotations"] = {ENGAGED_BY: "mallory"}  # typed by the user
    patch = admit("UPDATE", old, new, BOB, now=NOW)
    assert patch["metadata"]["annotations"][ENGAGED_BY] == "bob"


def test_stamps_cannot_be_edited_afterwards():
    old = switch(True, by="alice")
    new = copy.deepcopy(old)
    new["metadata"]["annotations"][ENGAGED_BY] = "carol"
    patch = admit("UPDATE", old, new, CAROL, now=NOW)
    assert patch["metadata"]["annotations"][ENGAGED_BY] == "alice"  # put back
    with pytest.raises(Refused, match="set by the Fleetward admission webhook"):
        check("UPDATE", old, new, CAROL)


def test_approvals_typed_into_an_engage_are_dropped():
    patch = admit("CREATE", None, switch(True, approvals=["bob", "carol"]), ALICE, now=NOW)
    assert patch["spec"]["approvals"] == []


# -- admission: approvals ------------------------------------------------------------------


def test_an_approver_adds_their_own_approval_and_it_is_stamped():
    old = switch(True, by="alice")
    patch = admit("UPDATE", old, switch(True, by="alice", approvals=["bob"]), BOB, now=NOW)
    assert patch["spec"]["approvals"] == [{"user": "bob", "approvedAt": NOW}]


def test_a_spoofed_approval_is_rejected_with_both_names():
    old = switch(True, by="alice")
    with pytest.raises(Refused) as err:
        admit("UPDATE", old, switch(True, by="alice", approvals=["carol"]), BOB)
    assert "'bob'" in str(err.value) and "'carol'" in str(err.value)


def test_the_engager_cannot_approve():
    old = switch(True, by="alice")
    with pytest.raises(Refused, match="engaged KillSwitch stop and cannot approve"):
        admit("UPDATE", old, switch(True, by="alice", approvals=["alice"]), ALICE)


def test_nobody_removes_another_users_approval():
    old = switch(True, by="alice", approvals=["bob"])
    with pytest.raises(Refused, match="cannot withdraw the approval of 'bob'"):
        admit("UPDATE", old, switch(True, by="alice", approvals=[]), CAROL)


@pytest.mark.parametrize(("field", "value"), [("approvedAt", "2020-01-01T00:00:00Z"), ("groups", ["system:masters"])])
@pytest.mark.parametrize("who", [CAROL, ALICE])
def test_another_users_approval_stamps_are_put_back_and_never_rewritten(field, value, who):
    old = switch(True, by="alice", approvals=["bob"])
    old["spec"]["approvals"][0].update(approvedAt=NOW, groups=["oncall"])
    new = copy.deepcopy(old)
    new["spec"]["approvals"][0][field] = value
    # The mutating pass puts bob's stamps back (e.g. a manifest applied without them)...
    assert admit("UPDATE", old, new, who)["spec"]["approvals"] == old["spec"]["approvals"]
    # ...and the validating pass refuses a final object that still has them changed.
    with pytest.raises(Refused, match="approvedAt and groups of 'bob' are stamped"):
        check("UPDATE", old, new, who)


def test_a_manifest_applied_without_the_stamps_keeps_them():
    old = switch(True, by="alice", approvals=["bob"])
    old["spec"]["approvals"][0].update(approvedAt=NOW, groups=["oncall"])
    new = switch(True, by="alice", approvals=["bob", "carol"])  # as written in a manifest
    patch = admit("UPDATE", old, new, CAROL, now="2026-12-06T09:00:00Z")
    assert patch["spec"]["approvals"] == [
        {"user": "bob", "approvedAt": NOW, "groups": ["oncall"]},
        {"user": "carol", "approvedAt": "2026-12-06T09:00:00Z"},
    ]


@pytest.mark.parametrize("who", [CAROL, ALICE])
def test_nobody_rewrites_another_users_comment(who):
    old = switch(True, by="alice", approvals=["bob"])
    new = copy.deepcopy(old)
    new["spec"]["approvals"][0]["comment"] = "rubber stamp"
    with pytest.raises(Refused, match=f"'{who.username}' and cannot change the approval of 'bob'"):
        admit("UPDATE", old, new, who)


def test_an_approver_who_edits_their_approval_gets_fresh_stamps():
    old = switch(True, by="alice", approvals=["bob"])
    old["spec"]["approvals"][0].update(approvedAt="2026-12-06T00:00:00Z")
    new = copy.deepcopy(old)
    new["spec"]["approvals"][0].update(comment="checked the logs", approvedAt="2020-01-01T00:00:00Z")
    patch = admit("UPDATE", old, new, BOB, now=NOW)
    assert patch["spec"]["approvals"] == [{"user": "bob", "comment": "checked the logs", "approvedAt": NOW}]


def test_an_approval_without_a_user_is_stamped_with_the_requesters_name():
    """SPEC §2: identities come from the API server's authentication; the webhook stamps."""
    old = switch(True, by="alice", approvals=["bob"])
    new = switch(True, by="alice", approvals=["bob"])
    new["spec"]["approvals"].append({"comment": "root cause fixed"})
    patch = admit("UPDATE", old, new, CAROL, now=NOW)
    assert patch["spec"]["approvals"] == [
        {"user": "bob"},
        {"user": "carol", "comment": "root cause fixed", "approvedAt": NOW},
    ]
    new["spec"]["approvals"][-1] = {"user": ""}
    assert admit("UPDATE", old, new, CAROL, now=NOW)["spec"]["approvals"][-1]["user"] == "carol"
    unnamed = switch(True, by="alice")
    unnamed["spec"]["approvals"] = [{}]
    with pytest.raises(Refused, match="'alice' engaged KillSwitch stop and cannot approve"):
        admit("UPDATE", switch(True, by="alice"), unnamed, ALICE)


@pytest.mark.parametrize(
    "field, value",
    [
        ("approvals", ["alice"]),
        ("approvals", "bob"),
        ("approvals", [{"user": 7}]),
        ("scope", "all"),
        ("scope", {"namespaces": "githouse"}),
        ("scope", {"agentSelector": "tier=gold"}),
        ("scope", {"agentSelector": {"matchExpressions": ["tier in (gold)"]}}),
        ("actions", ["scaleToZero"]),
    ],
)
def test_a_malformed_switch_is_left_to_the_schemas_message(field, value):
    """The mutating webhook sees a request before the schema is checked: it must not fail on
    wrong types (the user saw "AttributeError: 'str' object has no attribute 'get'"), but
    pass the object on untouched for the API server to refuse naming the field."""
    new = switch(True)
    new["spec"][field] = value
    assert admit("CREATE", None, new, ALICE, now=NOW) == {}
    edited = switch(True, by="alice")
    edited["spec"][field] = value
    assert admit("UPDATE", switch(True, by="alice"), edited, BOB, now=NOW) == {}
    check("UPDATE", switch(True, by="alice"), edited, BOB)
    # The whole review, finalizer decision included (it read the scope too).
    from fleetward.operator.killswitch.admission import MUTATE_PATH, review
    from fleetward.operator.settings import OperatorSettings

    new["metadata"].setdefault("uid", "u-1")
    body = {"request": {"uid": "r-1", "operation": "CREATE", "object": new, "userInfo": {"username": "alice"}}}
    answer = review(
        MUTATE_PATH, body, OperatorSettings(namespace="fleetward-system"), lambda: {"agents_by_namespace": {}}
    )
    assert answer["response"] == {"uid": "r-1", "allowed": True}


def test_approving_a_disengaged_switch_is_refused():
    with pytest.raises(Refused, match="not engaged"):
        admit("UPDATE", switch(False), switch(False, approvals=["bob"]), BOB)


def test_an_engaged_switchs_scope_and_actions_cannot_change():
    """Narrowing an engaged switch (a namespace dropped, a selector added, scaleToZero
    turned off) would release agents without approvals: refused in both passes."""
    old = switch(True, by="alice", scope={"namespaces": ["shop", "billing"]})
    narrowed = switch(True, by="alice", scope={"namespaces": ["shop"]})
    with pytest.raises(Refused, match=r"spec.scope: KillSwitch stop is engaged.*engage another KillSwitch"):
        admit("UPDATE", old, narrowed, BOB)
    with pytest.raises(Refused, match=r"spec\.scope"):
        check("UPDATE", old, narrowed, BOB)
    selector = switch(
        True, by="alice", scope={"namespaces": ["shop", "billing"], "agentSelector": {"matchLabels": {"a": "b"}}}
    )
    with pytest.raises(Refused, match=r"spec\.scope"):
        admit("UPDATE", old, selector, ALICE)
    no_scale = copy.deepcopy(old)
    no_scale["spec"]["actions"] = {"scaleToZero": False}
    with pytest.raises(Refused, match=r"spec\.actions"):
        check("UPDATE", old, no_scale, ALICE)
    # What may change while engaged: the reason, the mode, the drain timeout.
    edited = copy.deepcopy(old)
    edited["spec"] |= {"reason": "still bad", "mode": "abort", "drainTimeoutSeconds": 5}
    check("UPDATE", old, edited, BOB)
    # Not engaged before (an engage with a new scope) or not after (a release): allowed.
    admit("UPDATE", switch(False, scope={"namespaces": ["shop"]}), switch(True, scope={}), ALICE)
    released = switch(False, by="alice", approvals=["bob", "carol"], scope={"namespaces": ["shop"]})
    check(
        "UPDATE",
        switch(True, by="alice", approvals=["bob", "carol"], scope={"namespaces": ["shop", "billing"]}),
        released,
        BOB,
    )


# -- admission: release and delete ---------------------------------------------------------


def test_release_needs_two_people_other_than_the_engager():
    old = switch(True, by="alice", approvals=["bob"])
    with pytest.raises(Refused, match="two distinct people other than alice"):
        check("UPDATE", old, switch(False, by="alice", approvals=["bob"]), BOB)
    old2 = switch(True, by="alice", approvals=["bob", "carol"])
    check("UPDATE", old2, switch(False, by="alice", approvals=["bob", "carol"]), BOB)


def test_deleting_an_engaged_switch_is_refused_and_a_released_one_is_not():
    with pytest.raises(Refused, match="is engaged"):
        admit("DELETE", switch(True, by="alice"), None, ALICE)
    assert admit("DELETE", switch(False), None, ALICE) == {}


def test_a_request_without_a_username_is_refused():
    with pytest.raises(Refused, match="no authenticated username"):
        Requester.of({"groups": ["system:masters"]})


def test_an_order_never_turns_an_empty_cover_into_every_agent():
    from fleetward.operator.killswitch.control import order_agents

    assert order_agents(switch(True), []) == []  # empty scope: every agent, known or not
    narrowed = switch(True, scope={"namespaces": ["quiet"]})
    assert order_agents(narrowed, []) is None  # covers nothing: no order at all
    assert order_agents(narrowed, ["quiet/a"]) == ["quiet/a"]


def test_an_order_carries_the_switchs_scope_as_written():
    from fleetward.operator.killswitch.control import new_order

    from fleetward.api.envelopes import parse_control

    scope = {
        "namespaces": ["githouse"],
        "agentSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["money"]}]},
    }
    halt = parse_control(new_order("halt", switch(True, scope=scope), ["githouse/billing"]).to_json())
    assert halt.scope is not None and halt.scope.model_dump(by_alias=True, exclude_none=True) == scope
    assert halt.agents == ["githouse/billing"]  # what instances act on: the scope resolved
    everything = parse_control(new_order("resume", switch(False), []).to_json())
    assert everything.scope is not None and everything.scope.model_dump(exclude_none=True) == {}
    # A scope the order cannot carry (a switch stored under another version's schema) never stops the order.
    odd = parse_control(new_order("halt", switch(True, scope={"namespaces": ["Not_A_Label"]}), ["a/b"]).to_json())
    assert odd.scope is None and odd.agents == ["a/b"] and odd.type == "halt"


def test_a_halt_carries_close_sessions_for_the_gateways():
    from fleetward.operator.killswitch.control import new_order

    from fleetward.api.envelopes import parse_control

    assert parse_control(new_order("halt", switch(True), ["a/b"]).to_json()).close_sessions is True
    keep = switch(True)
    keep["spec"]["actions"] = {"closeSessions": False}
    assert parse_control(new_order("halt", keep, ["a/b"]).to_json()).close_sessions is False
    assert parse_control(new_order("resume", keep, ["a/b"]).to_json()).close_sessions is None


# -- side-by-side installations ----------------------------------------------------------


def test_each_installation_keeps_its_own_kopf_state_and_finalizer():
    """KillSwitches are cluster-scoped and every installation handles them: a shared
    progress prefix let the first installation mark a change handled for all of them."""
    from fleetward.operator.settings import OperatorSettings

    a, b = OperatorSettings(namespace="fleetward-system"), OperatorSettings(namespace="team-a-system")
    assert a.kopf_prefix != b.kopf_prefix and a.finalizer != b.finalizer
    assert b.finalizer == "team-a-system.fleetward.dev/cleanup"
    with pytest.raises(ValueError, match="namespace"):
        OperatorSettings(namespace="Not A Namespace")


def test_an_installation_handles_only_the_switches_that_involve_it():
    from fleetward.operator.handlers.killswitch import involves
    from fleetward.operator.settings import OperatorSettings

    index = {"agents_by_namespace": {"team-a": [agent("team-a", "billing")]}}
    scoped = OperatorSettings(namespace="team-a-system", watch_namespaces=["team-a"])
    wide = OperatorSettings(namespace="fleetward-system", exclude_namespaces=["team-a"])
    elsewhere = switch(True, scope={"namespaces": ["team-b"]})
    mine = switch(True, scope={"namespaces": ["team-a"]})
    by_label = switch(True, scope={"agentSelector": {"matchLabels": {"tier": "gold"}}})
    assert involves(scoped, mine, index)
    assert not involves(scoped, elsewhere, {"agents_by_namespace": {}})
    assert not involves(scoped, by_label, index)  # covers none of its Agents
    assert involves(scoped, switch(True), index)  # every agent, its own included
    assert not involves(wide, mine, {"agents_by_namespace": {}})  # the scoped one answers
    assert involves(wide, elsewhere, {"agents_by_namespace": {}})


def test_the_webhook_adds_the_finalizer_of_an_involved_installation_on_engage():
    """Saves Kopf's own finalizer write (a round trip) before the engage handler runs."""
    from fleetward.operator.killswitch.admission import with_finalizer
    from fleetward.operator.settings import OperatorSettings

    index = {"agents_by_namespace": {"team-a": [agent("team-a", "billing")]}}
    scoped = OperatorSettings(namespace="team-a-system", watch_namespaces=["team-a"])
    mine = switch(True, scope={"namespaces": ["team-a"]})
    mine["metadata"]["finalizers"] = ["other-system.fleetward.dev/cleanup"]
    assert with_finalizer(scoped, None, mine, index) == [
        "other-system.fleetward.dev/cleanup",
        "team-a-system.fleetward.dev/cleanup",
    ]
    engaged_now = switch(True, scope={"namespaces": ["team-a"]})
    assert with_finalizer(scoped, switch(False), engaged_now, index) == ["team-a-system.fleetward.dev/cleanup"]
    assert with_finalizer(scoped, switch(False), switch(False, scope={"namespaces": ["team-a"]}), index) is None
    assert with_finalizer(scoped, None, switch(True, scope={"namespaces": ["team-b"]}), index) is None
    assert with_finalizer(scoped, None, mine, {}) is None  # indexes not ready: Kopf adds it later
    mine["metadata"]["finalizers"].append("team-a-system.fleetward.dev/cleanup")
    assert with_finalizer(scoped, None, mine, index) is None  # already there
