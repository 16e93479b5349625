"""A Guardrail's own regular expressions (a PII entity's `detector`, `injection.patterns[]`),
run with a match budget.

The dialect is Python's `re` (`fleetward.api.guardrail.compile_pattern`, which also refuses
the reliably exponential shapes such as `(a+)+`). Python's `re` cannot be stopped once a match
runs away (`(?s).*x$` over 200 KB takes it 20 s), so it never runs these patterns: each is
translated from `re`'s own parse tree into an equivalent pattern that
- the compiled core runs in PCRE2 (core.py; `UserRegex` in agent-runtime/guardrail-core) with
  MATCH_LIMIT backtracking steps at each start position and TIME_BUDGET for all searches of
  one pattern over one text (checked at every start position), and
- the pure-Python execution (and the core when PCRE2 cannot take a translation, e.g. nesting
  deeper than 250) runs in the `regex` module, with PYTHON_TIME_BUDGET per text.
Which texts exhaust a budget depends on the engine (each optimises some patterns the other
does not); on all others both find what `re.finditer` finds. The translation spells out every
character set as the code points `re` itself matches (`\\w`, `\\d`, `\\s`, `.`, letters in any
case, measured with `re`), and `^`, `$`, `\\b`, `\\B` as look-arounds, so neither engine's own
Unicode tables or options take part; matches are iterated as `re.finditer` does (after an empty
match, the next search may not be empty where it starts). Known differences: a case-insensitive
back-reference compares with the engine's case folding; lone surrogates (JSON "\\ud800") are
read as U+FFFD (same length: spans hold).

Over budget, the pattern counts as matching the whole text (fail closed): a PII entity redacts
(masks, hashes, blocks) all of it, an injection pattern makes it an injection finding over all
of it, which the Guardrail's action applies to. It is logged as a warning.
"""

from __future__ import annotations

import array
import logging
import re
import time
from functools import lru_cache
from re import _compiler as sre_compile
from re import _constants as sre
from re import _parser as sre_parse
from typing import Any

from fleetward.runtime.guardrails import core

from fleetward.api.guardrail import compile_pattern

log = logging.getLogger(__name__)

MATCH_LIMIT = 10_000_000
"""PCRE2 match limit at one start position (PCRE2's default; ~0.1 s of backtracking)."""
TIME_BUDGET = 0.1
"""Seconds for all PCRE2 searches of one pattern over one text (~40 ms suffice for 230 KB of
text and a pattern full of \\w and \\b)."""
PYTHON_TIME_BUDGET = 0.5
"""The same for the `regex` module, several times slower on big character sets."""

_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
_SURROGATE = re.compile("[\ud800-\udfff]")
_ONE_CHAR = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)
_IGNORECASE = sre.SRE_FLAG_IGNORECASE
_MULTILINE = sre.SRE_FLAG_MULTILINE
_DOTALL = sre.SRE_FLAG_DOTALL
_UNICODE = sre.SRE_FLAG_UNICODE  # set for every str pattern without (?a)
_CHARSET_FLAGS = sre.SRE_FLAG_ASCII | _UNICODE  # what \\w means (case does not change \\b)


class Untranslatable(ValueError):
    """A construct the translation has no exact equivalent for."""


Ranges = tuple[tuple[int, int], ...]


@lru_cache(maxsize=1)
def _all_code_points() -> str:
    # Every code point once (surrogates included: `re` can match them): what sets are measured on.
    return array.array("I", range(_MAX_CODE_POINT + 1)).tobytes().decode("utf-32-le", "surrogatepass")


_MEASURED: dict[tuple[str, int], Ranges] = {}


def _measured(item: Any, flags: int) -> Ranges:
    """The code points the one-character item matches under `flags`, asked of `re` itself
    (~30 ms the first time for a set; \\w, \\d, \\s are measured once per process)."""
    key = (repr(item), flags)
    if key not in _MEASURED:
        state = sre_parse.State()
        one = sre_parse.SubPattern(state, [item])
        tree = sre_parse.SubPattern(state, [(sre.MAX_REPEAT, (1, sre.MAXREPEAT, one))])
        rx = sre_compile.compile(tree, flags)
        _MEASURED[key] = tuple((m.start(), m.end() - 1) for m in rx.finditer(_all_code_points()))
    return _MEASURED[key]


@lru_cache(maxsize=1)
def _ascii_case_partners() -> dict[int, tuple[int, ...]]:
    """ASCII code point -> the other code points a case-insensitive `re` matches it with
    (both cases, and e.g. U+212A KELVIN SIGN for k, U+0131 dotless i for i)."""
    partners: dict[int, list[int]] = {c: [] for c in range(128)}
    candidates = [
        cp
        for lo, hi in _measured((sre.IN, [(sre.RANGE, (0, 127))]), _IGNORECASE | _UNICODE)
        for cp in range(lo, hi + 1)
    ]
    for c in range(128):
        rx = re.compile(re.escape(chr(c)), re.IGNORECASE)
        partners[c] = [cp for cp in candidates if cp != c and rx.fullmatch(chr(cp))]
    return {c: tuple(p) for c, p in partners.items()}


