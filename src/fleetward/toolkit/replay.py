"""Remembers the jti of every accepted token until the token could no longer be accepted
anyway (its exp, plus the largest leeway a verifier may use), so a captured token cannot be used twice.

In-memory and per process: a tool service with several replicas detects a replay only on
the replica that saw the first use; the idempotency key still keeps effects single.
Hand-written because it is twenty lines: a dict for lookups, a heap for expiry order.
"""

from __future__ import annotations

import heapq
import threading

DEFAULT_MAX_ENTRIES = 1_000_000  # ~100 MB at most; tokens live <= 65 s, so ~15k tokens/s


class ReplayCacheFull(Exception):
    pass


class ReplayCache:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, jti = heapq.heappop(self._heap)
            self._expiry.pop(jti, None)

    def first_use(self, jti: str, forget_after: float, now: float) -> bool:
        """Record `jti` until `forget_after`; False if it was already recorded.

        Raises ReplayCacheFull rather than forgetting live entries early (that would
        reopen the replay window)."""
        with self._lock:
            self._purge(now)
            if jti in self._expiry:
                return False
            if len(self._expiry) >= self.max_entries:
                raise ReplayCacheFull(f"{len(self._expiry)} live token ids")
            self._expiry[jti] = forget_after
            heapq.heappush(self._heap, (forget_after, jti))
            return True
