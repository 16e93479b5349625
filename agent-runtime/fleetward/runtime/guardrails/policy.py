"""Banned phrases (Guardrail `policy.bannedPhrases`).

Phrases are matched on the policy view (normalize.py), so they fold like injection phrases:
any case, look-alike letters ("bураss" in Cyrillic, fullwidth "ｂｙｐａｓｓ"), diacritics,
invisible characters and leetspeak ("byp4ss"). Rules:
- a phrase starts at a word start and its words are matched whole: "bypass" is not found in
  "rebypass" and "skip verification" not in "skip verifications";
- a single-word phrase also matches the words it begins (inflections): "bypass" finds
  "bypassing", "bypassed", "bypasses" ("pass" would find "passport": list a longer phrase);
- inside a word, up to two joiners ("-", "_", ".", "/", "\\", "*", "~", "+", dashes) may
  stand between letters: "by-pass", "b.y.p.a.s.s";
- between the words of a phrase, any run of white space and joiners: "skip verification",
  "skip-verification", "skip_verification", "skip\\n  verification"; other punctuation ends a
  phrase ("skip, verification" is not the phrase); a joiner in the phrase itself also allows
  no gap ("two-factor" finds "twofactor");
- a phrase without any letter or digit (an emoji) is matched as written, case-insensitively.
Findings carry the phrase as configured (normalised spacing, case-folded) and the span of the
matched text in the input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fleetward.runtime.guardrails.normalize import View, policy_view

_WORD = re.compile(r"[^\W_]+")  # a run of letters and digits in the folded phrase
_IN_WORD = "-{0,2}"  # joiners between two letters of a word
_GAP = "[ -]+"  # white space and joiners between words
_JOINED = "[ -]*"  # where the phrase itself has a joiner
_INFLECTION = r"[^\W\d_]*"


def _alternative(folded: str) -> str | None:
    words = list(_WORD.finditer(folded))
    if not words:
        return None
    parts = []
    for i, m in enumerate(words):
        if i:
            gap = folded[words[i - 1].end() : m.start()]
            parts.append(_JOINED if set(gap) <= {"-"} else _GAP)
        parts.append(_IN_WORD.join(re.escape(ch) for ch in m.group()))
    if len(words) == 1:
        parts.append(_INFLECTION)
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class BannedPhrases:
    pattern: re.Pattern[str] | None
    """On the policy view; group i + 1 is phrase i."""
    phrases: tuple[str, ...]
    literal: re.Pattern[str] | None
    """Phrases with no letter or digit, on the input as written."""

    @classmethod
    def of(cls, phrases: Iterable[str]) -> BannedPhrases:
        # Longest first, so "skip verification" wins over "skip".
        names = sorted({" ".join(p.split()).casefold() for p in phrases if p.strip()}, key=lambda p: (-len(p), p))
        if not names:
            raise ValueError("bannedPhrases: every phrase is blank; give at least one non-blank phrase")
        folded, literal = [], []
        for name in names:
            alternative = _alternative(policy_view(name).text)  # type: ignore[arg-type]
            if alternative is None:
                literal.append(name)
            else:
                folded.append((name, alternative))
        pattern = None
        if folded:
            body = "|".join(f"({alternative})" for _, alternative in folded)
            pattern = re.compile(rf"(?<!\w)(?:{body})(?!\w)")
        literal_rx = None
        if literal:
            words = [r"\s+".join(re.escape(w) for w in p.split(" ")) for p in literal]
            literal_rx = re.compile(r"(?<!\w)(?:" + "|".join(words) + r")(?!\w)", re.IGNORECASE)
        return cls(pattern, tuple(name for name, _ in folded), literal_rx)

    def find(self, text: str, view: View | None = None) -> list[PhraseHit]:
        """Matches in `text`; `view` is its `policy_view` when the caller has it already."""
        hits = []
        if self.pattern is not None:
            view = view if view is not None else policy_view(text)
            vt = view.text
            assert isinstance(vt, str)
            for m in self.pattern.finditer(vt):
                assert m.lastindex is not None
                hits.append(PhraseHit(self.phrases[m.lastindex - 1], *view.span(m.start(), m.end())))
        if self.literal is not None:
            hits.extend(
                PhraseHit(" ".join(m.group().split()).casefold(), m.start(), m.end())
                for m in self.literal.finditer(text)
            )
        return hits


@dataclass(slots=True)
class PhraseHit:
    phrase: str
    start: int
    end: int
