"""The adversarial token suite at the real gateway's handshake (SPEC §5.1): every forged,
expired, misdirected or misplaced token is refused with the documented status, the valid ones
pass through each allowed placement, and no token (nor any part of one) reaches the logs."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm
from websockets.exceptions import InvalidStatus

from fleetward.devcluster.layout import REPO
from fleetward.devcluster.services import Kafka
from tests.gateway_support import AUDIENCE, ISSUER, GatewayProcess, Topics, mint

SECRET = "auth-test-secret-0123456789-abcdefghij"
KEYS = REPO / "gateway-rs" / "tests" / "keys"
SESSION = "auth-s1"

# Every token handed to a gateway in this module, to look for in its logs afterwards.
USED: list[str] = []


def private(name: str):
    return serialization.load_pem_private_key((KEYS / name).read_bytes(), password=None)


@pytest.fixture(scope="module")
def topics(kafka: Kafka) -> Topics:
    t = Topics()
    t.create(kafka.bootstrap, ["support/router"])
    return t


@pytest.fixture(scope="module")
def hs_gw(kafka: Kafka, topics: Topics, tmp_path_factory) -> Iterator[GatewayProcess]:
    g = GatewayProcess(
        kafka.bootstrap, topics, SECRET, tmp_path_factory.mktemp("hs") / "gw.log", instance="gw-hs"
    ).start()
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture(scope="module")
def jwks_gw(kafka: Kafka, topics: Topics, tmp_path_factory) -> Iterator[GatewayProcess]:
    d = tmp_path_factory.mktemp("jwks")
    rsa = RSAAlgorithm.to_jwk(private("rsa.pem").public_key(), as_dict=True)
    ed = OKPAlgorithm.to_jwk(private("ed25519.pem").public_key(), as_dict=True)
    # The trust bundle's shape (common.md): EdDSA keys with an `agent` member.
    keys = [
        {**rsa, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
        {**ed, "kid": "ed-1", "alg": "EdDSA", "use": "sig", "agent": "support/router"},
    ]
    (d / "jwks.json").write_text(json.dumps({"keys": keys}))
    g = GatewayProcess(
        kafka.bootstrap,
        topics,
        "",
        d / "gw.log",
        f"--jwks-file={d / 'jwks.json'}",
        "--allow-query-token",
        instance="gw-jwks",
    )
    # JWKS mode: no HS256 secret at all.
    g.env.pop("FLEETWARD_GATEWAY_JWT_HS256_SECRET", None)
    g.start()
    try:
        yield g
    finally:
        g.stop()


def claims(**over) -> dict:
    now = int(time.time())
    c = {
        "sub": "alice",
        "sid": SESSION,
        "role": "user",
        "agent": "support/router",
        "exp": now + 300,
        "iat": now,
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def handshake(
    gw: GatewayProcess,
    token: str | None,
    *,
    via: str = "header",
    session: str = SESSION,
    subprotocols: list[str] | None = None,
) -> int | str:
    """101 handshake -> the selected subprotocol (or "ok"); refused -> the HTTP status."""
    if token:
        USED.append(token)
    headers, query, protos = {}, "", subprotocols
    if token and via == "header":
        headers["Authorization"] = f"Bearer {token}"
    elif token and via == "subprotocol":
        protos = (subprotocols or ["fleetward.v1"]) + [f"fleetward.bearer.{token}"]
    elif token and via == "query":
        query = f"access_token={token}"

    async def go() -> int | str:
        try:
            async with websockets.connect(
                gw.url(session, query), additional_headers=headers, subprotocols=protos, open_timeout=10, max_size=2**20
            ) as ws:
                return ws.subprotocol or "ok"
        except InvalidStatus as e:
            return e.response.status_code

    return asyncio.run(go())


def test_valid_tokens_pass_in_every_allowed_place(hs_gw, jwks_gw):
    assert handshake(hs_gw, mint(SECRET, SESSION)) == "ok"
    assert handshake(hs_gw, mint(SECRET, SESSION), via="subprotocol") == "fleetward.v1"
    rs = jwt.encode(claims(), private("rsa.pem"), algorithm="RS256", headers={"kid": "rsa-1"})
    ed = jwt.encode(claims(role="operator"), private("ed25519.pem"), algorithm="EdDSA", headers={"kid": "ed-1"})
    assert handshake(jwks_gw, rs) == "ok"
    assert handshake(jwks_gw, ed, via="subprotocol") == "fleetward.v1"
    assert handshake(jwks_gw, rs, via="query") == "ok"  # this gateway enables query tokens


@pytest.mark.parametrize(
    "case",
    [
        "no token",
        "alg none",
        "wrong key",
        "tampered payload",
        "expired",
        "not yet valid",
        "wrong audience",
        "wrong issuer",
        "missing sub",
        "missing sid",
        "missing role",
        "missing agent",
        "missing exp",
        "missing aud",
        "missing iss",
        "unknown role",
        "query token disabled",
        "bearer subprotocol without fleetward.v1",
        "oversized token",
        "garbage",
    ],
)
def test_hs256_gateway_refuses_with_401(hs_gw, case: str):
    now = int(time.time())
    good = mint(SECRET, SESSION)
    head, _, sig = good.split(".")
    token, via, protos = {
        "no token": (None, "header", None),
        "alg none": (f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}.", "header", None),
        "wrong key": (mint("another-secret-another-secret-0123", SESSION), "header", None),
        "tampered payload": (f"{head}.{b64(claims(role='operator'))}.{sig}", "header", None),
        "expired": (mint(SECRET, SESSION, exp=now - 60), "header", None),
        "not yet valid": (mint(SECRET, SESSION, nbf=now + 120), "header", None),
        "wrong audience": (mint(SECRET, SESSION, aud="someone-else"), "header", None),
        "wrong issuer": (mint(SECRET, SESSION, iss="https://evil.test"), "header", None),
        "missing sub": (mint(SECRET, SESSION, sub=None), "header", None),
        "missing sid": (jwt.encode(claims(sid=None), SECRET, algorithm="HS256"), "header", None),
        "missing role": (mint(SECRET, SESSION, role=None), "header", None),
        "missing agent": (mint(SECRET, SESSION, agent=None), "header", None),
        "missing exp": (mint(SECRET, SESSION, exp=None), "header", None),
        "missing aud": (mint(SECRET, SESSION, aud=None), "header", None),
        "missing iss": (mint(SECRET, SESSION, iss=None), "header", None),
        "unknown role": (mint(SECRET, SESSION, role="admin"), "header", None),
        "query token disabled": (good, "query", None),
        "bearer subprotocol without fleetward.v1": (good, "subprotocol", ["chat"]),
        "oversized token": (mint(SECRET, SESSION, pad="p" * 9000), "header", None),
        "garbage": ("not.a.token", "header", None),
    }[case]
    assert handshake(hs_gw, token, via=via, subprotocols=protos) == 401


def test_session_mismatch_is_403(hs_gw):
    assert handshake(hs_gw, mint(SECRET, "someone-elses-session")) == 403


@pytest.mark.parametrize(
    "case",
    [
        "HS256 signed with the RSA public key",
        "unknown kid",
        "no kid",
        "attacker key under a trusted kid",
        "EdDSA header on the RSA kid",
    ],
)
def test_jwks_gateway_refuses_with_401(jwks_gw, case: str):
    from cryptography.hazmat.primitives.asymmetric import rsa

    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (KEYS / "rsa.pub.pem").read_bytes()
    if case == "HS256 signed with the RSA public key":
        # PyJWT refuses to do this itself; the forgery is built by hand.
        import hashlib
        import hmac

        signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64(claims())}"
        mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        token = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    elif case == "unknown kid":
        token = jwt.encode(claims(), private("rsa.pem"), algorithm="RS256", headers={"kid": "rsa-9"})
    elif case == "no kid":
        token = jwt.encode(claims(), private("rsa.pem"), algorithm="RS256")
    elif case == "attacker key under a trusted kid":
        token = jwt.encode(claims(), attacker, algorithm="RS256", headers={"kid": "rsa-1"})
    else:
        token = jwt.encode(claims(), private("ed25519.pem"), algorithm="EdDSA", headers={"kid": "rsa-1"})
    assert handshake(jwks_gw, token) == 401


def test_no_token_text_in_any_log_and_refusals_are_counted(hs_gw, jwks_gw):
    # Its own refusals and acceptances, plus every token the tests above handed over (when run with them).
    now = int(time.time())
    assert handshake(hs_gw, mint(SECRET, SESSION, exp=now - 60)) == 401
    assert handshake(hs_gw, mint(SECRET, "not-mine")) == 403
    assert handshake(hs_gw, mint(SECRET, SESSION), via="query") == 401
    assert handshake(hs_gw, mint(SECRET, SESSION)) == "ok"
    assert handshake(jwks_gw, mint(SECRET, SESSION)) == 401  # an HS256 token at a JWKS gateway
    time.sleep(0.5)  # let the last log lines reach the files
    logs = hs_gw.logs() + jwks_gw.logs()
    assert "handshake refused" in logs  # the refusals were logged, by reason code
    for token in USED:
        assert token not in logs
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in logs, "a token segment appears in the gateway's log"
    for reason in ("expired", "session_mismatch", "query_token_disabled"):
        assert hs_gw.metric("fleetward_gateway_auth_refusals_total", reason=reason) >= 1, reason
    assert jwks_gw.metric("fleetward_gateway_auth_refusals_total", reason="bad_algorithm") >= 1


def test_logs_are_json_lines(hs_gw):
    lines = [ln for ln in hs_gw.logs().splitlines() if ln.strip()]
    assert lines
    for ln in lines:
        rec = json.loads(ln)
        assert {"timestamp", "level", "message"} <= rec.keys()


def test_gateway_refuses_bad_settings_with_a_clear_error(kafka: Kafka, topics: Topics, tmp_path: Path):
    bad = GatewayProcess(kafka.bootstrap, topics, SECRET, tmp_path / "bad.log", "--jwt-leeway-seconds=31")
    proc = subprocess.run(bad.argv, env=bad.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--jwt-leeway-seconds=31" in proc.stderr and "at most 30" in proc.stderr
