"""The GitHouse domain behind the tools: an in-memory stand-in for GitHouse's account,
billing, CI, Workers, ShotGun and forum systems, seeded with a small plausible world.

Domain rules enforced here (defence in depth behind the runtime's SOP gate):
- reset_2fa, revoke_token need the account's identity verified (verify_identity) in the
  same run; grant_org_role / set_billing_manager need an owner / billing owner of the
  organisation verified in the same run.
- issue_refund needs the transaction verified (verify_transaction) in the same run,
  refunds at most the charged amount, and refunds a transaction once.
Every applied change is appended to `effects` (served at GET /_effects).

Not thread-safe on purpose: the aiohttp service calls it from its one event loop.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from fleetward.toolkit.examples.githouse import arguments as a


class ToolError(Exception):
    """A domain refusal: HTTP status, stable error code, human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Caller:
    """Who calls, from the verified token."""

    agent: str
    run_id: str
    idempotency_key: str


ORG_ROLES = ("member", "maintainer", "admin", "billing_manager", "owner")


def _seed() -> dict[str, Any]:
    return {
        "accounts": {
            "octo-admin": {
                "org": "octo-enterprise",
                "flagged": False,
                "tokens": {"pat_7f3a": "active", "pat_91bc": "active"},
                "two_factor": "enabled",
            },
            "lead-dev": {
                "org": "octo-enterprise",
                "flagged": False,
                "tokens": {"pat_c0de": "active"},
                "two_factor": "enabled",
            },
            "jdoe": {
                "org": "jdoe-labs",
                "flagged": False,
                "tokens": {"pat_leak01": "active"},
                "two_factor": "locked_out",
            },
            "mallory": {"org": "jdoe-labs", "flagged": True, "tokens": {}, "two_factor": "enabled"},
        },
        "orgs": {
            "octo-enterprise": {
                "plan": "enterprise",
                "members": {"octo-admin": "owner", "lead-dev": "maintainer"},
                "billing_owners": ["octo-admin"],
                "billing_managers": [],
            },
            "jdoe-labs": {
                "plan": "team",
                "members": {"jdoe": "owner", "mallory": "member"},
                "billing_owners": ["jdoe"],
                "billing_managers": [],
            },
        },
        "transactions": {
            "txn_1001": {
                "account": "octo-admin",
                "amount_cents": 4900,
                "currency": "usd",
                "description": "Actions minutes overage",
                "refunded": False,
            },
            "txn_1002": {
                "account": "jdoe",
                "amount_cents": 2100,
                "currency": "usd",
                "description": "Team plan, 3 seats",
                "refunded": False,
            },
            "txn_1003": {
                "account": "octo-admin",
                "amount_cents": 120000,
                "currency": "usd",
                "description": "Enterprise plan, annual",
                "refunded": True,
            },
        },
        "runners": {
            "octo-enterprise": {
                "online": 0,
                "offline": 3,
                "queued_jobs": 57,
                "reason": "Actions spending limit reached; runners paused since 3 h ago",
            },
            "jdoe-labs": {"online": 2, "offline": 0, "queued_jobs": 0, "reason": None},
        },
        "deployments": {
            "dep_42": {
                "worker": "edge-auth",
                "status": "failed",
                "logs": [
                    "build ok (412 KiB)",
                    "uploading bundle",
                    "deploy failed: script startup exceeded CPU time limit (402 ms > 400 ms)",
                ],
            },
        },
        "scans": {
            "octo-enterprise/api": {
                "scan_id": "scan_77",
                "findings": [
                    {"id": "SG-1", "severity": "high", "rule": "hardcoded-credential", "file": "config/dev.py"},
                    {"id": "SG-2", "severity": "low", "rule": "weak-hash", "file": "legacy/md5.py"},
                ],
            },
        },
        "posts": {
            "post_1337": {"author": "spam-bot-9", "hidden": False, "spam_score": 0.98},
            "post_2001": {"author": "jdoe", "hidden": False, "spam_score": 0.02},
        },
        "incidents": {},
        "feedback": {},
        "refunds": {},
    }


