"""Recomputing a chain: walks the records in sequence order and names the first one that
breaks it, and how (see docs/audit.md, "Verifying").

Checks, in this order, for every record:
1. its sequence is the one after the previous record's: a gap means records were deleted;
2. its prevHash is the previous record's hash: otherwise records were moved or inserted
   (reordered), or the previous record was edited and re-hashed;
3. its hash is the hash of its content: otherwise it was edited;
4. it is a valid record of the same chain.
Then the chain head (kept beside the records by the writers) must point at the last
record: records missing at the end were deleted (truncated).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from fleetward.api.envelopes import AUDIT_SCHEMA, GENESIS_HASH, AuditRecord, record_hash

BreakKind = Literal["edited", "deleted", "reordered", "inserted", "invalid"]


@dataclass(frozen=True)
class Head:
    """Where the writers say the chain ends."""

    chain: str
    sequence: int
    hash: str


@dataclass(frozen=True)
class Break:
    """The first record that breaks the chain."""

    sequence: int
    """The broken record's sequence number (for a deletion: the first missing one)."""
    record_id: str | None
    """Its id, when the record exists."""
    kind: BreakKind
    """edited (hash mismatch), deleted (gap), reordered (prevHash link broken), inserted
    (a record of another chain, or beyond the head), invalid (not a well-formed record)."""
    message: str


@dataclass(frozen=True)
class VerifyResult:
    checked: int
    """Records whose links and hashes were recomputed and found right."""
    head_sequence: int
    """Sequence of the last good record (0 for an empty chain)."""
    head_hash: str
    """Hash of the last good record (64 zeros for an empty chain)."""
    chain: str | None
    broken: Break | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def summary(self) -> str:
        if self.broken is None:
            return (
                f"audit chain OK: {self.checked} records checked; head: sequence {self.head_sequence}, "
                f"hash {self.head_hash}"
            )
        b = self.broken
        return (
            f"audit chain BROKEN at record {b.sequence}"
            + (f" (id {b.record_id})" if b.record_id else "")
            # The kind comes first after the colon so scripts can match on it.
            + f": {b.kind}: {b.message}; {self.checked} records before it verified"
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "checked": self.checked,
            "chain": self.chain,
            "headSequence": self.head_sequence,
            "headHash": self.head_hash,
        }
        if self.broken is not None:
            b = self.broken
            out["broken"] = {"sequence": b.sequence, "id": b.record_id, "kind": b.kind, "message": b.message}
        return out


def row_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """The record (wire form) of a database row; `details` is stored as JCS text."""
    details = row["details"]
    return {
        "schema": AUDIT_SCHEMA,
        "id": row["id"],
        "timestamp": row["recorded_at"],
        "chain": row["chain"],
        "sequence": int(row["sequence"]),
        "actor": row["actor"],
        "action": row["action"],
        "target": row["target"],
        "details": json.loads(details) if isinstance(details, str) else details,
        "prevHash": row["prev_hash"],
        "hash": row["hash"],
    }


def _short(h: Any) -> str:
    return f"{h[:12]}..." if isinstance(h, str) and len(h) > 12 else repr(h)


