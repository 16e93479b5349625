"""PII detectors: formats found with exact spans, look-alikes ignored, validators correct,
and LangChain's detectors' findings covered."""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path

import pytest
from fleetward.runtime.guardrails.detectors import (
    PIIScanner,
    UserRegex,
    detector_for,
    iban_valid,
    ipv6_valid,
    luhn_valid,
    ssn_valid,
)
from langchain.agents.middleware._redaction import detect_credit_card, detect_email, detect_ip

SCANNER = PIIScanner()
CORPUS = Path(__file__).resolve().parents[1] / "data" / "guardrail_corpus" / "corpus.jsonl"


@pytest.fixture(scope="module")
def corpus_lines() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def found(text: str) -> list[tuple[str, str]]:
    return [(c.type, text[c.start : c.end]) for c in SCANNER.scan(text).candidates]


@pytest.mark.parametrize(
    ("text", "pii_type", "value"),
    [
        ("mail jane.doe@example.com now", "email", "jane.doe@example.com"),
        ("<JOHN.SMITH@EXAMPLE.ORG>", "email", "JOHN.SMITH@EXAMPLE.ORG"),
        ("to dev+alerts@mail.example.io.", "email", "dev+alerts@mail.example.io"),
        ("it's o'neil@example.com", "email", "o'neil@example.com"),
        ("renée.müller@example.de wrote", "email", "renée.müller@example.de"),
        ("card 4111 1111 1111 1111.", "credit_card", "4111 1111 1111 1111"),
        ("card 4111-1111-1111-1111", "credit_card", "4111-1111-1111-1111"),
        ("card 4111111111111111", "credit_card", "4111111111111111"),
        ("amex 3782 822463 10005", "credit_card", "3782 822463 10005"),
        ("diners 3056 930902 5904", "credit_card", "3056 930902 5904"),
        ("card 4111 1111 1111 1111 123 (cvv)", "credit_card", "4111 1111 1111 1111"),
        ("from 192.168.10.24:8080", "ip", "192.168.10.24"),
        ("http://10.0.0.1/health", "ip", "10.0.0.1"),
        ("net 10.0.0.0/8", "ip", "10.0.0.0"),
        ("v6 2001:db8::8a2e:370:7334 ok", "ip", "2001:db8::8a2e:370:7334"),
        ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "ip", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ("mapped ::ffff:192.0.2.128 here", "ip", "::ffff:192.0.2.128"),
        ("[2001:db8::1]:443", "ip", "2001:db8::1"),
        ("Address:2001:db8::1.", "ip", "2001:db8::1"),
        ("link fe80::1ff:fe23:4567:890a%eth0", "ip", "fe80::1ff:fe23:4567:890a"),
        ("call (415) 555-0132", "phone", "(415) 555-0132"),
        ("call 415-555-0132", "phone", "415-555-0132"),
        ("call 415.555.0132", "phone", "415.555.0132"),
        ("call 1-800-555-0199", "phone", "1-800-555-0199"),
        ("call +1 (415) 555-0132", "phone", "+1 (415) 555-0132"),
        # what people type in tests and examples: any exchange, and ten bare digits
        ("call 555-123-4567", "phone", "555-123-4567"),
        ("call (555) 123-4567", "phone", "(555) 123-4567"),
        ("call (555)123-4567", "phone", "(555)123-4567"),
        ("call 555.123.4567", "phone", "555.123.4567"),
        ("call 555 123 4567", "phone", "555 123 4567"),
        ("call 1-555-123-4567", "phone", "1-555-123-4567"),
        ("call 5551234567.", "phone", "5551234567"),
        ("tel:5551234567", "phone", "5551234567"),
        ("ring +44 20 7946 0958", "phone", "+44 20 7946 0958"),
        ("ring 020 7946 0958", "phone", "020 7946 0958"),
        ("ring 07700 900123", "phone", "07700 900123"),
        ("ring 0044 20 7946 0958", "phone", "0044 20 7946 0958"),
        ("ring +33 1 23 45 67 89", "phone", "+33 1 23 45 67 89"),
        ("ring 01 23 45 67 89", "phone", "01 23 45 67 89"),
        ("(me, +1 415 555 0188)", "phone", "+1 415 555 0188"),
        ("SSN 123-45-6789", "us_ssn", "123-45-6789"),
        ("SSN 078 05 1121", "us_ssn", "078 05 1121"),
        ("SSN: 219451234", "us_ssn", "219451234"),
        ("IBAN DE89 3704 0044 0532 0130 00.", "iban", "DE89 3704 0044 0532 0130 00"),
        ("IBAN GB82WEST12345698765432 thanks", "iban", "GB82WEST12345698765432"),
        (
            "key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD",
            "api_key",
            "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD",
        ),
        (
            "OPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL",
            "api_key",
            "sk-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL",
        ),
        ("k sk-ant-api03-" + "a" * 93 + "AA", "api_key", "sk-ant-api03-" + "a" * 93 + "AA"),
        ("aws AKIAIOSFODNN7EXAMPLE", "api_key", "AKIAIOSFODNN7EXAMPLE"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "api_key", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
        ("pat github_pat_11ABCDEFGHIJKLMNOPQRST_abcdefghij", "api_key", "github_pat_11ABCDEFGHIJKLMNOPQRST_abcdefghij"),
        ("slack xoxb-1234567890-abcdefghij", "api_key", "xoxb-1234567890-abcdefghij"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "api_key", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
        ("stripe rk_live_4eC39HqLyjWDarjtT1zdp7dc", "api_key", "rk_live_4eC39HqLyjWDarjtT1zdp7dc"),
        ("google AIzaSyA-abcdefghijklmnopqrstuvwxyz01234", "api_key", "AIzaSyA-abcdefghijklmnopqrstuvwxyz01234"),
        (
            "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "jwt",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        ),
        ("unsigned eyJhbGciOiJub25lIn0.eyJhZG1pbiI6dHJ1ZX0.", "jwt", "eyJhbGciOiJub25lIn0.eyJhZG1pbiI6dHJ1ZX0."),
    ],
)
def test_finds_each_type_with_its_exact_span(text, pii_type, value):
    assert (pii_type, value) in found(text), found(text)


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112 (fails Luhn)",
        "order number 1234567890123",
        "upgraded to 1.2.3.4-beta",
        "running v1.2.3.4",
        "release 2.14.3.1+build.5",
        "version 1.2.3.4.5",
        "build 10.0.19041.1",
        "Chrome 120.0.6099.109",
        "commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
        "id 123e4567-e89b-12d3-a456-426614174000",
        "on 2024-05-01 at 12:30:45 (2024-05-01T10:30:00Z), ts 1714557600",
        "due 05/01/2024 or 01.05.2024",
        "ISBN 978-3-16-148410-0 and 0-306-40615-2 and 9780306406157",
        "price $1,299.00 or 1.299,00 EUR",
        "MAC 00:1A:2B:3C:4D:5E and std::vector and a::b",
        "IP-like 999.1.1.1 and 256.100.1.1",
        "SSN placeholder 000-00-0000, 666-12-3456, 900-12-3456, 123-00-4567, 123-45-0000",
        "routing 021000021 and account 12345678",
        "GB00 WEST 1234 5698 7654 32 (bad check digits)",
        "sk-is-not-a-key and the AKIA prefix alone",
        "foo@bar and user@localhost and @everyone",
        "zip 94105-1234, room 1205, PIN 0000, 2FA code 123456",
        # bare digit runs that are not ten digits from 2-9: timestamps, longer ids
        "ts 1714557600 and 1234567890, ids 55512345678, 5551234567890, A5551234567, 5551234567B, 5551234567-2",
        "eyJub3QiOiJhIGp3dCJ9.eyJ4Ijp0cnVlfQ.c2ln has no alg in its header",
    ],
)
def test_look_alikes_are_not_pii(text):
    assert found(text) == []


def test_validators():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")
    assert not iban_valid("DE8937040044053201300")  # wrong length for DE
    assert ssn_valid("123456789")
    for bad in ("000123456", "666123456", "900123456", "123001234", "123450000", "078051120"):
        assert not ssn_valid(bad), bad


def test_ipv6_validator_agrees_with_the_standard_library():
    rng = random.Random(7)
    for _ in range(3000):
        address = ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice([0, 16, 64, 96, 112]))
        for form in (address.compressed, address.exploded):
            assert ipv6_valid(form), form
        if rng.random() < 0.3:
            mapped = ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}")
            assert ipv6_valid(str(mapped).replace("::ffff:", "::ffff:"))
        broken = address.compressed
        mutated = broken.replace(":", ":::", 1) if rng.random() < 0.5 else broken + ":12345"
        assert not ipv6_valid(mutated), mutated
    chars = "0123456789abcdef:."
    for _ in range(20000):
        candidate = "".join(rng.choice(chars) for _ in range(rng.randint(2, 30)))
        try:
            expected = bool(ipaddress.IPv6Address(candidate))
        except ValueError:
            expected = False
        assert ipv6_valid(candidate) == expected, candidate


