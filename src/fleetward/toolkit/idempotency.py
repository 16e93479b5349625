"""Idempotency-Key handling for mutating tools: the first successful response under a key
is stored with a fingerprint of the arguments; a repeat with the same arguments gets the
stored response without the effect being applied again, a repeat with other arguments is
a conflict (409).

Only successful responses are stored: a refused or failed call applied nothing, so
running it again under the same key is safe (and lets a retry succeed once a
precondition is met). In-memory and per process, kept `ttl` seconds (24 h by default);
a replicated tool service needs a shared store with the same interface.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any
    fingerprint: str
    stored_at: float


class IdempotencyConflict(Exception):
    """The key was already used with different arguments."""


def fingerprint(arguments: Any) -> str:
    """Arguments in canonical JSON form, hashed: equal JSON means equal fingerprint."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    def __init__(
        self, ttl: float = 24 * 3600, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, ...], StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def _purge(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.stored_at <= self.ttl and len(self._entries) <= self.max_entries:
                break
            self._entries.popitem(last=False)

    def lookup(self, scope: tuple[str, ...], key: str, arguments_fingerprint: str) -> StoredResponse | None:
        """The stored response for (scope, key), None if there is none; IdempotencyConflict
        when it was stored for different arguments."""
        with self._lock:
            self._purge(self._clock())
            stored = self._entries.get((*scope, key))
        if stored is not None and stored.fingerprint != arguments_fingerprint:
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with different arguments")
        return stored

    def store(self, scope: tuple[str, ...], key: str, arguments_fingerprint: str, status: int, body: Any) -> None:
        with self._lock:
            self._entries[(*scope, key)] = StoredResponse(status, body, arguments_fingerprint, self._clock())
            self._purge(self._clock())

    def __len__(self) -> int:
        return len(self._entries)