def verify_documents(
    docs: Iterable[Mapping[str, Any] | Exception], head: Head | None = None, *, skip_duplicates: bool = False
) -> VerifyResult:
    """Verify records given in the order they are stored (or were mirrored). An item may be
    an exception standing for a record that could not even be read (e.g. broken JSON).

    `skip_duplicates`: a record equal (same sequence and hash) to one already verified is
    passed over, as the audit topic may carry a record twice (at-least-once mirroring)."""
    seen: dict[int, str] = {}
    expected = 1
    prev_hash = GENESIS_HASH
    chain: str | None = head.chain if head else None
    checked = 0

    def result(broken: Break | None = None) -> VerifyResult:
        return VerifyResult(checked, expected - 1, prev_hash, chain, broken)

    for doc in docs:
        if isinstance(doc, Exception):
            return result(Break(expected, None, "edited", f"cannot be read ({doc}): the record was edited"))
        seq = doc.get("sequence")
        rid = doc.get("id") if isinstance(doc.get("id"), str) else None
        if not isinstance(seq, int) or isinstance(seq, bool):
            return result(Break(expected, rid, "invalid", f"record after {expected - 1} has no integer sequence"))
        if seq > expected:
            missing = f"record {expected}" if seq == expected + 1 else f"records {expected} to {seq - 1}"
            return result(
                Break(expected, None, "deleted", f"{missing} missing: the chain jumps from {expected - 1} to {seq}")
            )
        if seq < expected and skip_duplicates and seen.get(seq) == doc.get("hash"):
            continue
        if seq < expected:
            return result(
                Break(seq, rid, "reordered", f"record {seq} appears again after record {expected - 1} (out of order)")
            )
        if doc.get("prevHash") != prev_hash:
            before = f"record {seq - 1}" if seq > 1 else "the chain start (64 zeros)"
            return result(
                Break(
                    seq,
                    rid,
                    "reordered",
                    f"prevHash {_short(doc.get('prevHash'))} does not match the hash of {before} "
                    f"({_short(prev_hash)}): records were moved, inserted or removed here, or {before} "
                    "was edited and re-hashed",
                )
            )
        body = {k: v for k, v in doc.items() if k != "hash"}
        try:
            content_hash = record_hash(body)
        except (TypeError, ValueError) as e:
            return result(Break(seq, rid, "invalid", f"content cannot be canonicalised: {e}"))
        if content_hash != doc.get("hash"):
            return result(
                Break(
                    seq,
                    rid,
                    "edited",
                    f"hash mismatch: the content hashes to {_short(content_hash)} but the record says "
                    f"{_short(doc.get('hash'))}: the record was edited",
                )
            )
        try:
            record = AuditRecord.model_validate(doc)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            return result(Break(seq, rid, "invalid", f"not a valid audit record: {where}: {first['msg']}"))
        if chain is None:
            chain = record.chain
        elif record.chain != chain:
            return result(
                Break(
                    seq, rid, "inserted", f"belongs to chain {record.chain!r}, not {chain!r}: inserted from elsewhere"
                )
            )
        prev_hash = record.hash
        if skip_duplicates:
            seen[seq] = record.hash
        expected += 1
        checked += 1

    if head is not None:
        last = expected - 1
        if head.sequence > last:
            missing = f"record {expected}" if head.sequence == expected else f"records {expected} to {head.sequence}"
            return result(
                Break(
                    expected,
                    None,
                    "deleted",
                    f"{missing} missing: the chain head says the chain has {head.sequence} records "
                    f"but it ends at {last} (deleted from the end)",
                )
            )
        if head.sequence < last:
            return result(
                Break(head.sequence + 1, None, "inserted", f"records after the chain head ({head.sequence}) were added")
            )
        if head.hash != prev_hash:
            return result(
                Break(
                    last,
                    None,
                    "edited",
                    f"the chain head records hash {_short(head.hash)} for record {last}, which now hashes to "
                    f"{_short(prev_hash)}: record {last} was edited and re-hashed",
                )
            )
    return result()


def verify_chains(docs: Iterable[Mapping[str, Any] | Exception]) -> list[VerifyResult]:
    """Verify a stream that may interleave several chains (the audit topic: the operator's,
    and one per runtime on its own SQLite file), each on its own, in the order the chains
    first appear; duplicates are skipped (at-least-once mirroring). A record without a
    chain id, or a line that cannot be read, is a chain of its own that fails."""
    groups: dict[Any, list[Mapping[str, Any] | Exception]] = {}
    for doc in docs:
        key = doc.get("chain") if isinstance(doc, Mapping) and isinstance(doc.get("chain"), str) else object()
        groups.setdefault(key, []).append(doc)
    return [verify_documents(group, skip_duplicates=True) for group in groups.values()]