@dataclass(frozen=True)
class ToolSpec:
    name: str
    arguments: type[BaseModel]
    mutating: bool
    handler: Callable[[GitHouseBackend, Caller, Any], dict[str, Any]]


@dataclass
class GitHouseBackend:
    state: dict[str, Any] = field(default_factory=_seed)
    effects: list[dict[str, Any]] = field(default_factory=list)
    # (run id) -> verified accounts / transactions in that run
    verified_identities: dict[str, set[str]] = field(default_factory=dict)
    verified_transactions: dict[str, set[str]] = field(default_factory=dict)

    # -- helpers --------------------------------------------------------------------------

    def _effect(self, tool: str, caller: Caller, args: BaseModel, result: dict[str, Any]) -> None:
        self.effects.append(
            {
                "seq": len(self.effects) + 1,
                "tool": tool,
                "agent": caller.agent,
                "runId": caller.run_id,
                "idempotencyKey": caller.idempotency_key,
                "arguments": args.model_dump(),
                "result": copy.deepcopy(result),
                "at": dt.datetime.now(dt.UTC).isoformat(),
            }
        )

    def _account(self, name: str) -> dict[str, Any]:
        account = self.state["accounts"].get(name)
        if account is None:
            raise ToolError(404, "unknown_account", f"no GitHouse account {name!r}")
        return account

    def _org(self, name: str) -> dict[str, Any]:
        org = self.state["orgs"].get(name)
        if org is None:
            raise ToolError(404, "unknown_org", f"no organisation {name!r}")
        return org

    def _require_identity(self, caller: Caller, account: str) -> None:
        if account not in self.verified_identities.get(caller.run_id, set()):
            raise ToolError(
                409, "identity_not_verified", f"verify the identity of {account!r} (verify_identity) in this run first"
            )

    def _verified_in_run(self, caller: Caller) -> set[str]:
        return self.verified_identities.get(caller.run_id, set())

    # -- account & security -------------------------------------------------------------

    def verify_identity(self, caller: Caller, args: a.VerifyIdentity) -> dict[str, Any]:
        # A check that fails answers non-2xx: the runtime's SOP gate counts only a 2xx call
        # as the step having succeeded (docs/toolkit.md), so no reset follows a refusal.
        account = self.state["accounts"].get(args.account)
        if account is None:
            raise ToolError(404, "unknown_account", f"no account {args.account!r}")
        if account["flagged"]:
            raise ToolError(422, "not_verified", "account under fraud review; hand over to a human")
        self.verified_identities.setdefault(caller.run_id, set()).add(args.account)
        return {
            "account": args.account,
            "verified": True,
            "method": "evidence_review" if args.evidence else "email_one_time_code",
        }

    def reset_2fa(self, caller: Caller, args: a.Reset2fa) -> dict[str, Any]:
        account = self._account(args.account)
        self._require_identity(caller, args.account)
        account["two_factor"] = "reset_pending_enrolment"
        result = {
            "account": args.account,
            "twoFactor": "reset",
            "nextStep": "enrol a new authenticator at the next sign-in; recovery codes were regenerated",
        }
        self._effect("reset_2fa", caller, args, result)
        return result

    def revoke_token(self, caller: Caller, args: a.RevokeToken) -> dict[str, Any]:
        account = self._account(args.account)
        self._require_identity(caller, args.account)
        status = account["tokens"].get(args.token_id)
        if status is None:
            raise ToolError(404, "unknown_token", f"account {args.account!r} has no token {args.token_id!r}")
        if status == "revoked":
            return {"account": args.account, "tokenId": args.token_id, "revoked": True, "alreadyRevoked": True}
        account["tokens"][args.token_id] = "revoked"
        result = {
            "account": args.account,
            "tokenId": args.token_id,
            "revoked": True,
            "alreadyRevoked": False,
            "advice": "rotate every secret the token could read",
        }
        self._effect("revoke_token", caller, args, result)
        return result

    def grant_org_role(self, caller: Caller, args: a.GrantOrgRole) -> dict[str, Any]:
        if args.role not in ORG_ROLES:
            raise ToolError(422, "invalid_role", f"role must be one of {', '.join(ORG_ROLES)}, got {args.role!r}")
        org = self._org(args.org)
        if args.member not in org["members"]:
            raise ToolError(404, "unknown_member", f"{args.member!r} is not a member of {args.org!r}")
        owners = {m for m, role in org["members"].items() if role == "owner"}
        if not owners & self._verified_in_run(caller):
            raise ToolError(
                409,
                "requester_not_verified_owner",
                f"verify an owner of {args.org!r} (verify_identity) in this run first",
            )
        org["members"][args.member] = args.role
        result = {"org": args.org, "member": args.member, "role": args.role}
        self._effect("grant_org_role", caller, args, result)
        return result

    # -- billing --------------------------------------------------------------------------

    def verify_transaction(self, caller: Caller, args: a.VerifyTransaction) -> dict[str, Any]:
        txn = self.state["transactions"].get(args.transaction_id)
        if txn is None:
            raise ToolError(404, "unknown_transaction", f"no transaction {args.transaction_id!r}")
        if txn["account"] != args.account:
            raise ToolError(422, "not_verified", "the transaction does not belong to this account")
        self.verified_transactions.setdefault(caller.run_id, set()).add(args.transaction_id)
        return {
            "transactionId": args.transaction_id,
            "verified": True,
            "account": args.account,
            "amountCents": txn["amount_cents"],
            "currency": txn["currency"],
            "description": txn["description"],
            "refundable": not txn["refunded"],
        }

    def issue_refund(self, caller: Caller, args: a.IssueRefund) -> dict[str, Any]:
        txn = self.state["transactions"].get(args.transaction_id)
        if txn is None:
            raise ToolError(404, "unknown_transaction", f"no transaction {args.transaction_id!r}")
        if args.transaction_id not in self.verified_transactions.get(caller.run_id, set()):
            raise ToolError(
                409,
                "transaction_not_verified",
                f"verify {args.transaction_id!r} (verify_transaction) in this run first",
            )
        if txn["refunded"]:
            raise ToolError(409, "already_refunded", f"{args.transaction_id!r} was already refunded")
        if args.amount_cents > txn["amount_cents"]:
            raise ToolError(
                422,
                "amount_exceeds_charge",
                f"amount_cents {args.amount_cents} exceeds the charge of {txn['amount_cents']}",
            )
        txn["refunded"] = True
        refund_id = f"re_{len(self.state['refunds']) + 1:04d}"
        result = {
            "refundId": refund_id,
            "transactionId": args.transaction_id,
            "amountCents": args.amount_cents,
            "currency": txn["currency"],
            "status": "succeeded",
        }
        self.state["refunds"][refund_id] = result
        self._effect("issue_refund", caller, args, result)
        return result

    def set_billing_manager(self, caller: Caller, args: a.SetBillingManager) -> dict[str, Any]:
        org = self._org(args.org)
        if args.member not in org["members"]:
            raise ToolError(404, "unknown_member", f"{args.member!r} is not a member of {args.org!r}")
        if not set(org["billing_owners"]) & self._verified_in_run(caller):
            raise ToolError(
                409,
                "requester_not_verified_billing_owner",
                f"verify a billing owner of {args.org!r} (verify_identity) in this run first",
            )
        if args.member not in org["billing_managers"]:
            org["billing_managers"].append(args.member)
        result = {
            "org": args.org,
            "member": args.member,
            "role": "billing_manager",
            "note": "the member can now change spending limits",
        }
        self._effect("set_billing_manager", caller, args, result)
        return result

    # -- enterprise -------------------------------------------------------------------------

    def open_incident(self, caller: Caller, args: a.OpenIncident) -> dict[str, Any]:
        org = self._org(args.org)
        incident_id = f"INC-{2041 + len(self.state['incidents'])}"
        priority = {"sev1": "P1", "sev2": "P2", "sev3": "P3"}[args.severity]
        result = {
            "incidentId": incident_id,
            "org": args.org,
            "priority": priority,
            "status": "open",
            "tam": "assigned" if org["plan"] == "enterprise" else "none",
        }
        self.state["incidents"][incident_id] = {**result, "summary": args.summary}
        self._effect("open_incident", caller, args, result)
        return result

    # -- devsupport, workers, shotgun ---------------------------------------------------

    def platform_status(self, caller: Caller, args: a.PlatformStatus) -> dict[str, Any]:
        return {
            "status": "operational",
            "incidents": [],
            "components": {
                "git": "operational",
                "actions": "operational",
                "workers": "operational",
                "packages": "operational",
                "shotgun": "operational",
            },
        }

    def runner_status(self, caller: Caller, args: a.RunnerStatus) -> dict[str, Any]:
        self._org(args.org)
        runners = self.state["runners"].get(args.org, {"online": 0, "offline": 0, "queued_jobs": 0, "reason": None})
        return {
            "org": args.org,
            "online": runners["online"],
            "offline": runners["offline"],
            "queuedJobs": runners["queued_jobs"],
            "reason": runners["reason"],
        }

    def worker_deploy_logs(self, caller: Caller, args: a.WorkerDeployLogs) -> dict[str, Any]:
        deployment = self.state["deployments"].get(args.deployment_id)
        if deployment is None:
            raise ToolError(404, "unknown_deployment", f"no Workers deployment {args.deployment_id!r}")
        return {"deploymentId": args.deployment_id, **deployment}

    def shotgun_report(self, caller: Caller, args: a.ShotgunReport) -> dict[str, Any]:
        scan = self.state["scans"].get(args.repository)
        if scan is None or (args.scan_id and args.scan_id != scan["scan_id"]):
            raise ToolError(
                404,
                "unknown_scan",
                f"no ShotGun scan for {args.repository!r}" + (f" with id {args.scan_id!r}" if args.scan_id else ""),
            )
        return {"repository": args.repository, "scanId": scan["scan_id"], "findings": scan["findings"]}

    # -- discourse, feedback --------------------------------------------------------------

    def hide_post(self, caller: Caller, args: a.HidePost) -> dict[str, Any]:
        post = self.state["posts"].get(args.post_id)
        if post is None:
            raise ToolError(404, "unknown_post", f"no forum post {args.post_id!r}")
        if post["hidden"]:
            return {"postId": args.post_id, "hidden": True, "alreadyHidden": True}
        post["hidden"] = True
        result = {"postId": args.post_id, "hidden": True, "alreadyHidden": False}
        self._effect("hide_post", caller, args, result)
        return result

    def record_feedback(self, caller: Caller, args: a.RecordFeedback) -> dict[str, Any]:
        feedback_id = f"fb_{len(self.state['feedback']) + 1:04d}"
        self.state["feedback"][feedback_id] = args.model_dump()
        result = {"feedbackId": feedback_id, "caseId": args.case_id, "rating": args.rating}
        self._effect("record_feedback", caller, args, result)
        return result


def _spec(name: str, model: type[BaseModel], mutating: bool) -> ToolSpec:
    return ToolSpec(name=name, arguments=model, mutating=mutating, handler=getattr(GitHouseBackend, name))


# Every tool the GitHouse agents list in examples/githouse/30-agents.yaml.
TOOLS: dict[str, ToolSpec] = {
    s.name: s
    for s in (
        _spec("verify_identity", a.VerifyIdentity, False),
        _spec("reset_2fa", a.Reset2fa, True),
        _spec("revoke_token", a.RevokeToken, True),
        _spec("grant_org_role", a.GrantOrgRole, True),
        _spec("verify_transaction", a.VerifyTransaction, False),
        _spec("issue_refund", a.IssueRefund, True),
        _spec("set_billing_manager", a.SetBillingManager, True),
        _spec("open_incident", a.OpenIncident, True),
        _spec("platform_status", a.PlatformStatus, False),
        _spec("runner_status", a.RunnerStatus, False),
        _spec("worker_deploy_logs", a.WorkerDeployLogs, False),
        _spec("shotgun_report", a.ShotgunReport, False),
        _spec("hide_post", a.HidePost, True),
        _spec("record_feedback", a.RecordFeedback, True),
    )
}
