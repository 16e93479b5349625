"""The tool token: one claims definition shared by the runtime (minting) and tool
services (verification), so both sides agree on names, types and limits.

A tool token is a JWT signed with the agent's Ed25519 key (alg EdDSA, header kid = the
key's id in the trust bundle), valid for at most 60 s and scoped to one agent, one tool,
one run and one idempotency key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fleetward.toolkit.jwks import AGENT_PATTERN, MAX_KID_LENGTH

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "fleetward"
MAX_TTL_SECONDS = 60
MAX_LEEWAY_SECONDS = 5
# Far above a real token (~450 bytes); caps the work an unauthenticated caller can cause.
MAX_TOKEN_BYTES = 4096
MAX_CLAIM_LENGTH = 256


@dataclass(frozen=True)
class ToolTokenClaims:
    iss: str
    sub: str  # "<namespace>/<agent>"
    aud: str  # the tool name
    run_id: str
    idempotency_key: str
    jti: str
    iat: int
    exp: int

    def to_payload(self) -> dict[str, Any]:
        return {
            "iss": self.iss,
            "sub": self.sub,
            "aud": self.aud,
            "runId": self.run_id,
            "idempotencyKey": self.idempotency_key,
            "jti": self.jti,
            "iat": self.iat,
            "exp": self.exp,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ToolTokenClaims:
        """Typed claims from a decoded payload; ValueError/TypeError names the missing/bad claim."""
        strings = {}
        for claim in ("iss", "sub", "aud", "runId", "idempotencyKey", "jti"):
            value = payload.get(claim)
            if not isinstance(value, str) or not 0 < len(value) <= MAX_CLAIM_LENGTH:
                raise ValueError(f"claim {claim} must be a string of 1-{MAX_CLAIM_LENGTH} characters")
            strings[claim] = value
        times = {}
        for claim in ("iat", "exp"):
            value = payload.get(claim)
            # bool is an int subclass; a NumericDate is never true/false.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"claim {claim} must be a NumericDate (seconds since the epoch)")
            times[claim] = int(value)
        return cls(
            iss=strings["iss"],
            sub=strings["sub"],
            aud=strings["aud"],
            run_id=strings["runId"],
            idempotency_key=strings["idempotencyKey"],
            jti=strings["jti"],
            iat=times["iat"],
            exp=times["exp"],
        )


def load_private_key(pem: bytes | str) -> Ed25519PrivateKey:
    """An agent's signing key from its PEM (PKCS#8) form, as stored in the agent's Secret."""
    key = load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"agent signing key must be Ed25519, got {type(key).__name__}")
    return key


def _require_text(field: str, value: str, limit: int = MAX_CLAIM_LENGTH) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ValueError(f"{field} must be a non-empty string of at most {limit} characters, got {value!r}")


def mint_tool_token(
    private_key: Ed25519PrivateKey | bytes | str,
    kid: str,
    agent: str,
    tool: str,
    run_id: str,
    idempotency_key: str,
    issuer: str = DEFAULT_ISSUER,
    ttl: int = MAX_TTL_SECONDS,
    *,
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """A signed tool token for one invocation of `tool` by `agent` ("<namespace>/<name>").

    `private_key` is the agent's Ed25519 key (or its PEM). `ttl` is 1-60 seconds.
    `now` and `jti` exist for tests; leave them unset in production.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_SECONDS:
        raise ValueError(f"ttl must be an integer from 1 to {MAX_TTL_SECONDS} seconds, got {ttl!r}")
    _require_text("kid", kid, MAX_KID_LENGTH)
    if not isinstance(agent, str) or not AGENT_PATTERN.match(agent):
        raise ValueError(f"agent must be '<namespace>/<name>' (DNS-1123 labels), got {agent!r}")
    for field, value in (("tool", tool), ("run_id", run_id), ("idempotency_key", idempotency_key), ("issuer", issuer)):
        _require_text(field, value)
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    iat = int(time.time() if now is None else now)
    claims = ToolTokenClaims(
        iss=issuer,
        sub=agent,
        aud=tool,
        run_id=run_id,
        idempotency_key=idempotency_key,
        jti=jti or uuid.uuid4().hex,
        iat=iat,
        exp=iat + ttl,
    )
    return jwt.encode(claims.to_payload(), key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})
