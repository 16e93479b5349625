"""Admission webhooks the operator serves (SPEC §2): what the schema and CEL cannot check.

Guardrails (`check_guardrail`): every regular expression the agent runtime compiles (a PII
entity's `detector`, each `injection.patterns[]` entry) must compile in the runtime's own
dialect (`fleetward.api.guardrail.compile_pattern`, which the runtime's guardrail engine
calls); CEL has no way to parse a Python regular expression. A refusal names each field
(`spec.injection.patterns[2]`) and the compiler's error. (`policy.bannedPhrases` are
matched as escaped literals, never as regular expressions, so they cannot fail to compile.)

KillSwitches (SPEC §2, §7): identities come from the API server's
authentication (`userInfo` of the admission request), never from text a user typed.

- engaging (create with `engaged: true`, or false -> true) stamps who and when into
  annotations the operator copies to the status; any other change to them is undone;
- an approval may only be added, changed or withdrawn by the user it names (the webhook
  stamps `approvedAt` and `groups`), never by the engager, and only while engaged;
- releasing (true -> false) needs approvals from two distinct users other than the engager;
- deleting an engaged switch is refused: it would release it without the two approvals.

Pure functions: `admit` returns the patch to apply or raises `Refused`; the HTTPS server
that answers the API server's AdmissionReviews is killswitch/admission.py."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetward.operator.killswitch.scope import ENGAGED_AT, ENGAGED_BY

from fleetward.api.guardrail import REGEX_DIALECT, compile_pattern

STAMPED = (ENGAGED_BY, ENGAGED_AT)


class Refused(Exception):
    """The request is rejected with this message (HTTP 403 from the API server)."""

    def status(self) -> dict[str, Any]:
        """The AdmissionResponse `status` (a metav1.Status) for this refusal."""
        return {"code": 403, "message": str(self)}


class Invalid(Refused):
    """The object is invalid: 422 with one cause per field, like the API server's own
    schema and CEL errors (`kubectl` shows the message, clients can read the causes)."""

    def __init__(self, kind: str, name: str, problems: Sequence[tuple[str, str]]) -> None:
        self.kind, self.name, self.problems = kind, name, list(problems)
        listed = "; ".join(f"{field}: {message}" for field, message in self.problems)
        super().__init__(f"{kind} {name!r} is invalid: {listed}")

    def status(self) -> dict[str, Any]:
        return {
            "code": 422,
            "reason": "Invalid",
            "message": str(self),
            "details": {
                "name": self.name,
                "group": "fleetward.dev",
                "kind": self.kind,
                "causes": [{"reason": "FieldValueInvalid", "field": f, "message": m} for f, m in self.problems],
            },
        }


# -- Guardrails ----------------------------------------------------------------------------

_SHOWN = 80  # characters of a pattern quoted in a message (patterns may have up to 1024)


def _regex_fields(spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(field path, value) of every regular expression in a Guardrail spec (wire form),
    whether or not the runtime would compile it today (an `injection.mode: off` or an
    entity whose applyTo is narrowed still holds patterns a later edit turns on)."""
    pii = spec.get("pii") if isinstance(spec.get("pii"), dict) else {}
    for i, entity in enumerate(pii.get("entities") or []):
        if isinstance(entity, dict) and entity.get("detector") is not None:
            yield f"spec.pii.entities[{i}].detector", entity["detector"]
    injection = spec.get("injection") if isinstance(spec.get("injection"), dict) else {}
    for i, pattern in enumerate(injection.get("patterns") or []):
        yield f"spec.injection.patterns[{i}]", pattern


