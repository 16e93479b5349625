"""The audit log (SPEC §8): append-only and hash-chained, in PostgreSQL (shared by every
replica and the operator) or SQLite (embedded default), mirrored to the audit topic.

    log = AuditLog.open("postgresql://...", kafka={"bootstrap.servers": "..."})
    log.append("killswitch.engage", actor="alice", target="global", details={"reason": "..."})
    result = log.verify()   # result.ok, result.checked, result.broken (the first broken record)

Used by the operator and the runtime alike, so it imports only `fleetward.api`. The record
format (for tools that verify on their own) is in docs/audit.md.
"""

from fleetward.api.envelopes import AuditAction, AuditRecord
from fleetward.audit.log import MAX_RECORD_BYTES, AuditLog
from fleetward.audit.mirror import DEFAULT_TOPIC, KafkaMirror
from fleetward.audit.redact import REDACTED, is_secret_key, strip_secrets
from fleetward.audit.store import AuditError, parse_dsn
from fleetward.audit.verify import Break, Head, VerifyResult, verify_chains, verify_documents

DSN_ENV = "FLEETWARD_AUDIT_DSN"
"""Where `fleetward audit` finds the audit database when --dsn is not given."""

KILL_SWITCH_ENGAGE = "killswitch.engage"
KILL_SWITCH_APPROVE = "killswitch.approve"
KILL_SWITCH_RELEASE = "killswitch.release"
REVIEW_DECISION = "review.decision"
TOOL_CALL = "tool.call"
GUARDRAIL_BLOCK = "guardrail.block"
BUDGET_STOP = "budget.stop"
CONFIG_CHANGE = "config.change"

__all__ = [
    "BUDGET_STOP",
    "CONFIG_CHANGE",
    "DEFAULT_TOPIC",
    "DSN_ENV",
    "GUARDRAIL_BLOCK",
    "KILL_SWITCH_APPROVE",
    "KILL_SWITCH_ENGAGE",
    "KILL_SWITCH_RELEASE",
    "MAX_RECORD_BYTES",
    "REDACTED",
    "REVIEW_DECISION",
    "TOOL_CALL",
    "AuditAction",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "Break",
    "Head",
    "KafkaMirror",
    "VerifyResult",
    "is_secret_key",
    "parse_dsn",
    "strip_secrets",
    "verify_chains",
    "verify_documents",
]
