"""Trust bundle: JWKS parsing, failure policy (fail closed), the file source, and the
idempotency store tool services share."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetward.toolkit import (
    IdempotencyConflict,
    IdempotencyStore,
    RefusalReason,
    TokenRefused,
    ToolTokenVerifier,
    TrustBundle,
    jwks_document,
    mint_tool_token,
    parse_jwks,
    public_jwk,
)
from fleetward.toolkit.idempotency import fingerprint


def agent_key(agent: str, kid: str) -> tuple[Ed25519PrivateKey, dict]:
    key = Ed25519PrivateKey.generate()
    return key, public_jwk(key.public_key(), kid, agent)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_one_bad_entry_is_dropped_and_named_the_rest_stays_trusted():
    _, good = agent_key("githouse/billing", "good-1")
    _, other = agent_key("githouse/workers", "other-1")
    doc = {
        "keys": [
            good,
            {**other, "kid": "wrong-curve", "crv": "X25519"},
            {**other, "kid": "short-x", "x": "AAAA"},
            {**other, "kid": "with-private", "d": "c2VjcmV0"},
            {**other, "kid": "bad-agent", "agent": "workers"},
            {**other, "kid": "rsa", "kty": "RSA"},
            "not-an-object",
        ]
    }
    parsed = parse_jwks(json.dumps(doc))
    assert set(parsed.keys) == {"good-1"}
    text = "\n".join(parsed.problems)
    for fragment in (
        "'wrong-curve'): kty/crv must be OKP/Ed25519 or EC/P-256, got 'OKP'/'X25519'",
        "'short-x'): x must be",
        "member d (private key",
        "'bad-agent'): agent must be",
        "'rsa'): kty/crv must be OKP/Ed25519 or EC/P-256, got 'RSA'",
        "keys[6] (kid None): entry must",
    ):
        assert fragment in text, text


def test_a_kid_listed_twice_is_trusted_under_neither_entry():
    _, a = agent_key("githouse/billing", "dup-1")
    _, b = agent_key("githouse/workers", "dup-1")
    _, c = agent_key("githouse/shotgun", "fine-1")
    parsed = parse_jwks({"keys": [a, b, c]})
    assert set(parsed.keys) == {"fine-1"} and "appears more than once" in parsed.problems[0]


def test_an_invalid_document_fails_closed_until_a_valid_one_arrives():
    key, jwk = agent_key("githouse/billing", "k-1")
    bundle = TrustBundle.from_jwks(jwks_document([jwk]))
    verifier = ToolTokenVerifier(bundle)
    assert bundle.ready()
    assert bundle.load("{this is not json") is False
    assert not bundle.ready()
    with pytest.raises(TokenRefused) as err:
        verifier.verify(mint_tool_token(key, "k-1", "githouse/billing", "t", "r", "i"), "t")
    assert err.value.reason == RefusalReason.TRUST_BUNDLE_UNAVAILABLE and err.value.http_status == 503
    assert "not JSON" in bundle.status()["reason"]
    assert bundle.load({"keys": [jwk]}) is True
    assert verifier.verify(mint_tool_token(key, "k-1", "githouse/billing", "t", "r", "i"), "t").kid == "k-1"


def test_nothing_is_trusted_before_the_first_load():
    bundle = TrustBundle()
    assert not bundle.ready() and not bundle.wait_ready(0.05)
    with pytest.raises(TokenRefused) as err:
        bundle.lookup("k-1")
    assert err.value.reason == RefusalReason.TRUST_BUNDLE_UNAVAILABLE
    bundle.load(None)  # "no bundle" is a known state: ready, trusting nothing
    assert bundle.ready()
    with pytest.raises(TokenRefused) as err:
        bundle.lookup("k-1")
    assert err.value.reason == RefusalReason.UNKNOWN_KEY


def test_last_known_keys_survive_a_short_source_outage_then_fail_closed():
    now = [1000.0]
    _, jwk = agent_key("githouse/billing", "k-1")
    bundle = TrustBundle(max_staleness=10, clock=lambda: now[0])
    bundle.load({"keys": [jwk]})
    bundle.source_down("watch connection reset")
    now[0] += 9
    assert bundle.lookup("k-1").agent == "githouse/billing"
    now[0] += 2
    with pytest.raises(TokenRefused) as err:
        bundle.lookup("k-1")
    assert err.value.reason == RefusalReason.TRUST_BUNDLE_UNAVAILABLE and "watch connection reset" in err.value.detail
    assert bundle.status()["ready"] is False
    bundle.source_up()
    assert bundle.lookup("k-1").kid == "k-1"


def test_removed_kids_are_reported_as_revoked_and_on_change_sees_every_change():
    _, a = agent_key("githouse/billing", "a-1")
    _, b = agent_key("githouse/billing", "a-2")
    bundle = TrustBundle.from_jwks({"keys": [a]})
    changes = []
    bundle.on_change(changes.append)
    bundle.load({"keys": [b]})  # rotation
    bundle.load({"keys": [b]})  # no change: no callback
    assert [(c.added, c.removed, c.total) for c in changes] == [({"a-2"}, {"a-1"}, 1)]
    with pytest.raises(TokenRefused) as err:
        bundle.lookup("a-1")
    assert err.value.reason == RefusalReason.REVOKED
    with pytest.raises(TokenRefused) as err:
        bundle.lookup("never-seen")
    assert err.value.reason == RefusalReason.UNKNOWN_KEY


def test_file_source_picks_up_removal_within_a_second(tmp_path):
    path = tmp_path / "jwks.json"
    key_a, a = agent_key("githouse/billing", "a-1")
    _, b = agent_key("githouse/workers", "b-1")
    write_atomically(path, jwks_document([a, b]))
    with TrustBundle.from_file(path) as bundle:
        assert bundle.ready()  # loaded synchronously by start()
        verifier = ToolTokenVerifier(bundle)
        assert verifier.verify(mint_tool_token(key_a, "a-1", "githouse/billing", "t", "r", "i"), "t")
        token = mint_tool_token(key_a, "a-1", "githouse/billing", "t", "r", "i")
        write_atomically(path, jwks_document([b]))
        written = time.monotonic()
        refused_after = None
        while time.monotonic() - written < 1.0:
            try:
                bundle.lookup("a-1")
            except TokenRefused as e:
                assert e.reason == RefusalReason.REVOKED
                refused_after = time.monotonic() - written
                break
            time.sleep(0.005)
        assert refused_after is not None, "key still trusted 1 s after the file changed"
        with pytest.raises(TokenRefused) as err:
            verifier.verify(token, "t")
        assert err.value.reason == RefusalReason.REVOKED


def test_file_source_deleted_garbage_and_recovered(tmp_path):
    path = tmp_path / "jwks.json"
    _, a = agent_key("githouse/billing", "a-1")
    write_atomically(path, jwks_document([a]))
    with TrustBundle.from_file(path, poll_interval=0.02) as bundle:
        path.unlink()
        assert _eventually(lambda: bundle.trusted_keys() == {})
        assert bundle.ready()  # a deleted bundle trusts nothing; that is a valid state
        path.write_text("garbage")
        assert _eventually(lambda: not bundle.ready())
        write_atomically(path, jwks_document([a]))
        assert _eventually(lambda: bundle.ready() and set(bundle.trusted_keys()) == {"a-1"})


def _eventually(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_idempotency_store_replays_conflicts_and_expires():
    now = [0.0]
    store = IdempotencyStore(ttl=100, clock=lambda: now[0])
    scope = ("githouse/billing", "issue_refund")
    args = {"transaction_id": "txn_1001", "amount_cents": 4900}
    assert store.lookup(scope, "k", fingerprint(args)) is None
    store.store(scope, "k", fingerprint(args), 200, {"refundId": "re_0001"})
    assert store.lookup(scope, "k", fingerprint(dict(reversed(args.items())))).body == {"refundId": "re_0001"}
    with pytest.raises(IdempotencyConflict, match="already used with different arguments"):
        store.lookup(scope, "k", fingerprint({**args, "amount_cents": 1}))
    assert store.lookup(("githouse/other", "issue_refund"), "k", fingerprint(args)) is None  # scoped per agent
    now[0] = 101
    assert store.lookup(scope, "k", fingerprint(args)) is None and len(store) == 0


def test_the_same_rejected_document_is_logged_once(caplog):
    """A file source re-reads an invalid bundle every poll: one error line per distinct
    problem, not ten a second (a rejection after a valid bundle is logged again)."""
    bundle = TrustBundle()
    _, jwk = agent_key("githouse/billing", "k-1")
    with caplog.at_level("ERROR", logger="fleetward.toolkit"):
        for _ in range(5):
            assert bundle.load("not json") is False
        assert bundle.load("[]") is False
        assert bundle.load({"keys": [jwk]}) is True
        assert bundle.load("not json") is False
    rejected = [r for r in caplog.records if "trust bundle rejected" in r.getMessage()]
    assert len(rejected) == 3, [r.getMessage() for r in rejected]