def guardrail_problems(spec: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(field path, what is wrong) for every pattern of a Guardrail spec that the agent
    runtime could not compile; empty when all compile."""
    problems: list[tuple[str, str]] = []
    for field, pattern in _regex_fields(spec or {}):
        if not isinstance(pattern, str):
            problems.append((field, f"allowed: {REGEX_DIALECT}, got {type(pattern).__name__}"))
            continue
        try:
            compile_pattern(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            shown = pattern if len(pattern) <= _SHOWN else pattern[:_SHOWN] + "..."
            problems.append((field, f"invalid regular expression {shown!r}: {e}; allowed: {REGEX_DIALECT}"))
    return problems


def serves_namespace(namespace: str | None, watch: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether this installation validates objects in `namespace`: one of `watch` (all when
    empty) and none of the `exclude` globs, the operator's own scope. The chart's
    namespaceSelector already keeps other namespaces away; this also covers glob excludes,
    which a selector cannot express."""
    if not namespace:
        return False
    if watch and namespace not in watch:
        return False
    return not any(fnmatch.fnmatchcase(namespace, p) for p in exclude)


def check_guardrail(operation: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
    """The validating pass for a Guardrail: raises Invalid naming every pattern that does
    not compile. Only CREATE and spec-changing UPDATEs are checked, so metadata-only writes
    (labels, Kopf's annotations, finalizers, a delete) of a Guardrail stored before this
    check existed still go through."""
    if operation not in ("CREATE", "UPDATE") or new is None:
        return
    meta = new.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return
    if operation == "UPDATE" and old is not None and old.get("spec") == new.get("spec"):
        return
    problems = guardrail_problems(new.get("spec"))
    if problems:
        raise Invalid("Guardrail", str(meta.get("name") or meta.get("generateName") or ""), problems)


def normalize_guardrail(new: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The mutating pass for a Guardrail: JSON Patch operations that write `injection.mode:
    off` as the string it means. YAML 1.1 loaders (kubectl's, PyYAML) read an unquoted `off`
    as the boolean false, which the CRD's string enum would refuse with "must be of type
    string"; the mutating pass runs before the schema is checked. Nothing else is touched:
    an unquoted `on`/`yes` (true) names no mode and is left for the schema to refuse."""
    injection = ((new or {}).get("spec") or {}).get("injection")
    if isinstance(injection, dict) and injection.get("mode") is False:
        return [{"op": "replace", "path": "/spec/injection/mode", "value": "off"}]
    return []


# -- KillSwitches --------------------------------------------------------------------------


@dataclass(frozen=True)
class Requester:
    username: str
    groups: tuple[str, ...] = ()

    @classmethod
    def of(cls, userinfo: dict[str, Any] | None) -> Requester:
        info = userinfo or {}
        name = info.get("username") or ""
        if not name:
            raise Refused("the API server sent no authenticated username; KillSwitch changes need one")
        return cls(name, tuple(info.get("groups") or ()))


def _engaged(obj: dict[str, Any] | None) -> bool:
    return bool(obj and (obj.get("spec") or {}).get("engaged"))


def _annotations(obj: dict[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


def _approvals(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {a.get("user", ""): dict(a) for a in ((obj or {}).get("spec") or {}).get("approvals") or []}


def well_formed(obj: dict[str, Any] | None) -> bool:
    """Whether the fields this webhook reads have the types the schema gives them. Mutating
    webhooks see a request before the schema is checked; a malformed one (e.g. `approvals:
    [alice]`, `scope: all`) is let through untouched, so that the API server refuses it with
    its schema message naming the field, instead of the webhook failing on it."""
    if obj is None:
        return True
    meta, spec = obj.get("metadata"), obj.get("spec")
    if not isinstance(meta, dict | None) or not isinstance(spec, dict | None):
        return False
    if not isinstance((meta or {}).get("annotations"), dict | None):
        return False
    spec = spec or {}
    approvals = spec.get("approvals")
    if approvals is not None and not (
        isinstance(approvals, list)
        and all(isinstance(a, dict) and isinstance(a.get("user"), str | None) for a in approvals)
    ):
        return False
    if not all(isinstance(spec.get(k), dict | None) for k in ("scope", "actions")):
        return False
    scope = spec.get("scope") or {}
    selector = scope.get("agentSelector")
    return (
        isinstance(scope.get("namespaces"), list | None)
        and all(isinstance(ns, str) for ns in scope.get("namespaces") or [])
        and isinstance(selector, dict | None)
        and isinstance((selector or {}).get("matchLabels"), dict | None)
        and isinstance((selector or {}).get("matchExpressions"), list | None)
        and all(isinstance(e, dict) for e in (selector or {}).get("matchExpressions") or [])
    )


def _with_approver(new: dict[str, Any], requester: Requester) -> dict[str, Any]:
    """Approval entries added without a user (`approvals: [{comment: ...}]`) are the
    requester's: the webhook stamps the authenticated name (SPEC §2: it stamps or rejects)."""
    spec = new.get("spec") or {}
    approvals = spec.get("approvals")
    if not approvals or all(a.get("user") for a in approvals):
        return new
    filled = [a if a.get("user") else {**a, "user": requester.username} for a in approvals]
    return {**new, "spec": {**spec, "approvals": filled}}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


APPROVAL_STAMPS = ("approvedAt", "groups")


def _same_approval(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same approval: its approver and what they wrote. Its stamps (APPROVAL_STAMPS) are
    the webhook's: a request that sends another approver's entry back with other stamps (a
    manifest without them, a client that rewrote the time) gets the stamps put back, like
    the engage annotations, rather than refused."""
    return a.get("user") == b.get("user") and a.get("comment") == b.get("comment")


def _restamped(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """An approval whose stamps a request changed (`_same_approval` otherwise)."""
    return any(old.get(k) != new.get(k) for k in APPROVAL_STAMPS)


def admit(
    operation: str,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    requester: Requester,
    *,
    now: str | None = None,
    enforce_release: bool = False,
) -> dict[str, Any]:
    """Decide one admission request. Returns a merge patch for the new object (empty when
    nothing is stamped); raises Refused with a message for the person who sent it.

    The release rule, and that other approvers' stamps stay as they were, are enforced in
    the validating pass only (`enforce_release`), after the
    schema and its CEL backstop had their say."""
    now = now or _now()
    name = ((new or old or {}).get("metadata") or {}).get("name", "")
    if operation == "DELETE":
        if _engaged(old):
            raise Refused(
                f"KillSwitch {name} is engaged: deleting it would release the agents without the two "
                "approvals a release needs. Release it first (spec.engaged: false with approvals from two "
                "people other than the engager), then delete it."
            )
        return {}
    if operation not in ("CREATE", "UPDATE") or new is None:
        return {}
    if not (well_formed(old) and well_formed(new)):
        return {}
    new = _with_approver(new, requester)

    users = [a.get("user") for a in (new.get("spec") or {}).get("approvals") or []]
    if len(users) != len(set(users)):
        return {}  # duplicate approvers: the schema (listType=map) rejects it with its usual message
    old_ann, new_ann = _annotations(old), _annotations(new)
    engaging = _engaged(new) and not _engaged(old)
    releasing = _engaged(old) and not _engaged(new)
    if _engaged(old) and _engaged(new):
        # The operator reconciles a switch to its current spec: a narrower scope or an action
        # turned off would release agents without the approvals a release needs.
        old_spec, new_spec = (old or {}).get("spec") or {}, new.get("spec") or {}
        for key in ("scope", "actions"):
            if (old_spec.get(key) or {}) != (new_spec.get(key) or {}):
                raise Refused(
                    f"spec.{key}: KillSwitch {name} is engaged, and changing its {key} could release agents "
                    "without the two approvals a release needs. Release it first (spec.engaged: false with "
                    "two approvals), or engage another KillSwitch to cover more agents."
                )
    patch_ann: dict[str, str | None] = {}
    if engaging:
        patch_ann = {ENGAGED_BY: requester.username, ENGAGED_AT: now}
        engager = requester.username
    else:
        # Stamps are the webhook's alone: put back what it wrote, drop what a user wrote.
        for key in STAMPED:
            if new_ann.get(key) != old_ann.get(key):
                patch_ann[key] = old_ann.get(key)
        engager = old_ann.get(ENGAGED_BY)

    old_ap, new_ap = ({} if engaging else _approvals(old)), _approvals(new)
    approvals_patch: list[dict[str, Any]] | None = None
    if engaging and _approvals(new):
        approvals_patch = []  # approvals of an earlier release never carry over to a new engage
        new_ap = {}
    changed = {
        u
        for u in set(old_ap) | set(new_ap)
        if u not in old_ap or u not in new_ap or not _same_approval(old_ap[u], new_ap[u])
    }
    for user in sorted(changed):
        verb = "withdraw" if user not in new_ap else ("add" if user not in old_ap else "change")
        if user != requester.username:
            raise Refused(
                f"spec.approvals: you are authenticated as {requester.username!r} and cannot {verb} the approval "
                f"of {user!r}; each approver adds their own (e.g. kubectl fleetward approve {name})."
            )
        if user in new_ap and engager and user == engager:
            raise Refused(
                f"spec.approvals: {user!r} engaged KillSwitch {name} and cannot approve its release; "
                "two other people must."
            )
        if user in new_ap and not (_engaged(old) or _engaged(new)):
            raise Refused(f"spec.approvals: KillSwitch {name} is not engaged, so there is nothing to approve.")
    # Another approver's stamps sent back changed: theirs are put back (the validating pass
    # refuses them if this mutating pass did not run).
    restamped = {u for u in set(old_ap) & set(new_ap) - changed if _restamped(old_ap[u], new_ap[u])}
    stamped_approvals = None
    if changed & set(new_ap) or restamped:
        stamped_approvals = []
        for user, entry in sorted(new_ap.items()):
            if user in changed:
                entry = {**entry, "approvedAt": now, "groups": list(requester.groups) or None}
                entry = {k: v for k, v in entry.items() if v is not None}
            elif user in restamped:
                entry = old_ap[user]
            stamped_approvals.append(entry)

    if releasing and enforce_release:
        approvers = sorted(u for u in new_ap if u and u != engager)
        if len(approvers) < 2:
            have = ", ".join(approvers) if approvers else "none"
            raise Refused(
                f"releasing KillSwitch {name} needs spec.approvals from two distinct people other than "
                f"{engager or 'the engager'}; approvals so far: {have}."
            )
    if restamped and enforce_release:
        who = ", ".join(repr(u) for u in sorted(restamped))
        raise Refused(
            f"spec.approvals: the approvedAt and groups of {who} are stamped by the Fleetward admission webhook "
            "and cannot be changed."
        )

    patch: dict[str, Any] = {}
    if patch_ann:
        patch["metadata"] = {"annotations": patch_ann}
    if approvals_patch is not None:
        patch["spec"] = {"approvals": approvals_patch}
    elif stamped_approvals is not None:
        patch["spec"] = {"approvals": stamped_approvals}
    return patch


def check(operation: str, old: dict[str, Any] | None, new: dict[str, Any] | None, requester: Requester) -> None:
    """The validating pass over the final object (after every mutating webhook): the
    stamps must be the ones `admit` would leave, and the release rule must hold."""
    if operation == "DELETE":
        admit(operation, old, new, requester)
        return
    if new is None:
        return
    ann, old_ann = _annotations(new), _annotations(old)
    if _engaged(new) and not _engaged(old):
        if ann.get(ENGAGED_BY) != requester.username:
            raise Refused(
                f"metadata.annotations[{ENGAGED_BY}] must name the authenticated user who engages "
                f"({requester.username!r}); it is set by the Fleetward admission webhook."
            )
    elif any(ann.get(k) != old_ann.get(k) for k in STAMPED):
        raise Refused(f"metadata.annotations {', '.join(STAMPED)} are set by the Fleetward admission webhook only.")
    admit(operation, old, new, requester, enforce_release=True)  # approval and release rules, final object
