"""The request log of the LLM stand-in: what reached "the model", for tests to assert on.

Credentials are never stored in clear: Authorization-like header values are kept as a sha256
prefix (see `fingerprint`), enough to tell which key was used and nothing more.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"})
FINGERPRINT_HEX_CHARS = 16


def fingerprint(secret: str) -> str:
    """How a secret appears in the log: `sha256:` and the first 16 hex digits of its SHA-256."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:FINGERPRINT_HEX_CHARS]


def redact_header(name: str, value: str) -> str:
    if name.lower() not in SECRET_HEADERS:
        return value
    scheme, space, credential = value.partition(" ")
    if name.lower().endswith("authorization") and space and credential:
        return f"{scheme} {fingerprint(credential.strip())}"  # keep the scheme: "Bearer sha256:…"
    return fingerprint(value)


class Recorder:
    """Every request, in arrival order; a record is visible (outcome "pending") as soon as the request
    arrives, so a test can wait for a request to be in flight before aborting it."""

    def __init__(self, path: Path | str | None = None):
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._seq = 0
        # open for the recorder's life, closed by close()
        self._file: IO[str] | None = Path(path).open("a", encoding="utf-8") if path else None  # noqa: SIM115

    def begin(self, method: str, path: str, headers: Mapping[str, str], raw_body: bytes) -> dict[str, Any]:
        try:
            body: Any = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body.decode("utf-8", errors="replace")
        with self._lock:
            self._seq += 1
            record = {
                "seq": self._seq,
                "receivedAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "method": method,
                "path": path,
                "headers": {name.lower(): redact_header(name, value) for name, value in headers.items()},
                "body": body,
                "model": body.get("model") if isinstance(body, dict) else None,
                "stream": bool(body.get("stream")) if isinstance(body, dict) else False,
                "rule": None,
                "status": None,
                "outcome": "pending",
                "durationMs": None,
                "response": None,
                "_started": time.monotonic(),
            }
            self._records.append(record)
        return record

    def note_rule(self, record: dict[str, Any], index: int, name: str | None) -> None:
        with self._lock:
            record["rule"] = {"index": index, "name": name}

    def finish(self, record: dict[str, Any], status: int | None, outcome: str, response: Any = None) -> None:
        with self._lock:
            record.update(
                status=status,
                outcome=outcome,
                response=response,
                durationMs=round((time.monotonic() - record["_started"]) * 1000, 1),
            )
            if self._file is not None:
                self._file.write(json.dumps(_public(record), ensure_ascii=False) + "\n")
                self._file.flush()

    def list(
        self, model: str | None = None, rule: str | None = None, outcome: str | None = None
    ) -> list[dict[str, Any]]:
        """Copies of the records, oldest first; filters compare the model, the rule name, the outcome."""
        with self._lock:
            return [
                _public(r)
                for r in self._records
                if (model is None or r["model"] == model)
                and (rule is None or (r["rule"] or {}).get("name") == rule)
                and (outcome is None or r["outcome"] == outcome)
            ]

    def clear(self) -> int:
        with self._lock:
            count = len(self._records)
            self._records.clear()
            return count

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in record.items() if not k.startswith("_")})