def test_fullwidth_and_invisible_characters_map_back_to_input_offsets():
    text = "card ４１１１ １１１１ １１１１ １１１１ / mail jane\u200b.doe@example.com"
    spans = {c.type: (c.start, c.end, c.value) for c in SCANNER.scan(text).candidates}
    start, end, value = spans["credit_card"]
    assert text[start:end] == "４１１１ １１１１ １１１１ １１１１" and value == "4111 1111 1111 1111"
    start, end, value = spans["email"]
    assert text[start:end] == "jane\u200b.doe@example.com" and value == "jane.doe@example.com"


def test_overlaps_longest_then_most_specific_then_user_regex():
    # An IPv4 inside an IPv6 is reported once, as the IPv6 address.
    assert found("via ::ffff:192.0.2.128 only") == [("ip", "::ffff:192.0.2.128")]
    # Only phones configured: a card number is still not reported as a phone.
    phones_only = PIIScanner(builtin=["phone"])
    assert phones_only.scan("card 4111 1111 1111 1111").candidates == []
    # A user regex over the same span as a built-in wins (it is the more specific ask).
    import re

    custom = PIIScanner(user_regexes=[UserRegex("githouse_token", re.compile(r"ghp_[A-Za-z0-9]{36}"))])
    text = "t ghp_abcdefghijklmnopqrstuvwxyz0123456789"
    assert [(c.type, text[c.start : c.end]) for c in custom.scan(text).candidates] == [
        ("githouse_token", "ghp_abcdefghijklmnopqrstuvwxyz0123456789")
    ]


