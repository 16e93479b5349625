"""Two PII values side by side: neither may leak into the other's finding or out of the scan.

Audit finding: a phone match took the first digit group of the value after it ("+44 20 7946
0958 123-45-6789" -> phone "+44 20 7946 0958 123"), and overlap resolution (longest wins)
then dropped the other value, so "-45-6789" (or a whole card after a bogus phone) reached the
output. Every pair of sample values of every type, joined by the separators people type, is
scanned with a redacting Guardrail, in the compiled core and in the pure-Python reference:
no letter or digit of either value may survive (so neither value, nor any digit run of a card
or SSN), both values' types are reported, and each value is reported with exactly its own span.
"""

from __future__ import annotations

import itertools
import re

import pytest
from fleetward.runtime.guardrails import GuardrailEngine, core

from fleetward.api.guardrail import GuardrailSpec

SAMPLES: list[tuple[str, str]] = [
    ("email", "jane.doe@example.com"),
    ("credit_card", "4111 1111 1111 1111"),
    ("credit_card", "5500-0000-0000-0004"),
    ("credit_card", "378282246310005"),
    ("ip", "203.0.113.77"),
    ("ip", "2001:db8::1"),
    ("ip", "2001:db8:85a3::8a2e:370:7334"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "+1 (415) 555-0132"),
    ("phone", "+49 30 1234567"),
    ("phone", "415-555-0132"),
    ("phone", "(415) 555-0132"),
    ("phone", "415.555.0132"),
    ("phone", "1-800-555-0199"),
    ("phone", "020 7946 0958"),
    ("phone", "0044 20 7946 0958"),
    ("phone", "555-123-4567"),
    ("phone", "(555) 123-4567"),
    ("phone", "555.123.4567"),
    ("phone", "1-555-123-4567"),
    ("phone", "5551234567"),
    ("us_ssn", "123-45-6789"),
    ("us_ssn", "219 45 1234"),
    ("iban", "DE89 3704 0044 0532 0130 00"),
    ("iban", "GB82WEST12345698765432"),
    ("iban", "BE68 5390 0754 7034"),
    ("api_key", "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"),
    ("api_key", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    (
        "jwt",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    ("employee_id", "EMP-123456"),
]
SEPARATORS = [" ", ", ", "\n", " and "]
PII_TYPES = ["email", "credit_card", "ip", "phone", "us_ssn", "iban", "api_key", "jwt"]
ENTITIES = [{"type": t, "strategy": "redact"} for t in PII_TYPES] + [
    {"type": "custom", "name": "employee_id", "detector": "EMP-[0-9]{6}", "strategy": "redact"}
]
REDACTING = GuardrailEngine([GuardrailSpec.model_validate({"pii": {"entities": ENTITIES}})])
# Only built-in types: the one-call compiled path (a Guardrail regex sends the scan to Python).
BUILTIN_ONLY = GuardrailEngine(
    [GuardrailSpec.model_validate({"pii": {"entities": [{"type": t, "strategy": "redact"} for t in PII_TYPES]}})]
)
PLACEHOLDER = re.compile(r"\[REDACTED_[A-Z_]+\]")
PAIRS = [(a, b, sep) for a, b in itertools.permutations(SAMPLES, 2) for sep in SEPARATORS]


@pytest.fixture(params=["compiled", "python"])
def execution(request: pytest.FixtureRequest):
    if request.param == "compiled":
        assert core.active() is not None, "the compiled guardrail core is not loaded"
        yield request.param
    else:
        with core.reference_python():
            yield request.param


def _leftover(text: str, sep: str) -> str:
    """What the redacted text keeps besides placeholders and the separator's own word."""
    rest = PLACEHOLDER.sub(" ", text)
    word = sep.strip(" ,\n")
    return re.sub(rf"\b{word}\b", " ", rest) if word else rest


def test_each_sample_alone_is_found_with_its_exact_span(execution):
    for pii_type, value in SAMPLES:
        result = REDACTING.scan(value, "input")
        assert [(f.type, f.start, f.end) for f in result.findings] == [(pii_type, 0, len(value))], value


@pytest.mark.parametrize("engine", [REDACTING, BUILTIN_ONLY], ids=["with_custom_regex", "builtin_only"])
def test_no_character_of_either_value_survives(execution, engine):
    leaks = []
    for (type_a, a), (type_b, b), sep in PAIRS:
        if engine is BUILTIN_ONLY and "employee_id" in (type_a, type_b):
            continue
        text = a + sep + b
        result = engine.scan(text, "input")
        out = result.text
        assert out is not None
        leftover = _leftover(out, sep)
        types = {f.type for f in result.findings}
        if a in out or b in out or any(ch.isalnum() for ch in leftover) or not {type_a, type_b} <= types:
            leaks.append((text, out, [(f.type, text[f.start : f.end]) for f in result.findings]))
        for f in result.findings:
            assert 0 <= f.start < f.end <= len(text)
    assert not leaks, f"{len(leaks)} of {len(PAIRS)} pairs leak, first: {leaks[:5]}"


def test_a_card_after_a_phone_is_blocked_by_a_card_block_rule(execution):
    engine = GuardrailEngine(
        [
            GuardrailSpec.model_validate(
                {"pii": {"entities": [{"type": "phone"}, {"type": "credit_card", "strategy": "block"}]}}
            )
        ]
    )
    for phone in ("+44 20 7946 0958", "+1 (415) 555-0132", "020 7946 0958", "0044 20 7946 0958", "+49 30 1234567"):
        result = engine.scan(f"{phone} 4111 1111 1111 1111", "input")
        assert result.verdict == "block", (phone, result)


def test_each_value_keeps_its_own_span(execution):
    wrong = []
    for (type_a, a), (type_b, b), sep in PAIRS:
        text = a + sep + b
        got = [(f.type, text[f.start : f.end]) for f in REDACTING.scan(text, "input").findings]
        if got != [(type_a, a), (type_b, b)]:
            wrong.append((text, got))
    assert not wrong, f"{len(wrong)} of {len(PAIRS)} pairs split wrongly, first: {wrong[:8]}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the audit's cases, as `fleetward guardrail scan` showed them leaking
        ("+44 20 7946 0958 4111 1111 1111 1111", "[REDACTED_PHONE] [REDACTED_CREDIT_CARD]"),
        ("+44 20 7946 0958 123-45-6789", "[REDACTED_PHONE] [REDACTED_US_SSN]"),
        ("+44 20 7946 0958 415-555-0132", "[REDACTED_PHONE] [REDACTED_PHONE]"),
        ("2001:db8::1 415-555-0132", "[REDACTED_IP] [REDACTED_PHONE]"),
    ],
)
def test_audit_cases(execution, text, expected):
    assert REDACTING.scan(text, "input").text == expected


def test_partially_overlapping_matches_are_both_kept_without_a_gap():
    # No detector split is perfect: when two matches overlap partially, the longer one is kept
    # whole and what the other covers beyond it is kept too, as a finding of its own type.
    from fleetward.runtime.guardrails.detectors import Candidate, resolve_overlaps

    phone = Candidate("phone", 0, 20, "+44 20 7946 0958 123", 50)
    ssn = Candidate("us_ssn", 17, 28, "123-45-6789", 65)
    assert [(c.type, c.start, c.end, c.value) for c in resolve_overlaps([ssn, phone])] == [
        ("phone", 0, 20, "+44 20 7946 0958 123"),
        ("us_ssn", 20, 28, "-45-6789"),
    ]
    inner = Candidate("ip", 3, 10, "20 7946", 60)
    assert resolve_overlaps([phone, inner]) == [phone]  # covered entirely: nothing left to keep
    # What sticks out holds no letter or digit (a space, a parenthesis): nothing to keep either.
    paren = Candidate("phone", 19, 21, "3)", 50)
    assert resolve_overlaps([phone, paren]) == [phone]
