"""Tool tokens: minting (runtime side) and verification (tool side) against a trust bundle."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fleetward.toolkit import RefusalReason, TokenRefused, ToolTokenVerifier, TrustBundle, mint_tool_token
from fleetward.toolkit.jwks import jwks_document, parse_jwks, public_jwk
from fleetward.toolkit.replay import ReplayCache
from fleetward.toolkit.tokens import MAX_TOKEN_BYTES

BILLING, ACCOUNT = "githouse/billing", "githouse/account-security"
BILLING_KID, ACCOUNT_KID = "billing-20250101-a1", "account-security-20250101-b2"


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {BILLING_KID: Ed25519PrivateKey.generate(), ACCOUNT_KID: Ed25519PrivateKey.generate()}


@pytest.fixture
def bundle(keys) -> TrustBundle:
    return TrustBundle.from_jwks(
        jwks_document(
            [
                public_jwk(keys[BILLING_KID].public_key(), BILLING_KID, BILLING),
                public_jwk(keys[ACCOUNT_KID].public_key(), ACCOUNT_KID, ACCOUNT),
            ]
        )
    )


@pytest.fixture
def verifier(bundle) -> ToolTokenVerifier:
    return ToolTokenVerifier(bundle, issuer="fleetward")


def mint(keys, tool="issue_refund", *, kid=BILLING_KID, agent=BILLING, **kw) -> str:
    return mint_tool_token(
        keys[kid], kid, agent, tool, kw.pop("run_id", "run-1"), kw.pop("idempotency_key", "idem-1"), **kw
    )


def b64(obj: dict | bytes) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(now: float | None = None, **over) -> dict:
    iat = int(time.time() if now is None else now)
    return {
        "iss": "fleetward",
        "sub": BILLING,
        "aud": "issue_refund",
        "runId": "run-1",
        "idempotencyKey": "idem-1",
        "jti": f"jti-{time.monotonic_ns()}",
        "iat": iat,
        "exp": iat + 60,
        **over,
    }


def refused(verifier: ToolTokenVerifier, token: str, audience: str = "issue_refund", **kw) -> TokenRefused:
    with pytest.raises(TokenRefused) as err:
        verifier.verify(token, audience, **kw)
    return err.value


def test_a_valid_token_is_accepted_with_its_claims(keys, verifier):
    call = verifier.verify(mint(keys, run_id="run-42", idempotency_key="refund-txn_1001"), "issue_refund")
    assert (call.agent, call.tool, call.run_id, call.idempotency_key, call.kid) == (
        BILLING,
        "issue_refund",
        "run-42",
        "refund-txn_1001",
        BILLING_KID,
    )
    assert call.claims.exp - call.claims.iat == 60
    header = jwt.get_unverified_header(mint(keys))
    assert header == {"alg": "EdDSA", "kid": BILLING_KID, "typ": "JWT"}


def test_the_private_key_may_be_given_as_pem(keys, verifier):
    pem = keys[BILLING_KID].private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    token = mint_tool_token(pem, BILLING_KID, BILLING, "issue_refund", "run-1", "idem-1")
    assert verifier.verify(token, "issue_refund").agent == BILLING


def test_expired_tokens_are_refused_with_no_leeway(keys, verifier):
    assert refused(verifier, mint(keys, now=time.time() - 120)).reason == RefusalReason.EXPIRED
    assert refused(verifier, mint(keys, now=time.time() - 67, ttl=60)).reason == RefusalReason.EXPIRED
    # expired 1 s ago: refused, although the verifier tolerates 5 s of skew on iat
    assert refused(verifier, mint(keys, now=time.time() - 61, ttl=60)).reason == RefusalReason.EXPIRED
    assert verifier.verify(mint(keys, now=time.time() - 55, ttl=60), "issue_refund").agent == BILLING


def test_tokens_issued_in_the_future_are_not_yet_valid(keys, verifier):
    assert refused(verifier, mint(keys, now=time.time() + 30)).reason == RefusalReason.NOT_YET_VALID
    assert verifier.verify(mint(keys, now=time.time() + 2), "issue_refund").agent == BILLING  # clock skew


def test_a_token_for_another_tool_is_forbidden(keys, verifier):
    err = refused(verifier, mint(keys, tool="verify_transaction"), "issue_refund")
    assert err.reason == RefusalReason.WRONG_AUDIENCE and err.http_status == 403


def test_a_token_of_another_installation_is_refused(keys, verifier):
    assert refused(verifier, mint(keys, issuer="other-install")).reason == RefusalReason.WRONG_ISSUER


def test_sub_must_be_the_agent_that_owns_the_key(keys, verifier):
    # billing's key signing a token that claims to be account-security
    err = refused(verifier, mint(keys, "reset_2fa", kid=BILLING_KID, agent=ACCOUNT), "reset_2fa")
    assert err.reason == RefusalReason.WRONG_SUBJECT and err.http_status == 401


def test_a_token_signed_by_another_agents_key_under_my_kid_has_a_bad_signature(keys, verifier):
    forged = jwt.encode(claims(), keys[ACCOUNT_KID], algorithm="EdDSA", headers={"kid": BILLING_KID})
    assert refused(verifier, forged).reason == RefusalReason.BAD_SIGNATURE


def test_unknown_kid_and_missing_kid(keys, verifier):
    stranger = Ed25519PrivateKey.generate()
    token = mint_tool_token(stranger, "stranger-1", BILLING, "issue_refund", "run-1", "idem-1")
    assert refused(verifier, token).reason == RefusalReason.UNKNOWN_KEY
    no_kid = jwt.encode(claims(), keys[BILLING_KID], algorithm="EdDSA")
    assert refused(verifier, no_kid).reason == RefusalReason.MISSING_KID


def test_a_key_removed_from_the_bundle_is_refused_at_once_even_for_unexpired_tokens(keys, bundle, verifier):
    changes = []
    bundle.on_change(changes.append)
    token = mint(keys)
    bundle.load(jwks_document([public_jwk(keys[ACCOUNT_KID].public_key(), ACCOUNT_KID, ACCOUNT)]))
    assert refused(verifier, token).reason == RefusalReason.REVOKED
    assert changes[-1].removed == {BILLING_KID} and changes[-1].added == frozenset()
    # the other agent is untouched
    assert verifier.verify(mint(keys, "reset_2fa", kid=ACCOUNT_KID, agent=ACCOUNT), "reset_2fa").agent == ACCOUNT


def test_a_token_is_accepted_once(keys, verifier):
    token = mint(keys)
    verifier.verify(token, "issue_refund")
    err = refused(verifier, token)
    assert err.reason == RefusalReason.REPLAYED and err.http_status == 401


def test_a_refused_check_does_not_burn_the_token_id(keys, verifier):
    token = mint(keys, idempotency_key="idem-1")
    err = refused(verifier, token, idempotency_key="idem-2")
    assert err.reason == RefusalReason.IDEMPOTENCY_KEY_MISMATCH and err.http_status == 403
    assert verifier.verify(token, "issue_refund", idempotency_key="idem-1").idempotency_key == "idem-1"


def test_replay_entries_are_forgotten_after_expiry_and_the_cache_is_bounded():
    cache = ReplayCache(max_entries=2)
    assert cache.first_use("a", forget_after=100, now=0)
    assert not cache.first_use("a", forget_after=100, now=50)
    assert cache.first_use("b", forget_after=100, now=50)
    with pytest.raises(Exception, match="live token ids"):
        cache.first_use("c", forget_after=100, now=60)
    assert cache.first_use("a", forget_after=300, now=101)  # "a" and "b" expired
    assert len(cache) == 1


def test_alg_none_is_refused(keys, verifier):
    token = f"{b64({'alg': 'none', 'kid': BILLING_KID})}.{b64(claims())}."
    assert refused(verifier, token).reason == RefusalReason.BAD_ALGORITHM


@pytest.mark.parametrize("secret", ["raw", "pem"])
def test_hs256_signed_with_the_public_key_is_refused(keys, verifier, secret):
    public = keys[BILLING_KID].public_key()
    material = (
        public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        if secret == "raw"
        else public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = f"{b64({'alg': 'HS256', 'kid': BILLING_KID, 'typ': 'JWT'})}.{b64(claims())}"
    signature = hmac.new(material, signing_input.encode(), hashlib.sha256).digest()
    assert refused(verifier, f"{signing_input}.{b64(signature)}").reason == RefusalReason.BAD_ALGORITHM


def test_rs256_and_other_algorithms_are_refused(keys, verifier):
    token = f"{b64({'alg': 'RS256', 'kid': BILLING_KID})}.{b64(claims())}.{b64(b'x' * 256)}"
    assert refused(verifier, token).reason == RefusalReason.BAD_ALGORITHM


def test_ttl_over_60_seconds_is_refused_at_mint_and_at_verify(keys, verifier):
    for ttl in (61, 3600, 0, -1):
        with pytest.raises(ValueError, match="ttl must be an integer from 1 to 60"):
            mint(keys, ttl=ttl)
    now = int(time.time())
    long_lived = jwt.encode(
        claims(now, exp=now + 61), keys[BILLING_KID], algorithm="EdDSA", headers={"kid": BILLING_KID}
    )
    assert refused(verifier, long_lived).reason == RefusalReason.TTL_TOO_LONG


def test_mint_rejects_bad_input_naming_the_field(keys):
    with pytest.raises(ValueError, match="agent must be '<namespace>/<name>'"):
        mint(keys, agent="billing")
    with pytest.raises(ValueError, match="run_id must be a non-empty string"):
        mint(keys, run_id="")
    with pytest.raises(ValueError, match="kid must be a non-empty string"):
        mint_tool_token(keys[BILLING_KID], "", BILLING, "t", "r", "i")


def test_a_tampered_payload_breaks_the_signature(keys, verifier):
    header, payload, signature = mint(keys, tool="verify_transaction").split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["aud"] = "issue_refund"
    assert refused(verifier, f"{header}.{b64(body)}.{signature}").reason == RefusalReason.BAD_SIGNATURE


def test_oversized_tokens_are_refused_before_any_parsing(keys, verifier):
    big = jwt.encode(
        claims(pad="x" * MAX_TOKEN_BYTES), keys[BILLING_KID], algorithm="EdDSA", headers={"kid": BILLING_KID}
    )
    assert refused(verifier, big).reason == RefusalReason.OVERSIZED


def test_malformed_tokens_and_missing_claims(keys, verifier):
    assert refused(verifier, "not-a-jwt").reason == RefusalReason.MALFORMED
    assert refused(verifier, "").reason == RefusalReason.MISSING_TOKEN
    for claim in ("runId", "idempotencyKey", "jti", "exp"):
        body = claims()
        del body[claim]
        token = jwt.encode(body, keys[BILLING_KID], algorithm="EdDSA", headers={"kid": BILLING_KID})
        err = refused(verifier, token)
        assert err.reason == RefusalReason.MISSING_CLAIM and claim in err.detail
    crit = jwt.encode(claims(), keys[BILLING_KID], algorithm="EdDSA", headers={"kid": BILLING_KID, "crit": ["exp"]})
    assert refused(verifier, crit).reason == RefusalReason.MALFORMED


def test_key_location_headers_are_never_followed(keys, verifier):
    """jku/x5u/jwk in the header must not make the verifier trust or fetch anything."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/jwks.json"
    attacker = Ed25519PrivateKey.generate()
    attacker_jwk = public_jwk(attacker.public_key(), "attacker-1", BILLING)
    try:
        for kid in ("attacker-1", BILLING_KID):
            token = jwt.encode(
                claims(), attacker, algorithm="EdDSA", headers={"kid": kid, "jku": url, "x5u": url, "jwk": attacker_jwk}
            )
            expected = RefusalReason.UNKNOWN_KEY if kid == "attacker-1" else RefusalReason.BAD_SIGNATURE
            assert refused(verifier, token).reason == expected
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_authorization_header_parsing(keys, verifier):
    assert verifier.verify_authorization(f"Bearer {mint(keys)}", "issue_refund").agent == BILLING
    with pytest.raises(TokenRefused) as err:
        verifier.verify_authorization(None, "issue_refund")
    assert err.value.reason == RefusalReason.MISSING_TOKEN
    with pytest.raises(TokenRefused) as err:
        verifier.verify_authorization(f"Basic {mint(keys)}", "issue_refund")
    assert err.value.reason == RefusalReason.MALFORMED


