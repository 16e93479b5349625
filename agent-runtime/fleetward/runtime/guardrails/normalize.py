"""Text views used by the detectors, each with a map back to offsets in the input.

Three views exist:
- the PII view (`pii_view`): NFKC per character with invisible format characters removed, so
  a card number typed in fullwidth digits or an email split by zero-width spaces is still seen;
- the injection view (`injection_view`): ASCII bytes, lower-cased, look-alike letters folded to
  Latin, diacritics and invisible characters dropped, leetspeak digits read as letters;
- the policy view (`policy_view`): the injection view's folding as text, with white space,
  joiners ("-", "_", ".", ...) and other punctuation kept apart (banned phrases, policy.py).

Both are computed per character so every view position points back to one input position;
pure-ASCII text (the common case) takes a fast path without any per-character Python work.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Cyrillic and Greek letters that render like Latin ones (the subset of Unicode's
# confusables.txt that maps to ASCII letters and occurs in real prompt-injection attempts).
# A curated table rather than a dependency: the full confusables list is ~6,000 entries,
# almost all irrelevant to ASCII phrase matching, and NFKD already handles fullwidth,
# mathematical alphanumerics, ligatures and circled letters.
CONFUSABLES: dict[str, str] = {
    # Cyrillic lower case
    "а": "a",
    "в": "b",
    "е": "e",
    "ё": "e",
    "к": "k",
    "м": "m",
    "н": "h",
    "о": "o",
    "р": "p",
    "с": "c",
    "т": "t",
    "у": "y",
    "х": "x",
    "і": "i",
    "ї": "i",
    "ј": "j",
    "ѕ": "s",
    "ԁ": "d",
    "ԛ": "q",
    "ԝ": "w",
    "һ": "h",
    "ӏ": "l",
    "ɡ": "g",
    "ы": "bi",
    "ь": "b",
    "п": "n",
    "г": "r",
    "ѵ": "v",
    "ү": "y",
    "ҽ": "e",
    "ԍ": "g",
    # Cyrillic upper case
    "А": "a",
    "В": "b",
    "Е": "e",
    "Ё": "e",
    "К": "k",
    "М": "m",
    "Н": "h",
    "О": "o",
    "Р": "p",
    "С": "c",
    "Т": "t",
    "У": "y",
    "Х": "x",
    "І": "i",
    "Ї": "i",
    "Ј": "j",
    "Ѕ": "s",
    "Ԁ": "d",
    "Ԛ": "q",
    "Ԝ": "w",
    "Һ": "h",
    "Ӏ": "l",
    "Ү": "y",
    # Greek lower case
    "α": "a",
    "β": "b",
    "γ": "y",
    "ε": "e",
    "η": "n",
    "ι": "i",
    "κ": "k",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "τ": "t",
    "υ": "u",
    "χ": "x",
    "ω": "w",
    "ϲ": "c",
    "ϳ": "j",
    "ς": "s",
    # Greek upper case
    "Α": "a",
    "Β": "b",
    "Ε": "e",
    "Ζ": "z",
    "Η": "h",
    "Ι": "i",
    "Κ": "k",
    "Μ": "m",
    "Ν": "n",
    "Ο": "o",
    "Ρ": "p",
    "Τ": "t",
    "Υ": "y",
    "Χ": "x",
    "Ϲ": "c",
    # Latin look-alikes outside ASCII that NFKD leaves alone
    "ı": "i",
    "ȷ": "j",
    "ł": "l",
    "ø": "o",
    "đ": "d",
    "ħ": "h",
    "ß": "ss",
    "æ": "ae",
    "œ": "oe",
    "ɑ": "a",
    "ɩ": "i",
    "ɪ": "i",
    "ʀ": "r",
    "ᴀ": "a",
    "ʙ": "b",
    "ᴄ": "c",
    "ᴅ": "d",
    "ᴇ": "e",
    "ɢ": "g",
    "ʜ": "h",
    "ᴊ": "j",
    "ᴋ": "k",
    "ʟ": "l",
    "ᴍ": "m",
    "ɴ": "n",
    "ᴏ": "o",
    "ᴘ": "p",
    "ꜱ": "s",
    "ᴛ": "t",
    "ᴜ": "u",
    "ᴠ": "v",
    "ᴡ": "w",
    "ʏ": "y",
    "ᴢ": "z",
}

# Leetspeak digits and symbols read as letters in the injection view ("1gn0r3" -> "ignore").
# Only the common substitutions: every extra one turns more ordinary digits into letters.
LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
# The injection view's byte table: upper -> lower case, leet -> letters, and every other
# byte except a-z, 0-9, "_" and ":" -> space. With punctuation gone every word starts after a
# space, so the phrase regex can start with a literal space, which the regex engine finds
# with a fast substring search instead of testing every position.
_INJECTION_BYTES = bytes(
    (b + 32)
    if 65 <= b <= 90
    else ord(LEET[chr(b)])
    if chr(b) in LEET
    else b
    if (97 <= b <= 122 or 48 <= b <= 57 or b in b"_:")
    else 32
    for b in range(256)
)
# Everything except a-z, for the squashed view that defeats "i g n o r e" / "i.g.n.o.r.e".
_NON_LETTERS = bytes(b for b in range(256) if not 97 <= b <= 122)


@dataclass(frozen=True, slots=True)
class View:
    """A transformed text and, when it is not position-identical to the input, the input
    offset of every view position (`index[i]` = input offset of view position i)."""

    text: str | bytes
    index: list[int] | None = None

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The input span of view span [start, end)."""
        if self.index is None:
            return start, end
        if end <= start:
            pos = self.index[start] if start < len(self.index) else (self.index[-1] + 1 if self.index else 0)
            return pos, pos
        return self.index[start], self.index[end - 1] + 1


