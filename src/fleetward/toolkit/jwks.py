"""The trust bundle document (a JWKS of every active agent key) and its parsing.

Format (shared contract): {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "<b64url>",
"kid": "<unique, never reused>", "alg": "EdDSA", "use": "sig", "agent": "<namespace>/<name>",
"labels": {<the Agent's labels when the key was published>}}]}. `labels` is optional: with it,
a verifier can tell on its own which keys an engaged KillSwitch's agentSelector covers
(fleetward.toolkit.killswitches).

The operator publishes Ed25519 keys. SPEC §3 also allows ES256, so an entry may as well be
{"kty": "EC", "crv": "P-256", "x", "y", "alg": "ES256"}: the key decides the algorithm a token
must use. `agent` binds a key to the one agent whose `sub` its tokens may carry; an entry
without it (a JWKS written by hand or by another tool) is bound by its kid when the kid has
the operator's form `<namespace>.<agent>.<id>`, and otherwise not bound at all (reported in
`problems`; its tokens may name any agent).

Parsing is per key: one bad entry is dropped and reported without revoking every other
agent; a document that is not a JWKS at all raises InvalidJwks (callers fail closed).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# "<namespace>/<name>", both DNS-1123 labels (what Kubernetes allows for the two names).
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
AGENT_PATTERN = re.compile(rf"^{_LABEL}/{_LABEL}$")
# The operator's kids: "<namespace>.<agent>.<random>" (neither name can hold a dot).
_OPERATOR_KID = re.compile(rf"^(?P<namespace>{_LABEL})\.(?P<name>{_LABEL})\.[A-Za-z0-9_-]+$")
MAX_KID_LENGTH = 256


class InvalidJwks(ValueError):
    """The document is not a JWKS ({"keys": [...]}); nothing in it can be trusted."""


PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class TrustedKey:
    kid: str
    agent: str | None
    """The agent (`<namespace>/<name>`) whose tokens the key signs; None when the entry does
    not say (its tokens may then name any agent)."""
    public_key: PublicKey
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    """The Agent's labels as published with the key ({} when the entry has none)."""
    algorithm: str = "EdDSA"
    """The JWS algorithm of the key: EdDSA (Ed25519) or ES256 (P-256)."""

    @property
    def namespace(self) -> str | None:
        return self.agent.split("/", 1)[0] if self.agent else None


@dataclass(frozen=True)
class ParsedJwks:
    keys: dict[str, TrustedKey]
    problems: list[str]  # one line per dropped (or partly ignored) entry, naming the kid/index and the field