def _normalise(points: list[tuple[int, int]]) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(points):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _complement(ranges: Ranges) -> Ranges:
    out, pos = [], 0
    for lo, hi in ranges:
        if lo > pos:
            out.append((pos, lo - 1))
        pos = hi + 1
    if pos <= _MAX_CODE_POINT:
        out.append((pos, _MAX_CODE_POINT))
    return tuple(out)


def _members(item: Any, flags: int) -> Ranges:
    """The code points a one-character item (literal, set, `.`) matches under `flags`."""
    op, av = item
    ignorecase = flags & _IGNORECASE
    if op is sre.ANY:
        return ((0, _MAX_CODE_POINT),) if flags & _DOTALL else ((0, 9), (11, _MAX_CODE_POINT))
    if op in (sre.LITERAL, sre.NOT_LITERAL):
        members = ((av, av),)
        if ignorecase:
            members = _members((sre.IN, [(sre.LITERAL, av)]), flags)
        return _complement(members) if op is sre.NOT_LITERAL else members
    negate = bool(av) and av[0][0] is sre.NEGATE
    parts = av[1:] if negate else av
    simple: list[tuple[int, int]] = []
    for sub_op, sub_av in parts:
        if sub_op is sre.LITERAL:
            simple.append((sub_av, sub_av))
        elif sub_op is sre.RANGE:
            simple.append(sub_av)
        else:
            return _measured(item, flags)  # a category (\w, \d, \s): as `re` has it
    if ignorecase:
        if any(hi > 127 for _, hi in simple) or not flags & _UNICODE:
            return _measured(item, flags)
        partners = _ascii_case_partners()
        extra = [(p, p) for lo, hi in simple for c in range(lo, hi + 1) for p in partners[c]]
        simple += extra
    members = _normalise(simple)
    return _complement(members) if negate else members


class _Translator:
    """Emits one pattern for PCRE2 (UTF mode) or the `regex` module."""

    def __init__(self, target: str) -> None:
        self.pcre2 = target == "pcre2"

    def char(self, cp: int) -> str:
        return f"\\x{{{cp:x}}}" if self.pcre2 else f"\\U{cp:08x}"

    def charset(self, ranges: Ranges) -> str:
        parts = []
        for lo, hi in ranges:
            # PCRE2 in UTF mode has no surrogates; texts have U+FFFD in their place.
            pieces = [(lo, hi)]
            if self.pcre2 and lo <= _SURROGATES[1] and hi >= _SURROGATES[0]:
                pieces = [(a, b) for a, b in ((lo, _SURROGATES[0] - 1), (_SURROGATES[1] + 1, hi)) if a <= b]
            for a, b in pieces:
                parts.append(self.char(a) if a == b else f"{self.char(a)}-{self.char(b)}")
        if not parts:
            return "(?!)"
        if not self.pcre2 and len(parts) > 8 and ranges[0][0] < 128 and ranges[-1][1] >= 128:
            # The `regex` module is slow on a big set (~10x on \\w): ASCII characters take a small
            # one; the guard keeps the module from merging the two sets back into one.
            ascii_part = self.charset(tuple((lo, min(hi, 127)) for lo, hi in ranges if lo < 128))
            rest = self.charset(tuple((max(lo, 128), hi) for lo, hi in ranges if hi >= 128))
            return f"(?:{ascii_part}|(?=[^{self.char(0)}-{self.char(127)}]){rest})"
        return f"[{''.join(parts)}]"

    def word(self, flags: int) -> str:
        return self.charset(_members((sre.IN, [(sre.CATEGORY, sre.CATEGORY_WORD)]), flags & _CHARSET_FLAGS))

    def seq(self, items: Any, flags: int) -> str:
        return "".join(self.item(item, flags) for item in items)

    def item(self, item: Any, flags: int) -> str:
        op, av = item
        if op in _ONE_CHAR:
            ranges = _members(item, flags)
            if op is sre.LITERAL and len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                cp = ranges[0][0]
                if not (self.pcre2 and _SURROGATES[0] <= cp <= _SURROGATES[1]):
                    return self.char(cp)
            return self.charset(ranges)
        if op is sre.CATEGORY:
            return self.item((sre.IN, [item]), flags)
        if op is sre.BRANCH:
            return "(?:" + "|".join(self.seq(alt, flags) for alt in av[1]) + ")"
        if op is sre.SUBPATTERN:
            group, add, delete, body = av
            inner = self.seq(body, (flags | add) & ~delete)
            return f"({inner})" if group is not None else f"(?:{inner})"
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, body = av
            if low > 65535 or (high != sre.MAXREPEAT and high > 65535):
                raise Untranslatable("repetition bound above 65535")
            bounds = f"{{{low},}}" if high == sre.MAXREPEAT else f"{{{low},{high}}}"
            suffix = {sre.MAX_REPEAT: "", sre.MIN_REPEAT: "?", sre.POSSESSIVE_REPEAT: "+"}[op]
            return f"(?:{self.seq(body, flags)}){bounds}{suffix}"
        if op is sre.AT:
            return self.at(av, flags)
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            direction, body = av
            kind = ("=" if op is sre.ASSERT else "!") if direction == 1 else ("<=" if op is sre.ASSERT else "<!")
            return f"(?{kind}{self.seq(body, flags)})"
        if op is sre.ATOMIC_GROUP:
            return f"(?>{self.seq(av, flags)})"
        if op is sre.GROUPREF:
            ref = f"\\g{{{av}}}" if self.pcre2 else f"\\g<{av}>"
            return f"(?i:{ref})" if flags & _IGNORECASE else ref
        if op is sre.GROUPREF_EXISTS:
            group, yes, no = av
            return f"(?({group}){self.seq(yes, flags)}" + (f"|{self.seq(no, flags)})" if no is not None else ")")
        raise Untranslatable(f"unsupported construct {op}")

    def at(self, code: Any, flags: int) -> str:
        multiline = flags & _MULTILINE
        nl, end = self.char(10), "\\z"
        if code is sre.AT_BEGINNING:
            return f"(?:\\A|(?<={nl}))" if multiline else "\\A"
        if code is sre.AT_BEGINNING_STRING:
            return "\\A"
        if code is sre.AT_END:
            return f"(?={nl}|{end})" if multiline else f"(?={nl}?{end})"
        if code is sre.AT_END_STRING:
            return end
        if code in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
            w = self.word(flags)
            if code is sre.AT_BOUNDARY:
                return f"(?:(?<={w})(?!{w})|(?<!{w})(?={w}))"
            return f"(?:(?<={w})(?={w})|(?<!{w})(?!{w}))"
        raise Untranslatable(f"unsupported anchor {code}")


