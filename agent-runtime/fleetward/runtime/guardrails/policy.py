"""Banned phrases (Guardrail `policy.bannedPhrases`).

Matching is case-insensitive, on whole words (a phrase "bypass" does not match "bypassed":
list inflections explicitly), and whitespace-normalised (any run of whitespace between the
words of a phrase matches, line breaks included). Text with non-ASCII characters is also
matched in its NFKC form, so fullwidth or ligature spellings do not slip through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fleetward.runtime.guardrails.normalize import View


def compile_phrases(phrases: Iterable[str]) -> re.Pattern[str]:
    """One alternation for all phrases, longest first so "skip verification" wins over "skip"."""
    words = sorted({" ".join(p.split()).casefold() for p in phrases if p.strip()}, key=lambda p: (-len(p), p))
    if not words:
        raise ValueError("bannedPhrases: every phrase is blank; give at least one non-blank phrase")
    alternatives = [r"\s+".join(re.escape(w) for w in phrase.split(" ")) for phrase in words]
    # (?<!\w) / (?!\w) rather than \b: a phrase may start or end with punctuation ("2FA!").
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


@dataclass(slots=True)
class PhraseHit:
    phrase: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class BannedPhrases:
    pattern: re.Pattern[str]

    @classmethod
    def of(cls, phrases: Iterable[str]) -> BannedPhrases:
        return cls(compile_phrases(phrases))

    def find(self, text: str, normalized: View | None) -> list[PhraseHit]:
        hits = [
            PhraseHit(" ".join(m.group().split()).casefold(), m.start(), m.end()) for m in self.pattern.finditer(text)
        ]
        if normalized is not None:
            nt = normalized.text
            assert isinstance(nt, str)
            for m in self.pattern.finditer(nt):
                s, e = normalized.span(m.start(), m.end())
                hits.append(PhraseHit(" ".join(m.group().split()).casefold(), s, e))
        return hits
