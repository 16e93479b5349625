"""Argument models of the GitHouse tools: the server-side copy of the `inputSchema` each
tool has in examples/githouse/30-agents.yaml (a unit test keeps the two in step).
Unknown fields are rejected, as `additionalProperties: false` says."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Text = Annotated[str, StringConstraints(min_length=1, max_length=1000)]


class VerifyIdentity(Arguments):
    account: Text
    evidence: str | None = Field(default=None, max_length=1000)


class Reset2fa(Arguments):
    account: Text


class RevokeToken(Arguments):
    account: Text
    token_id: Text


class GrantOrgRole(Arguments):
    org: Text
    member: Text
    role: Text


class VerifyTransaction(Arguments):
    account: Text
    transaction_id: Text


class IssueRefund(Arguments):
    transaction_id: Text
    amount_cents: int = Field(ge=1)


class SetBillingManager(Arguments):
    org: Text
    member: Text


class OpenIncident(Arguments):
    org: Text
    summary: Text
    severity: Literal["sev1", "sev2", "sev3"]


class PlatformStatus(Arguments):
    pass


class RunnerStatus(Arguments):
    org: Text


class WorkerDeployLogs(Arguments):
    deployment_id: Text


class ShotgunReport(Arguments):
    repository: Text
    scan_id: str | None = Field(default=None, max_length=1000)


class HidePost(Arguments):
    post_id: Text


class RecordFeedback(Arguments):
    case_id: Text
    rating: int = Field(ge=1, le=5)
    comment: str | None = Field(default=None, max_length=4000)