def test_unknown_builtin_type_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown built-in PII types \\['passport'\\]"):
        PIIScanner(builtin=["passport"])
    with pytest.raises(ValueError, match="allowed: email"):
        detector_for("passport")


def test_covers_what_langchains_detectors_find(corpus_lines):
    """On every corpus line, LangChain's email/credit_card/ip findings are covered by ours,
    except where we decided differently on purpose: cards outside the 2-6 issuer ranges and
    IPv4-shaped parts of version strings (1.2.3.4-beta, v1.2.3.4, 1.2.3.4.5)."""
    misses = []
    for line in corpus_lines:
        text = line["text"]
        ours = SCANNER.scan(text).candidates
        theirs = detect_email(text) + detect_credit_card(text) + detect_ip(text)
        for m in theirs:
            if m["type"] == "credit_card" and m["value"][0] not in "23456":
                continue
            if m["type"] == "ip":
                before = text[m["start"] - 1] if m["start"] else " "
                after = text[m["end"] : m["end"] + 2]
                if (
                    before.isalnum()
                    or before in ".-+"
                    or after[:1] in ("-", "+")
                    or (after[:1] == "." and after[1:2].isdigit())
                ):
                    continue
            if not any(c.type == m["type"] and c.start <= m["start"] and m["end"] <= c.end for c in ours):
                misses.append((line["id"], m["type"], m["value"]))
    assert misses == []


def test_per_type_detector_plugs_into_langchain_types():
    detect = detector_for("iban")
    matches = detect("IBAN DE89 3704 0044 0532 0130 00 and mail a@example.com")
    assert matches == [{"type": "iban", "value": "DE89 3704 0044 0532 0130 00", "start": 5, "end": 32}]


def test_a_type_not_asked_for_never_hides_a_user_regex_match():
    import re

    # The built-in api_key match (longer) is not configured; the user's shorter regex still counts.
    scanner = PIIScanner(builtin=["jwt"], user_regexes=[UserRegex("gh_prefix", re.compile(r"ghp_[A-Za-z0-9]{20}"))])
    text = "t ghp_abcdefghijklmnopqrstuvwxyz0123456789"
    assert [(c.type, text[c.start : c.end]) for c in scanner.scan(text).candidates] == [
        ("gh_prefix", "ghp_abcdefghijklmnopqrst")
    ]
