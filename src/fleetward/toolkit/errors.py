"""Why a tool token was refused: one stable reason per failure, for logs, metrics and the
401/403/503 body a caller sees. Messages never contain the token itself."""

from __future__ import annotations

from enum import StrEnum


class RefusalReason(StrEnum):
    MISSING_TOKEN = "missing_token"
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    BAD_ALGORITHM = "bad_algorithm"
    MISSING_KID = "missing_kid"
    UNKNOWN_KEY = "unknown_key"
    REVOKED = "revoked"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_SUBJECT = "wrong_subject"
    MISSING_CLAIM = "missing_claim"
    TTL_TOO_LONG = "ttl_too_long"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    IDEMPOTENCY_KEY_MISMATCH = "idempotency_key_mismatch"
    TRUST_BUNDLE_UNAVAILABLE = "trust_bundle_unavailable"
    REPLAY_CACHE_FULL = "replay_cache_full"


# 403: a valid credential, but not for this request. 503: we cannot decide right now
# (fail closed); the caller may retry. Everything else is 401 (RFC 6750 invalid_token).
_FORBIDDEN = {RefusalReason.WRONG_AUDIENCE, RefusalReason.IDEMPOTENCY_KEY_MISMATCH}
_UNAVAILABLE = {RefusalReason.TRUST_BUNDLE_UNAVAILABLE, RefusalReason.REPLAY_CACHE_FULL}


class TokenRefused(Exception):
    """A tool token was not accepted. `reason` is stable; `detail` is for humans."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def http_status(self) -> int:
        if self.reason in _FORBIDDEN:
            return 403
        if self.reason in _UNAVAILABLE:
            return 503
        return 401