@lru_cache(maxsize=256)
def translate(pattern: str, flags: int, target: str) -> str:
    """`pattern` (Python `re` syntax, `flags`) for `target` "pcre2" or "regex"; same matches."""
    tree = sre_parse.parse(pattern, flags)
    return _Translator(target).seq(list(tree), tree.state.flags)


class GuardrailRegex:
    """A Guardrail regular expression with a match budget. `spans(text)` gives what
    `re.finditer` would find (non-empty matches), or None when the budget ran out."""

    __slots__ = ("_pcre2", "_regex", "pattern")

    def __init__(self, pattern: str | re.Pattern[str]) -> None:
        """`pattern`: a Guardrail's pattern (checked by `compile_pattern`: raises re.error) or a
        compiled one."""
        self.pattern = compile_pattern(pattern) if isinstance(pattern, str) else pattern
        self._pcre2: Any = None  # the compiled core's program, None without the core
        self._regex: Any = None  # the `regex` module's programs, built on first use
        module = core.module()
        if module is not None:
            try:
                body = translate(self.pattern.pattern, self.pattern.flags, "pcre2")
                self._pcre2 = module.UserRegex(body, MATCH_LIMIT)
            except (Untranslatable, ValueError):
                self._pcre2 = None  # beyond PCRE2's limits: the `regex` module runs it

    def spans(self, text: str) -> list[tuple[int, int]] | None:
        if not text.isascii() and _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", text)
        if self._pcre2 is not None and core.active() is not None:
            try:
                return self._pcre2.spans(text, int(TIME_BUDGET * 1000))
            except core.LimitError:
                return self._over_budget(text)
        return self._regex_spans(text)

    def _regex_spans(self, text: str) -> list[tuple[int, int]] | None:
        if self._regex is None:
            import regex  # a dependency of langchain-openai's tiktoken; only this path needs it

            try:
                body = translate(self.pattern.pattern, self.pattern.flags, "regex")
                # After an empty match, the next search may not end where it starts (re.finditer).
                self._regex = (regex.compile(body, regex.V0), regex.compile(f"(?:{body})(?!\\G)", regex.V0))
            except (Untranslatable, regex.error, MemoryError):  # not from compile_pattern's dialect
                return self._over_budget(text)
        first, advance = self._regex
        deadline = time.monotonic() + PYTHON_TIME_BUDGET
        out: list[tuple[int, int]] = []
        pos, must_advance = 0, False
        while pos <= len(text):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._over_budget(text)
            try:
                m = (advance if must_advance else first).search(text, pos, timeout=remaining)
            except TimeoutError:
                return self._over_budget(text)
            if m is None:
                break
            start, end = m.span()
            if end > start:
                out.append((start, end))
            must_advance, pos = end == start, end
        return out

    def _over_budget(self, text: str) -> None:
        shown = self.pattern.pattern if len(self.pattern.pattern) <= 80 else self.pattern.pattern[:80] + "..."
        log.warning(
            "guardrail regex %r ran out of its match budget on a text of %d characters: the text counts as matching it",
            shown,
            len(text),
        )
        return None
