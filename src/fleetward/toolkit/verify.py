"""Verification of tool tokens against the trust bundle.

Order of checks (each refusal has its own reason, see errors.RefusalReason):
size -> header (alg EdDSA or ES256, kid present; jku/x5u/jwk members are ignored, never
fetched) -> key lookup (unknown/revoked/bundle unavailable) -> the key's own algorithm
(an Ed25519 key verifies EdDSA only, a P-256 key ES256 only, whatever the header says) ->
signature -> claims (iss, aud, sub == the key's agent, lifetime <= 60 s, iat/nbf with
leeway <= 5 s, exp with none, runId, idempotencyKey) -> jti replay. The jti is recorded
only when everything else passed, so a forged or misdirected token cannot burn a
legitimate token's id.

Time claims are checked here rather than by PyJWT so that each failure gets its own
reason and tests can inject a clock; PyJWT does the JOSE parsing and the signature.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from fleetward.toolkit.bundle import TrustBundle
from fleetward.toolkit.errors import RefusalReason, TokenRefused
from fleetward.toolkit.replay import ReplayCache, ReplayCacheFull
from fleetward.toolkit.tokens import (
    ALGORITHMS,
    DEFAULT_ISSUER,
    MAX_LEEWAY_SECONDS,
    MAX_TOKEN_BYTES,
    MAX_TTL_SECONDS,
    ToolTokenClaims,
)

# Only the signature is verified by PyJWT; every claim is checked below.
_DECODE_OPTIONS = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_iat": False,
    "verify_nbf": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}


@dataclass(frozen=True)
class VerifiedCall:
    """A tool invocation whose token passed every check."""

    claims: ToolTokenClaims
    kid: str

    @property
    def agent(self) -> str:
        return self.claims.sub

    @property
    def tool(self) -> str:
        return self.claims.aud

    @property
    def run_id(self) -> str:
        return self.claims.run_id

    @property
    def idempotency_key(self) -> str:
        return self.claims.idempotency_key


class ToolTokenVerifier:
    """Verifies the tool tokens an agent runtime sends (SPEC §6) for one tool service:
    signature by a key of the trust bundle, `aud` = the tool's own name, `iss` = the
    installation, lifetime and expiry, `sub` = the key's agent, jti not seen before.
    `verify_authorization` takes the Authorization header value; both raise TokenRefused
    (its `reason` is stable, its `http_status` is what to answer) or return a VerifiedCall."""

    def __init__(
        self,
        bundle: TrustBundle,
        *,
        issuer: str = DEFAULT_ISSUER,
        leeway: float = MAX_LEEWAY_SECONDS,
        replay_cache: ReplayCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= leeway <= MAX_LEEWAY_SECONDS:
            raise ValueError(f"leeway must be 0-{MAX_LEEWAY_SECONDS} seconds, got {leeway}")
        if not issuer:
            raise ValueError("issuer (the Fleetward installation id) must not be empty")
        self.bundle = bundle
        self.issuer = issuer
        self.leeway = leeway
        self.replay_cache = replay_cache or ReplayCache()
        self._clock = clock

    def verify_authorization(
        self, authorization: str | None, audience: str, idempotency_key: str | None = None
    ) -> VerifiedCall:
        """Verify an `Authorization: Bearer <token>` header value for the tool `audience`.
        `idempotency_key` is the request's Idempotency-Key header, if it has one: it must
        match the token's idempotencyKey claim."""
        if not authorization:
            raise TokenRefused(RefusalReason.MISSING_TOKEN, "no Authorization header")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenRefused(RefusalReason.MALFORMED, "Authorization must be 'Bearer <token>'")
        return self.verify(token.strip(), audience, idempotency_key=idempotency_key)

    def verify(self, token: str, audience: str, *, idempotency_key: str | None = None) -> VerifiedCall:
        if not token:
            raise TokenRefused(RefusalReason.MISSING_TOKEN, "empty token")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRefused(RefusalReason.OVERSIZED, f"token longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise TokenRefused(RefusalReason.MALFORMED, f"not a JWS: {e}") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRefused(
                RefusalReason.BAD_ALGORITHM, f"alg {alg!r} is not accepted, only {' or '.join(ALGORITHMS)}"
            )
        if "crit" in header:
            raise TokenRefused(RefusalReason.MALFORMED, "critical header extensions are not supported")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRefused(RefusalReason.MISSING_KID, "header has no kid")
        key = self.bundle.lookup(kid)
        if alg != key.algorithm:  # the key fixes the algorithm, never the token's header
            raise TokenRefused(
                RefusalReason.BAD_ALGORITHM, f"key {kid!r} is a {key.algorithm} key; the token says {alg}"
            )
        try:
            payload = jwt.decode(token, key.public_key, algorithms=[key.algorithm], options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise TokenRefused(RefusalReason.BAD_SIGNATURE, f"signature does not verify with key {kid!r}") from None
        except jwt.InvalidTokenError as e:
            raise TokenRefused(RefusalReason.MALFORMED, f"undecodable token: {e}") from None
        if isinstance(aud := payload.get("aud"), list):
            raise TokenRefused(
                RefusalReason.MALFORMED, f"aud must be the tool's name (a string), not a list of {len(aud)}"
            )
        try:
            claims = ToolTokenClaims.from_payload(payload)
        except (ValueError, TypeError) as e:
            raise TokenRefused(RefusalReason.MISSING_CLAIM, str(e)) from None
        now = self._clock()  # one reading for every check, so they agree on what "now" is
        self._check_claims(claims, payload.get("nbf"), key.agent, audience, idempotency_key, now)
        try:
            # Remembered past exp by the largest leeway any verifier may use: a clock that
            # steps back must not make a forgotten id usable again.
            first = self.replay_cache.first_use(claims.jti, claims.exp + MAX_LEEWAY_SECONDS, now)
        except ReplayCacheFull as e:
            raise TokenRefused(
                RefusalReason.REPLAY_CACHE_FULL, f"replay cache full ({e}); refusing until entries expire"
            ) from None
        if not first:
            raise TokenRefused(RefusalReason.REPLAYED, f"token id {claims.jti!r} was already used")
        return VerifiedCall(claims=claims, kid=kid)

    def _check_claims(
        self,
        claims: ToolTokenClaims,
        nbf: object,
        key_agent: str | None,
        audience: str,
        idempotency_key: str | None,
        now: float,
    ) -> None:
        if claims.iss != self.issuer:
            raise TokenRefused(
                RefusalReason.WRONG_ISSUER, f"iss {claims.iss!r} is not this installation ({self.issuer!r})"
            )
        if claims.aud != audience:
            raise TokenRefused(RefusalReason.WRONG_AUDIENCE, f"token is for tool {claims.aud!r}, not {audience!r}")
        if key_agent is not None and claims.sub != key_agent:
            raise TokenRefused(RefusalReason.WRONG_SUBJECT, f"sub {claims.sub!r} is not the key owner {key_agent!r}")
        if claims.exp <= claims.iat:
            raise TokenRefused(RefusalReason.MALFORMED, "exp must be after iat")
        if claims.exp - claims.iat > MAX_TTL_SECONDS:
            raise TokenRefused(
                RefusalReason.TTL_TOO_LONG, f"lifetime {claims.exp - claims.iat} s exceeds {MAX_TTL_SECONDS} s"
            )
        if nbf is not None and (isinstance(nbf, bool) or not isinstance(nbf, (int, float)) or not math.isfinite(nbf)):
            raise TokenRefused(RefusalReason.MALFORMED, "nbf must be a NumericDate")
        if claims.iat > now + self.leeway:
            raise TokenRefused(RefusalReason.NOT_YET_VALID, f"issued {claims.iat - now:.0f} s in the future")
        if nbf is not None and nbf > now + self.leeway:
            raise TokenRefused(RefusalReason.NOT_YET_VALID, f"not valid before {nbf - now:.0f} s from now (nbf)")
        # No leeway on expiry: a token is minted for one call just before it is made, with
        # up to 60 s to live, so a few seconds of clock skew never expire a fresh one; a
        # leeway here would only stretch a captured token's life past its stated exp.
        if claims.exp <= now:
            raise TokenRefused(RefusalReason.EXPIRED, f"expired {now - claims.exp:.0f} s ago")
        if idempotency_key is not None and idempotency_key != claims.idempotency_key:
            raise TokenRefused(
                RefusalReason.IDEMPOTENCY_KEY_MISMATCH,
                "Idempotency-Key header differs from the token's idempotencyKey claim",
            )