def _is_invisible(ch: str) -> bool:
    # Cf: zero-width space/joiners, soft hyphen, bidi controls, word joiner, BOM...
    return unicodedata.category(ch) == "Cf"


@lru_cache(maxsize=4096)
def _pii_char(ch: str) -> str:
    if _is_invisible(ch):
        return ""
    return unicodedata.normalize("NFKC", ch)


@lru_cache(maxsize=4096)
def _injection_char(ch: str) -> str:
    if ch in CONFUSABLES:
        return CONFUSABLES[ch]
    if _is_invisible(ch):
        return ""
    out = []
    for part in unicodedata.normalize("NFKD", ch):
        if unicodedata.category(part) == "Mn":  # combining marks: "ïgnörë" -> "ignore"
            continue
        out.append(CONFUSABLES.get(part, part))
    folded = "".join(out).lower()
    # Anything still outside ASCII becomes one "?" per character (see `injection_view`).
    return folded


def _per_char_view(text: str, convert) -> tuple[str, list[int]]:
    pieces: list[str] = []
    index: list[int] = []
    for pos, ch in enumerate(text):
        if ch < "\x80":
            pieces.append(ch)
            index.append(pos)
            continue
        rep = convert(ch)
        pieces.append(rep)
        index.extend([pos] * len(rep))
    return "".join(pieces), index


def pii_view(text: str) -> View:
    """The text PII detectors run on. Identity for ASCII input."""
    if text.isascii():
        return View(text)
    view, index = _per_char_view(text, _pii_char)
    return View(view, index)


def injection_view(text: str) -> View:
    """Lower-cased, look-alike-folded, leet-decoded ASCII bytes for injection phrase matching,
    punctuation turned into spaces.

    Bytes rather than str: `bytes.lower`/`translate` run at C speed, which keeps the common
    ASCII path to about a microsecond per kilobyte.
    """
    if text.isascii():
        return View(text.encode("ascii").translate(_INJECTION_BYTES))
    view, index = _per_char_view(text, _injection_char)
    # One "?" (then a space) per remaining non-ASCII character keeps view and index aligned.
    data = view.encode("ascii", "replace").translate(_INJECTION_BYTES)
    return View(data, index)


# Policy view: white space -> " ", joiners (what people put inside a word to dodge a filter,
# "by-pass", "b.y.p.a.s.s", or between joined words, "skip_verification") -> "-", any other
# punctuation -> "|" (a hard break: "skip, verification" is two phrases' worth of words).
_POLICY_JOINERS = b"-_./\\*~+"
_POLICY_SPACES = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "  # str.isspace() in ASCII
_POLICY_BYTES = bytes(
    _INJECTION_BYTES[b]
    if 65 <= b <= 90 or 97 <= b <= 122 or 48 <= b <= 57 or chr(b) in LEET
    else 32
    if b in _POLICY_SPACES
    else 45
    if b in _POLICY_JOINERS
    else 124
    for b in range(256)
)
_POLICY_TABLE = {b: _POLICY_BYTES[b] for b in range(128)}


@lru_cache(maxsize=4096)
def _policy_char(ch: str) -> str:
    out = []
    for c in _injection_char(ch):
        if c < "\x80":
            out.append(chr(_POLICY_BYTES[ord(c)]))
            continue
        category = unicodedata.category(c)
        if category[0] in "LNM":
            out.append(c)  # a letter outside the tables (CJK, Arabic, ...): phrases may use it
        elif category[0] == "Z":
            out.append(" ")
        else:
            out.append("-" if category in ("Pd", "Pc") else "|")
    return "".join(out)


def policy_view(text: str) -> View:
    """Lower-cased, look-alike-folded, leet-decoded text for banned phrases: letters and digits,
    " " for white space, "-" for joiners, "|" for other punctuation. Same length as `text` for
    ASCII text."""
    if text.isascii():
        return View(text.encode("ascii").translate(_POLICY_BYTES).decode("ascii"))
    view, index = _per_char_view(text, _policy_char)
    return View(view.translate(_POLICY_TABLE), index)  # the ASCII characters, kept as is above


@dataclass(frozen=True, slots=True)
class SquashedView:
    """Letters only: "i g n o r e", "i.g.n.o.r.e" and "ig-no-re" all become "ignore".

    The map back to the input is built only when something matched (it costs a Python loop).
    """

    text: bytes
    source: View

    def span(self, start: int, end: int) -> tuple[int, int]:
        data = self.source.text
        assert isinstance(data, bytes)
        letters = [i for i, b in enumerate(data) if 97 <= b <= 122]
        return self.source.span(letters[start], letters[end - 1] + 1)


# Token view: bytes of key-ish characters kept, everything else a space (see detectors.py).
_TOKEN_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_.-"
_TOKEN_BYTES = bytes(b if b in _TOKEN_CHARS else 32 for b in range(256))


def token_view(text: str) -> bytes:
    """Same length as `text`; key-ish ASCII characters kept, all others a space."""
    return text.encode("ascii", "replace").translate(_TOKEN_BYTES)


def squash(view: View) -> SquashedView:
    data = view.text
    assert isinstance(data, bytes)
    return SquashedView(data.translate(None, _NON_LETTERS), view)
