"""`AuditLog`: append records to the chain, verify it, read it, mirror it to Kafka."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from fleetward.api.envelopes import AuditRecord, EnvelopeError, canonical_json
from fleetward.audit.mirror import DEFAULT_TOPIC, KafkaMirror
from fleetward.audit.redact import strip_secrets
from fleetward.audit.store import AuditError, Store, open_store
from fleetward.audit.verify import VerifyResult, row_document, verify_documents

log = logging.getLogger("fleetward.audit")

MAX_RECORD_BYTES = 256 * 1024
"""A record must fit a Kafka message with room to spare (the broker default is 1 MiB)."""


def _timestamp() -> str:
    # Fixed layout (UTC, microseconds, Z): the text is what gets hashed.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """The audit chain in one database. Thread-safe; appends from any number of processes
    and replicas serialise in the database. Use `AuditLog.open(dsn)`."""

    def __init__(self, store: Store, mirror: KafkaMirror | None = None, *, mirror_interval: float = 5.0) -> None:
        self.store = store
        self.mirror = mirror
        self.mirror_interval = mirror_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if mirror is not None:
            self._thread = threading.Thread(target=self._mirror_loop, name="audit-mirror", daemon=True)
            self._thread.start()

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        kafka: Mapping[str, Any] | None = None,
        producer: Any = None,
        topic: str = DEFAULT_TOPIC,
        create: bool = True,
        mirror_interval: float = 5.0,
        delivery_timeout: float = 10.0,
    ) -> AuditLog:
        """Open the chain at `dsn` (postgresql://... or sqlite:///PATH).

        `kafka`: librdkafka settings (at least bootstrap.servers), or `producer`: a
        confluent_kafka Producer; with either, records are mirrored to `topic` in the
        background, after their commit. `create=False` opens an
        existing log read-only (for verify/list) and fails when there is none. A mirror
        round that cannot reach Kafka gives up after `delivery_timeout` seconds and is
        retried every `mirror_interval` seconds."""
        store = open_store(dsn, read_only=not create)
        try:
            if create:
                store.setup()
            elif not store.exists():
                raise AuditError(
                    "no audit log in this database: table fw_audit_log does not exist "
                    "(nothing was recorded yet, or the DSN names another database)"
                )
            mirror = (
                KafkaMirror(kafka, topic, delivery_timeout=delivery_timeout, producer=producer)
                if kafka or producer is not None
                else None
            )
        except BaseException:
            store.close()
            raise
        return cls(store, mirror, mirror_interval=mirror_interval)

    # -- writing -----------------------------------------------------------------------------

    def append(self, action: str, actor: str, target: str, details: Mapping[str, Any] | None = None) -> AuditRecord:
        """Append one record and return it (sealed: sequence, prevHash and hash set).

        `details` should come redacted already; credentials are stripped here regardless.
        Raises AuditError naming the field for a bad action, actor, target or details."""
        if details is not None and not isinstance(details, Mapping):
            raise AuditError(f"details: must be a JSON object (a mapping), not {type(details).__name__}")
        clean = strip_secrets(dict(details or {}))
        try:
            size = len(canonical_json(clean))
        except (TypeError, ValueError) as e:
            raise AuditError(f"details: {e}") from None
        if size > MAX_RECORD_BYTES:
            raise AuditError(f"details: {size} bytes, more than {MAX_RECORD_BYTES}; leave bulky values out")
        record_id = str(uuid.uuid4())
        sealed: list[AuditRecord] = []

        def build(chain: str, sequence: int, prev_hash: str) -> Mapping[str, Any]:
            record = AuditRecord.seal(
                id=record_id,
                timestamp=_timestamp(),
                chain=chain,
                sequence=sequence,
                actor=actor,
                action=action,
                target=target,
                details=clean,
                prev_hash=prev_hash,
            )
            sealed.append(record)
            return {
                "sequence": sequence,
                "id": record_id,
                "recorded_at": record.timestamp,
                "chain": chain,
                "actor": actor,
                "action": action,
                "target": target,
                "details": canonical_json(clean).decode("utf-8"),
                "prev_hash": prev_hash,
                "hash": record.hash,
            }

        try:
            self.store.append(build)
        except EnvelopeError as e:
            raise AuditError(str(e).replace("invalid audit record: ", "audit record: ")) from None
        self._wake.set()
        return sealed[-1]

    # -- reading -----------------------------------------------------------------------------

    def verify(self) -> VerifyResult:
        """Recompute the whole chain; the result names the first broken record, if any."""
        with self.store.snapshot() as (head, rows):
            return verify_documents((_document(r) for r in rows), head)

    def records(self, after: int = 0, *, action: str | None = None, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """The stored records (wire form, not verified) with sequence > `after`, in order."""
        while True:
            rows = self.store.rows(after, batch, action)
            for r in rows:
                yield row_document(r)
            if len(rows) < batch:
                return
            after = int(rows[-1]["sequence"])

    # -- mirroring ---------------------------------------------------------------------------

    def mirror_pending(self, batch: int = 500) -> int:
        """Publish records not yet in the audit topic; returns how many went out. Safe to
        call from several processes: one mirrors, the others return 0."""
        mirror = self.mirror
        if mirror is None:
            return 0
        total = 0
        while True:
            n = self.store.mirror_batch(
                mirror.topic, batch, lambda rows: mirror.publish([row_document(r) for r in rows])
            )
            total += n
            if n < batch:
                return total

    def mirrored_up_to(self) -> int:
        """The last sequence known to be in the audit topic."""
        return self.store.mirrored_up_to(self.mirror.topic if self.mirror else DEFAULT_TOPIC)

    def _mirror_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.mirror_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.mirror_pending()
            except Exception as e:  # the database or Kafka is away: the next round retries
                log.warning("audit mirror round failed: %s", e)

    def close(self) -> None:
        """Stop the mirror (after one last round) and close the database connections."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=30)
            try:
                self.mirror_pending()
            except Exception as e:
                log.warning("audit mirror: final round failed (the records stay queued in the database): %s", e)
            self.mirror.close()  # type: ignore[union-attr]
        self.store.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _document(row: Any) -> dict[str, Any] | Exception:
    try:
        return row_document(row)
    except (ValueError, TypeError, KeyError) as e:  # e.g. details no longer JSON after an edit
        return ValueError(f"record {row['sequence']}: {e}")
