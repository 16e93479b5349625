"""The tool token: one claims definition shared by the runtime (minting) and tool
services (verification), so both sides agree on names, types and limits.

A tool token is a JWT signed with the agent's key (Ed25519, alg EdDSA, as the operator
issues them; P-256, alg ES256, is accepted too, SPEC §3), header kid = the key's id in the
trust bundle, valid for at most 60 s and scoped to one agent, one tool, one run and one
idempotency key. `iat`/`exp` are NumericDates: integers when minted here, any finite
number when verified (the lifetime is checked on the values as given).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fleetward.toolkit.jwks import AGENT_PATTERN, MAX_KID_LENGTH

ALGORITHM = "EdDSA"
"""What `mint_tool_token` signs with for an Ed25519 key (the operator's keys)."""
ALGORITHMS = ("EdDSA", "ES256")
"""What a verifier accepts; each trust-bundle key verifies only its own."""
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
    iat: int | float
    exp: int | float

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
        if not AGENT_PATTERN.match(strings["sub"]):
            raise ValueError(f"claim sub must be the agent as <namespace>/<name>, got {strings['sub']!r}")
        times = {}
        for claim in ("iat", "exp"):
            value = payload.get(claim)
            # bool is an int subclass; a NumericDate is never true/false, nor Infinity or NaN.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"claim {claim} must be a NumericDate (seconds since the epoch)")
            times[claim] = value
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


SigningKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _signing_key(key: object) -> SigningKey:
    if isinstance(key, Ed25519PrivateKey) or (
        isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    raise TypeError(f"agent signing key must be Ed25519 or P-256, got {type(key).__name__}")


def load_private_key(pem: bytes | str) -> SigningKey:
    """An agent's signing key from its PEM (PKCS#8) form, as stored in the agent's Secret."""
    return _signing_key(load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None))


def _require_text(field: str, value: str, limit: int = MAX_CLAIM_LENGTH) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ValueError(f"{field} must be a non-empty string of at most {limit} characters, got {value!r}")


def mint_tool_token(
    private_key: SigningKey | bytes | str,
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

    `private_key` is the agent's Ed25519 key (EdDSA) or P-256 key (ES256), or its PEM. `ttl`
    is 1-60 seconds.
    `now` and `jti` exist for tests; leave them unset in production.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_SECONDS:
        raise ValueError(f"ttl must be an integer from 1 to {MAX_TTL_SECONDS} seconds, got {ttl!r}")
    _require_text("kid", kid, MAX_KID_LENGTH)
    if not isinstance(agent, str) or not AGENT_PATTERN.match(agent):
        raise ValueError(f"agent must be '<namespace>/<name>' (DNS-1123 labels), got {agent!r}")
    for field, value in (("tool", tool), ("run_id", run_id), ("idempotency_key", idempotency_key), ("issuer", issuer)):
        _require_text(field, value)
    key = load_private_key(private_key) if isinstance(private_key, (bytes, str)) else _signing_key(private_key)
    algorithm = ALGORITHM if isinstance(key, Ed25519PrivateKey) else "ES256"
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
    return jwt.encode(claims.to_payload(), key, algorithm=algorithm, headers={"kid": kid, "typ": "JWT"})
