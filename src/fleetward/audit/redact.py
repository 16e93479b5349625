"""Last-line secret stripping for audit details.

Callers pass details that are already redacted (the runtime's guardrail engine masks PII);
this is the defence for what a guardrail does not look for: credentials. A record is
permanent and mirrored to Kafka, so nothing here may ever hold one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"

# Compared with the key lower-cased and stripped of everything but letters and digits, so
# "X-Api-Key", "api_key" and "apiKey" all match "apikey".
SECRET_KEY_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "authorization",
    "apikey",
    "accesskey",
    "privatekey",
    "credential",
    "cookie",
)

_NOT_ALNUM = re.compile(r"[^a-z0-9]")
# Credential-shaped text wherever it appears: bearer/basic headers, JWTs, PEM private keys,
# and the password in a URL (e.g. a DSN).
_VALUE_PATTERNS = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), REDACTED),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+):[^/\s@]+@"), r"\1:" + REDACTED + "@"),
)


def is_secret_key(key: str) -> bool:
    """True for keys such as token, password, secret, authorization, apiKey, x-api-key."""
    norm = _NOT_ALNUM.sub("", key.lower())
    return any(word in norm for word in SECRET_KEY_WORDS)


def strip_secrets(value: Any) -> Any:
    """A copy of a JSON value with every credential replaced by "[redacted]": the value of
    any secret-named key (numbers, booleans and null stay: `promptTokens: 812` is a count,
    not a token), and credential-shaped text inside any string."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            key = str(key)
            if is_secret_key(key) and not (item is None or isinstance(item, bool | int | float)):
                out[key] = REDACTED
            else:
                out[key] = strip_secrets(item)
        return out
    if isinstance(value, list | tuple):
        return [strip_secrets(v) for v in value]
    if isinstance(value, str):
        for pattern, replacement in _VALUE_PATTERNS:
            value = pattern.sub(replacement, value)
        return value
    return value