def b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk(
    public_key: Ed25519PublicKey, kid: str, agent: str, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The bundle entry for one agent key (with the Agent's labels when given)."""
    if not AGENT_PATTERN.match(agent):
        raise ValueError(f"agent {agent!r} must be '<namespace>/<name>' (DNS-1123 labels)")
    if not kid or len(kid) > MAX_KID_LENGTH:
        raise ValueError(f"kid must be 1-{MAX_KID_LENGTH} characters, got {len(kid)}")
    x = b64url_encode(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    entry: dict[str, Any] = {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}
    entry["agent"] = agent
    if labels is not None:
        entry["labels"] = dict(labels)
    return entry


def jwks_document(entries: Iterable[Mapping[str, Any]]) -> str:
    """The `jwks.json` text for a set of entries (stable order, so equal sets are equal text)."""
    return json.dumps({"keys": sorted((dict(e) for e in entries), key=lambda e: e["kid"])}, sort_keys=True)


def _labels(entry: Mapping[str, Any]) -> Mapping[str, str] | None:
    """The entry's `labels`: {} when absent, None when present but not an object of strings."""
    labels = entry.get("labels", {})
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return None
    return dict(labels)


def _coordinate(entry: Mapping[str, Any], member: str, size: int, what: str) -> bytes:
    value = entry.get(member)
    try:
        raw = b64url_decode(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise ValueError(f"{member} must be the base64url encoding of {what}")
    return raw


def _public_key(entry: Mapping[str, Any]) -> tuple[PublicKey, str]:
    """The entry's public key and the algorithm it verifies (EdDSA or ES256)."""
    kty, crv = entry.get("kty"), entry.get("crv")
    if (kty, crv) == ("OKP", "Ed25519"):
        algorithm = "EdDSA"
    elif (kty, crv) == ("EC", "P-256"):
        algorithm = "ES256"
    else:
        raise ValueError(f"kty/crv must be OKP/Ed25519 or EC/P-256, got {kty!r}/{crv!r}")
    if entry.get("alg", algorithm) != algorithm:
        raise ValueError(f"alg must be {algorithm!r} for a {crv} key, got {entry.get('alg')!r}")
    if algorithm == "EdDSA":
        return Ed25519PublicKey.from_public_bytes(
            _coordinate(entry, "x", 32, "a 32-byte Ed25519 public key")
        ), algorithm
    x = int.from_bytes(_coordinate(entry, "x", 32, "a 32-byte P-256 coordinate"), "big")
    y = int.from_bytes(_coordinate(entry, "y", 32, "a 32-byte P-256 coordinate"), "big")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key(), algorithm
    except ValueError:
        raise ValueError("x/y is not a point on the P-256 curve") from None


def _agent(entry: Mapping[str, Any], kid: str) -> str | None:
    agent = entry.get("agent")
    if agent is None:
        bound = _OPERATOR_KID.match(kid)
        return f"{bound['namespace']}/{bound['name']}" if bound else None
    if not isinstance(agent, str) or not AGENT_PATTERN.match(agent):
        raise ValueError(f"agent must be '<namespace>/<name>', got {agent!r}")
    return agent


def _parse_key(entry: Any) -> TrustedKey:
    """One JWKS entry -> TrustedKey; ValueError/TypeError names the offending member."""
    if not isinstance(entry, Mapping):
        raise TypeError("entry must be an object")
    if entry.get("use", "sig") != "sig":
        raise ValueError(f"use must be 'sig', got {entry.get('use')!r}")
    if "d" in entry:
        # A private key published in a bundle every tool service reads: refuse it loudly.
        raise ValueError("member d (private key material) must never be in the trust bundle")
    kid = entry.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
        raise ValueError(f"kid must be a string of 1-{MAX_KID_LENGTH} characters")
    public_key, algorithm = _public_key(entry)
    return TrustedKey(
        kid=kid, agent=_agent(entry, kid), public_key=public_key, labels=_labels(entry) or {}, algorithm=algorithm
    )


def parse_jwks(document: str | bytes | Mapping[str, Any]) -> ParsedJwks:
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except ValueError as e:
            raise InvalidJwks(f"not JSON: {e}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise InvalidJwks('expected an object with a "keys" array')
    keys: dict[str, TrustedKey] = {}
    problems: list[str] = []
    duplicates: set[str] = set()
    for index, entry in enumerate(document["keys"]):
        try:
            key = _parse_key(entry)
        except (ValueError, TypeError) as e:
            kid = entry.get("kid") if isinstance(entry, Mapping) else None
            problems.append(f"keys[{index}] (kid {kid!r}): {e}")
            continue
        if key.agent is None:
            problems.append(
                f"keys[{index}] (kid {key.kid!r}): no agent member and the kid is not <namespace>.<agent>.<id>: "
                "kept, but its tokens are not bound to one agent's sub"
            )
        if _labels(entry) is None:
            # Kept: the bundle is what trusts a key; labels only let a verifier apply a
            # KillSwitch's agentSelector itself, and the operator withdraws the key anyway.
            problems.append(f"keys[{index}] (kid {key.kid!r}): labels must be an object of strings; ignored")
        if key.kid in keys or key.kid in duplicates:
            # kids are unique by contract; two entries under one kid cannot both be right.
            duplicates.add(key.kid)
            keys.pop(key.kid, None)
            problems.append(f"keys[{index}]: kid {key.kid!r} appears more than once; every entry with it dropped")
            continue
        keys[key.kid] = key
    return ParsedJwks(keys=keys, problems=problems)