def test_refusal_messages_never_contain_the_token(keys, verifier):
    garbage = f"{b64(b'{not json' * 8)}.{b64(claims())}.{b64(b'signature' * 8)}"
    for token in (mint(keys, now=time.time() - 300), mint(keys, tool="x"), mint(keys, issuer="y"), garbage):
        err = refused(verifier, token)
        assert not any(part in str(err) for part in token.split(".")), str(err)


def test_verifier_settings_are_bounded(bundle):
    with pytest.raises(ValueError, match="leeway must be 0-5 seconds"):
        ToolTokenVerifier(bundle, leeway=30)
    with pytest.raises(ValueError, match="issuer"):
        ToolTokenVerifier(bundle, issuer="")


# -- bundles written by hand, ES256 and odd NumericDates (SPEC §3: "Ed25519 or ES256") --------


def test_a_plain_jwks_entry_is_trusted_and_binds_by_the_operators_kid_form():
    """A JWKS written by hand has no `agent` member. With the operator's kid form
    (<namespace>.<agent>.<id>) the key is bound to that agent; otherwise to none."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def plain(key: Ed25519PublicKey, kid: str) -> dict:
        x = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64(x), "kid": kid}

    bound, loose = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    bound_kid, loose_kid = "githouse.billing.k7f3", "test-key-1"
    verifier = ToolTokenVerifier(
        TrustBundle.from_jwks(
            json.dumps({"keys": [plain(bound.public_key(), bound_kid), plain(loose.public_key(), loose_kid)]})
        )
    )
    ok = verifier.verify(mint_tool_token(bound, bound_kid, BILLING, "issue_refund", "run-1", "i-1"), "issue_refund")
    assert ok.agent == BILLING and ok.kid == bound_kid
    assert refused(verifier, mint_tool_token(bound, bound_kid, ACCOUNT, "issue_refund", "run-1", "i-2")).reason == (
        RefusalReason.WRONG_SUBJECT
    )
    anyone = mint_tool_token(loose, loose_kid, ACCOUNT, "issue_refund", "run-1", "i-3")
    assert verifier.verify(anyone, "issue_refund").agent == ACCOUNT


def test_es256_keys_verify_es256_tokens_only():
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    entry = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
        "kid": "githouse.billing.ec1",
        "agent": BILLING,
    }
    verifier = ToolTokenVerifier(TrustBundle.from_jwks(json.dumps({"keys": [entry]})))
    token = mint_tool_token(key, "githouse.billing.ec1", BILLING, "issue_refund", "run-1", "i-1")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert verifier.verify(token, "issue_refund").agent == BILLING
    # the key fixes the algorithm: an EdDSA header under this kid is refused before any signature check
    _, _, signature = token.split(".")
    header = b64({"alg": "EdDSA", "kid": "githouse.billing.ec1", "typ": "JWT"})
    relabelled = f"{header}.{token.split('.')[1]}.{signature}"
    assert refused(verifier, relabelled).reason == RefusalReason.BAD_ALGORITHM
    # a point that is not on the curve is no key at all
    off_curve = {**entry, "kid": "bad", "y": b64((numbers.y ^ 1).to_bytes(32, "big"))}
    parsed = parse_jwks({"keys": [off_curve]})
    assert not parsed.keys and "not a point on the P-256 curve" in parsed.problems[0]


@pytest.mark.parametrize(
    ("over", "reason", "words"),
    [
        ({"exp": float("inf")}, RefusalReason.MISSING_CLAIM, "exp must be a NumericDate"),
        ({"nbf": float("nan")}, RefusalReason.MALFORMED, "nbf must be a NumericDate"),
        ({"aud": ["issue_refund"]}, RefusalReason.MALFORMED, "aud must be the tool's name (a string), not a list"),
        ({"sub": "billing"}, RefusalReason.MISSING_CLAIM, "claim sub must be the agent as <namespace>/<name>"),
    ],
)
def test_odd_claims_are_refused_with_their_own_reason(keys, verifier, over, reason, words):
    # Python's JSON writes and reads Infinity/NaN; a verifier must refuse them, not crash (it was a 500)
    token = jwt.encode(claims(**over), keys[BILLING_KID], algorithm="EdDSA", headers={"kid": BILLING_KID})
    err = refused(verifier, token)
    assert err.reason == reason and words in err.detail


def test_nbf_in_the_future_says_so_and_a_fractional_lifetime_over_60_s_is_too_long(keys, verifier):
    now = time.time()
    token = jwt.encode(
        claims(now, nbf=int(now) + 30), keys[BILLING_KID], algorithm="EdDSA", headers={"kid": BILLING_KID}
    )
    err = refused(verifier, token)
    assert err.reason == RefusalReason.NOT_YET_VALID and "(nbf)" in err.detail
    iat = now - 1
    long = claims(now, iat=iat, exp=iat + 60.5)
    token = jwt.encode(long, keys[BILLING_KID], algorithm="EdDSA", headers={"kid": BILLING_KID})
    assert refused(verifier, token).reason == RefusalReason.TTL_TOO_LONG
