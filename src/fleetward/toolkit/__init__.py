"""fleetward.toolkit: what a tool service needs to trust Fleetward agents.

Every tool call of an agent carries a short-lived JWT (the tool token) signed with the
agent's Ed25519 key (ES256 keys are verified too); the public keys of all active agents are
published in the trust bundle (ConfigMap `fleetward-trust-bundle`, key `jwks.json`; its
entry format is in fleetward.toolkit.jwks). A tool service verifies
each call against that bundle, which it watches, so a revoked key is refused at once;
it also watches the KillSwitches and refuses the keys an engaged one covers as soon as the
switch arrives (fleetward.toolkit.killswitches).

    from fleetward.toolkit import TrustBundle, ToolTokenVerifier, TokenRefused

    bundle = TrustBundle.from_configmap("fleetward-system").start()
    verifier = ToolTokenVerifier(bundle, issuer="fleetward")
    try:
        call = verifier.verify_authorization(request_headers.get("Authorization"), "issue_refund",
                                             request_headers.get("Idempotency-Key"))
    except TokenRefused as refused:
        ...  # refused.http_status, refused.reason (stable), refused.detail
    call.agent, call.run_id, call.idempotency_key

aiohttp services: fleetward.toolkit.web (verify_request, refusal_response).
The runtime side: fleetward.toolkit.tokens.mint_tool_token.
"""

from fleetward.toolkit.bundle import BundleChange, TrustBundle
from fleetward.toolkit.errors import RefusalReason, TokenRefused
from fleetward.toolkit.idempotency import IdempotencyConflict, IdempotencyStore
from fleetward.toolkit.jwks import TrustedKey, jwks_document, parse_jwks, public_jwk
from fleetward.toolkit.tokens import ToolTokenClaims, mint_tool_token
from fleetward.toolkit.verify import ToolTokenVerifier, VerifiedCall

__all__ = [
    "BundleChange",
    "IdempotencyConflict",
    "IdempotencyStore",
    "RefusalReason",
    "TokenRefused",
    "ToolTokenClaims",
    "ToolTokenVerifier",
    "TrustBundle",
    "TrustedKey",
    "VerifiedCall",
    "jwks_document",
    "mint_tool_token",
    "parse_jwks",
    "public_jwk",
]
