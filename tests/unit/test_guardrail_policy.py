"""Banned phrases (policy.bannedPhrases): the injection view's folding, joiners inside and
between words, inflections of one-word phrases, offsets into the input."""

from __future__ import annotations

import pytest
from fleetward.runtime.guardrails import Finding, GuardrailEngine
from fleetward.runtime.guardrails.policy import BannedPhrases

from fleetward.api.guardrail import GuardrailSpec

PHRASES = ["bypass", "circumvent", "skip verification", "disable two-factor", "turn off 2FA"]
ENGINE = GuardrailEngine([GuardrailSpec.model_validate({"policy": {"bannedPhrases": PHRASES, "action": "block"}})])


def found(text: str) -> list[tuple[str, str]]:
    result = ENGINE.scan(text, "input")
    return [(f.type, text[f.start : f.end]) for f in result.findings]


@pytest.mark.parametrize(
    ("text", "phrase", "matched"),
    [
        ("bypassing the check", "bypass", "bypassing"),
        ("it was circumvented", "circumvent", "circumvented"),
        ("how to circumvention", "circumvent", "circumvention"),
        ("BYPASSED", "bypass", "BYPASSED"),
        ("just by-pass it", "bypass", "by-pass"),
        ("b.y.p.a.s.s", "bypass", "b.y.p.a.s.s"),
        ("by--passing", "bypass", "by--passing"),
        ("by\u200bpass", "bypass", "by\u200bpass"),  # zero-width space
        ("byp4ss", "bypass", "byp4ss"),  # leetspeak
        ("bураss", "bypass", "bураss"),  # Cyrillic у, р, а
        ("ｂｙｐａｓｓ", "bypass", "ｂｙｐａｓｓ"),  # fullwidth
        ("Ｂｙ－ｐａｓｓｅｄ", "bypass", "Ｂｙ－ｐａｓｓｅｄ"),
        ("bÿpàss", "bypass", "bÿpàss"),  # diacritics
        ("skip-verification", "skip verification", "skip-verification"),
        ("skip_verification", "skip verification", "skip_verification"),
        ("SKIP\n  Verification", "skip verification", "SKIP\n  Verification"),
        ("skip - verification", "skip verification", "skip - verification"),
        ("sk1p v3rification", "skip verification", "sk1p v3rification"),
        ("disable twofactor", "disable two-factor", "disable twofactor"),  # a joiner in the phrase may be left out
        ("disable two factor", "disable two-factor", "disable two factor"),
        ("turn off 2fa", "turn off 2fa", "turn off 2fa"),
    ],
)
def test_obfuscated_and_inflected_phrases_are_found(text, phrase, matched):
    assert found(text) == [(phrase, matched)]
    assert ENGINE.scan(text, "input").verdict == "block"


@pytest.mark.parametrize(
    "text",
    [
        "the bus passed by the office",
        "I'll stop by passing the lobby",  # two words, not a joiner
        "rebypass",  # not at a word start
        "bypass2fa",  # a digit after the word: another word
        "skip, verification can wait",  # punctuation ends a phrase
        "skip verifications",  # only one-word phrases inflect
        "skipper verification",
        "we verify and never skip",
        "circumference of the wheel",
        "turn off 2FAX",
    ],
)
def test_look_alikes_that_are_not_the_phrases(text):
    assert found(text) == []
    assert ENGINE.scan(text, "input").verdict == "allow"


def test_offsets_point_into_the_input_with_non_ascii_text_around():
    text = "Grüße 👋 — wie kann ich bураssing ﬁx und ｓｋｉｐ－ｖｅｒｉｆｉｃａｔｉｏｎ?"
    result = ENGINE.scan(text, "input")
    assert [(f.kind, f.type, text[f.start : f.end]) for f in result.findings] == [
        ("policy", "bypass", "bураssing"),
        ("policy", "skip verification", "ｓｋｉｐ－ｖｅｒｉｆｉｃａｔｉｏｎ"),
    ]


def test_the_finding_names_the_configured_phrase_and_the_longest_wins():
    engine = GuardrailEngine(
        [GuardrailSpec.model_validate({"policy": {"bannedPhrases": ["Skip", "skip   Verification"]}})]
    )
    result = engine.scan("please skip verification, then skipping is fine", "output")
    assert result.findings == (
        Finding("policy", "skip verification", 7, 24),
        Finding("policy", "skip", 31, 39),
    )


def test_phrases_without_letters_or_digits_and_other_scripts():
    phrases = BannedPhrases.of(["🔓", "绕过", "Passwort umgehen"])
    assert [(h.phrase, h.start, h.end) for h in phrases.find("open 🔓 now")] == [("🔓", 5, 6)]
    assert [h.phrase for h in phrases.find("如何 绕过 验证")] == ["绕过"]
    assert [h.phrase for h in phrases.find("PASSWORT-UMGEHEN bitte")] == ["passwort umgehen"]
    with pytest.raises(ValueError, match="every phrase is blank"):
        BannedPhrases.of(["  ", ""])
