"""Audit records (SPEC §8): one entry of the append-only, hash-chained audit log, as stored
in the database and mirrored to the audit topic (`fleetward.audit`, key = chain id).

The hash of a record is SHA-256 over the RFC 8785 (JCS) canonical JSON of the record
without its `hash` field, encoded as UTF-8, in lower-case hex. Each record carries the
hash of the one before (`prevHash`; 64 zeros for sequence 1), so changing, removing or
moving any record breaks the chain from that point on. docs/audit.md describes the format
for tools that verify it on their own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationError

from fleetward.api.envelopes.wire import ID_CHARS, INT64_MAX, RFC3339, Envelope, EnvelopeError, Identity

AUDIT_SCHEMA = "fleetward.audit.v1"
GENESIS_HASH = "0" * 64
"""`prevHash` of the first record of a chain."""
HASH_PATTERN = r"^[0-9a-f]{64}$"

AuditAction = Literal[
    "killswitch.engage",
    "killswitch.approve",
    "killswitch.release",
    "review.decision",
    "tool.call",
    "guardrail.block",
    "budget.stop",
    "config.change",
]
"""What happened. The SPEC §8 record kinds: kill switch engage/approve/release (with
identities), reviewer decisions, tool calls (redacted arguments), guardrail blocks,
budget stops, operator configuration changes."""

Hash = Annotated[str, Field(min_length=64, max_length=64, pattern=HASH_PATTERN)]
ChainId = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_CHARS)]
Target = Annotated[str, Field(min_length=1, max_length=1024)]
# The text that was hashed: kept as a string (not a datetime) so a record re-serialised by
# any tool hashes the same; Fleetward writes UTC with microseconds, e.g. 2026-01-31T12:00:00.000000Z.
AuditTimestamp = Annotated[str, Field(min_length=20, max_length=40, pattern=RFC3339)]

MAX_SAFE_INTEGER = 2**53 - 1


class AuditRecord(Envelope):
    """One audit log record. `hash` = SHA-256 of the JCS form of every other field."""

    KIND = "audit record"
    SCHEMA = AUDIT_SCHEMA

    schema_version: Literal["fleetward.audit.v1"] = Field(alias="schema")
    """Always fleetward.audit.v1."""
    timestamp: AuditTimestamp  # type: ignore[assignment]  # text, not datetime: see AuditTimestamp
    """When the record was appended (RFC 3339; Fleetward writes UTC with microseconds)."""
    chain: ChainId
    """The chain this record belongs to (one per audit database); the Kafka key."""
    sequence: Annotated[int, Field(ge=1, le=INT64_MAX)]
    """Position in the chain, from 1, without gaps."""
    actor: Identity
    """Who did it: the authenticated identity when there is one (a Kubernetes user, the
    reviewer's verified token subject, `agent:<namespace>/<name>` for a runtime)."""
    action: AuditAction
    """What happened."""
    target: Target
    """What it happened to (a KillSwitch, an agent, a tool, a session...)."""
    details: dict[str, Any] = Field(max_length=256)
    """Action-specific facts, already redacted (no secrets, no unredacted PII)."""
    prev_hash: Hash
    """`hash` of the record before (64 zeros for sequence 1)."""
    hash: Hash
    """SHA-256 (hex) of the JCS canonical JSON of this record without `hash`."""

    @classmethod
    def seal(
        cls,
        *,
        id: str,
        timestamp: str,
        chain: str,
        sequence: int,
        actor: str,
        action: str,
        target: str,
        details: Mapping[str, Any],
        prev_hash: str,
    ) -> Self:
        """A validated record with its hash computed."""
        body = {
            "schema": AUDIT_SCHEMA,
            "id": id,
            "timestamp": timestamp,
            "chain": chain,
            "sequence": sequence,
            "actor": actor,
            "action": action,
            "target": target,
            "details": dict(details),
            "prevHash": prev_hash,
        }
        try:
            digest = record_hash(body)
            return cls.model_validate({**body, "hash": digest})
        except ValidationError as e:
            raise EnvelopeError(cls.KIND, e) from None
        except (TypeError, ValueError) as e:
            raise EnvelopeError(cls.KIND, f"details: {e}") from None

    def body(self) -> dict[str, Any]:
        """The hashed part: every field but `hash`, by wire name."""
        doc = self.model_dump(mode="json", by_alias=True)
        doc.pop("hash")
        return doc

    def expected_hash(self) -> str:
        """The hash this record's content calls for (equals `hash` unless it was altered)."""
        return record_hash(self.body())

    def to_json(self) -> str:
        """The canonical (JCS) JSON of the whole record: what the audit topic carries."""
        return canonical_json(self.model_dump(mode="json", by_alias=True)).decode("utf-8")


def record_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the JCS form of a record without its `hash` field."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


# --- RFC 8785 JSON Canonicalization Scheme -------------------------------------------------
# Written here (about 50 lines) rather than taken from a package so the contract module keeps
# its dependencies to pydantic; tests check it against the RFC's own examples.


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS): object members sorted by UTF-16 code units, no whitespace, strings
    escaped minimally, numbers as ECMAScript writes them; UTF-8. Raises ValueError for what
    JSON (I-JSON) cannot carry: NaN/Infinity, integers beyond ±(2^53-1), lone surrogates."""
    text = _jcs(value, "$")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate, which is not valid Unicode text") from None


def _jcs(value: Any, path: str) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError(f"{path}: integer {value} is beyond ±(2^53-1); send it as a string")
        return str(value)
    if isinstance(value, float):
        return _es_number(value, path)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # escapes exactly what JCS escapes
    if isinstance(value, list | tuple):
        return "[" + ",".join(_jcs(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{path}: object key {key!r} is not a string")
        keys = sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        members = (json.dumps(k, ensure_ascii=False) + ":" + _jcs(value[k], f"{path}.{k}") for k in keys)
        return "{" + ",".join(members) + "}"
    raise TypeError(f"{path}: {type(value).__name__} is not a JSON value")


def _es_number(x: float, path: str) -> str:
    """ECMAScript Number::toString (RFC 8785 §3.2.2.3). Python's repr yields the same
    shortest round-trip digits; only the layout differs."""
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"{path}: {x} is not a JSON number")
    if x == 0:
        return "0"  # also -0
    sign = "-" if x < 0 else ""
    parts = Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, parts.digits))
    stripped = digits.rstrip("0")
    k, n = len(stripped), int(parts.exponent) + len(digits)  # value = 0.<stripped> * 10^n
    if k <= n <= 21:
        out = stripped + "0" * (n - k)
    elif 0 < n <= 21:
        out = stripped[:n] + "." + stripped[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * -n + stripped
    else:
        e = n - 1
        mantissa = stripped if k == 1 else stripped[0] + "." + stripped[1:]
        out = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out
