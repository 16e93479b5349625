"""Guardrail: input, output and tool-result protection, composed onto agents by reference."""

from __future__ import annotations

import re
from re import _compiler as _sre_compiler
from re import _constants as _sre
from re import _parser as _sre_parse
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from fleetward.api.base import (
    AGE_COLUMN,
    READY_COLUMN,
    ApiModel,
    PrinterColumn,
    Resource,
    ResourceKind,
    ResourceStatus,
    cel,
    validations,
)

PIIType = Literal["email", "credit_card", "ip", "phone", "us_ssn", "iban", "api_key", "jwt", "custom"]
PIIStrategy = Literal["redact", "mask", "hash", "block"]
ApplyTo = Literal["input", "output", "toolResults"]
Pattern = Annotated[str, Field(min_length=1, max_length=1024)]
Phrase = Annotated[str, Field(min_length=1, max_length=256)]

CUSTOM_LABEL = "custom"
"""The finding/placeholder type of a custom entity without a `name` ([REDACTED_CUSTOM])."""

REGEX_DIALECT = "a regular expression in Python `re` syntax"
"""What the regular-expression fields (`pii.entities[].detector`, `injection.patterns[]`)
accept, in words, for error messages."""


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The one definition of the regular-expression dialect of a Guardrail's patterns: the
    agent runtime's guardrail engine, its PII middleware and the operator's admission
    webhook all compile them here (Python `re`, no flags). Raises re.error, also for a
    pattern whose backtracking can take exponential time (`catastrophic_backtracking`) and for
    a repetition bound above MAX_REPEAT (the engines that run these patterns with a match
    budget take no more); callers name the field in their message."""
    compiled = re.compile(pattern)
    problem = catastrophic_backtracking(compiled)
    if problem is not None:
        raise re.error(problem)
    return compiled


MAX_REPEAT = 65535
"""The largest repetition bound ({n}, {m,n}) a Guardrail pattern may use (PCRE2's limit), also
for the product of nested bounds ((?:a{1000}){1000} makes an engine copy the body 10^6 times)."""


# --- catastrophic backtracking --------------------------------------------------------------
# A repetition whose body can match the same text in several ways makes a backtracking engine
# try every way before it gives up on a text that does not match: `(a+)+$` on 40 a's and a "!"
# is 2^40 attempts. Refused here are the shapes that are reliably exponential: an unbounded
# repetition (or one of 10 and more) whose body
# - holds an unbounded repetition X and can match with X alone (everything else in the body is
#   optional or only matches characters X matches too): (a+)+, (a*)*, (\w+\s?)+, (x\w+)+,
#   (.*a){20};
# - starts its alternatives (after a common prefix, which `re` factors out) with characters two
#   of them share, an empty alternative starting what follows it: (a|aa)+, (\\.|[^"])*,
#   (foo|f\w+)+.
# Other slow patterns (polynomial ones such as \d+\d+\d+x, or ambiguities this misses) are
# stopped at scan time by the engine's match budget (fleetward.runtime.guardrails.userregex).
# Uses `re`'s own parser, so it reads the pattern exactly as `re` does.

_MANY = 10  # a bounded repetition this long counts as unbounded
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)
# Characters to compare character classes on: Latin-1 and Latin Extended, and one or two of
# each kind of character the classes distinguish beyond them.
_SAMPLE = [chr(c) for c in range(0x250)] + list("ΑαЖж٣٤\u2028\u3000中ｆ😀Kſ\ufffdⅫ")


def catastrophic_backtracking(compiled: re.Pattern[str]) -> str | None:
    """Why `compiled` can take exponential time to fail (or exceeds MAX_REPEAT), or None."""
    tree = _sre_parse.parse(compiled.pattern, compiled.flags)
    checker = _Backtracking(tree.state)
    return checker.walk(list(tree), tree.state.flags, 1)


class _Backtracking:
    def __init__(self, state: _sre_parse.State) -> None:
        self.state = state
        self.chars_cache: dict[tuple[str, int], frozenset[str]] = {}

    def walk(self, items: list, flags: int, scale: int) -> str | None:
        """`scale`: the product of the bounds of the repetitions `items` are nested in."""
        for op, av in items:
            inner_scale = scale
            if op in (*_REPEATS, _sre.POSSESSIVE_REPEAT):
                bound = max(av[0], 0 if av[1] == _sre.MAXREPEAT else av[1])
                inner_scale = scale * max(bound, 1)
                if inner_scale > MAX_REPEAT:
                    return (
                        f"repetition bounds above {MAX_REPEAT} ({bound}{f' nested in {scale}' if scale > 1 else ''}) "
                        "are not supported"
                    )
            if op in _REPEATS:
                _, high, body = av
                if high == _sre.MAXREPEAT or high >= _MANY:
                    problem = self.ambiguous(list(body), flags)
                    if problem:
                        return problem
            for sub, sub_flags in self.children(op, av, flags):
                problem = self.walk(sub, sub_flags, inner_scale)
                if problem:
                    return problem
        return None

    @staticmethod
    def children(op, av, flags: int) -> list[tuple[list, int]]:
        if op in (*_REPEATS, _sre.POSSESSIVE_REPEAT):
            return [(list(av[2]), flags)]
        if op is _sre.SUBPATTERN:
            return [(list(av[3]), (flags | av[1]) & ~av[2])]
        if op is _sre.BRANCH:
            return [(list(alt), flags) for alt in av[1]]
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            return [(list(av[1]), flags)]
        if op is _sre.ATOMIC_GROUP:
            return [(list(av), flags)]
        if op is _sre.GROUPREF_EXISTS:
            return [(list(p), flags) for p in av[1:] if p is not None]
        return []

    def ambiguous(self, body: list, flags: int) -> str | None:
        for inner, inner_flags in self.unbounded_inside(body, flags):
            if self.absorbed(body, inner, flags, self.chars([inner], inner_flags)):
                return (
                    "a repetition of a group that itself repeats without bound (like (a+)+, (a*)* or (\\w+\\s?)+) "
                    "can take exponential time on a text it does not match (catastrophic backtracking); make the "
                    "repetitions unambiguous (e.g. (\\w+\\s)+), possessive ((?:...)++) or atomic ((?>...))"
                )
        if self.overlapping_alternatives(body, flags):
            return (
                "a repetition of alternatives that can start with the same character (like (a|aa)+ or "
                '(\\\\.|[^"])*) can take exponential time on a text it does not match (catastrophic '
                'backtracking); make the alternatives exclusive (e.g. (\\\\.|[^"\\\\])*)'
            )
        return None

    def unbounded_inside(self, items: list, flags: int):
        """The unbounded repetitions in `items` (not inside look-arounds, atomic groups or
        possessive repetitions, which never give back what they matched)."""
        for item in items:
            op, av = item
            if op in _REPEATS and av[1] == _sre.MAXREPEAT:
                yield item, flags
            if op in (*_REPEATS, _sre.SUBPATTERN, _sre.BRANCH, _sre.GROUPREF_EXISTS):
                for sub, sub_flags in self.children(op, av, flags):
                    yield from self.unbounded_inside(sub, sub_flags)

    def absorbed(self, items: list, inner, flags: int, inner_chars: frozenset[str]) -> bool:
        """Whether the sequence `items`, which holds `inner`, can match with `inner` alone:
        every other item may be empty or only matches characters `inner` matches."""
        holder = None
        for item in items:
            if item is inner or self.holds(item, inner):
                holder = item
                continue
            if not self.nullable(item) and not self.chars([item], flags) <= inner_chars:
                return False
        if holder is None or holder is inner:
            return holder is not None
        op, av = holder
        return any(
            self.absorbed(sub, inner, sub_flags, inner_chars)
            for sub, sub_flags in self.children(op, av, flags)
            if any(i is inner or self.holds(i, inner) for i in sub)
        )

    def holds(self, item, inner) -> bool:
        op, av = item
        return any(i is inner or self.holds(i, inner) for sub, _ in self.children(op, av, 0) for i in sub)

    def overlapping_alternatives(self, body: list, flags: int) -> bool:
        """A top-level alternation of the body (after its common prefix) whose alternatives
        can start alike; an alternative that can be empty starts with what follows it, which
        for the last item is the next repetition of the body."""
        wrap = self.first(body, flags, frozenset())
        for i, (op, av) in enumerate(body):
            if op is _sre.SUBPATTERN and len(body) == 1:
                return self.overlapping_alternatives(list(av[3]), (flags | av[1]) & ~av[2])
            if op is _sre.BRANCH:
                follow = self.first(body[i + 1 :], flags, wrap)
                starts = [self.first(list(alt), flags, follow) for alt in av[1]]
                return any(a & b for j, a in enumerate(starts) for b in starts[j + 1 :])
            if not self.nullable((op, av)) and op not in (_sre.LITERAL, _sre.IN, _sre.ANY, _sre.NOT_LITERAL):
                return False  # only a plain prefix (what `re` factors out of alternatives) is skipped
        return False

    def first(self, items: list, flags: int, follow: frozenset[str]) -> frozenset[str]:
        """Characters a match of `items` can start with (`follow` when it can be empty)."""
        out: set[str] = set()
        for op, av in items:
            if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN):
                return frozenset(out | self.chars([(op, av)], flags))
            if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
                continue
            if op is _sre.GROUPREF:
                out.update(_SAMPLE)
            else:
                for sub, sub_flags in self.children(op, av, flags):
                    out |= self.first(sub, sub_flags, frozenset())
            if not self.nullable((op, av)):
                return frozenset(out)
        return frozenset(out | follow)

    def nullable(self, item) -> bool:
        return _sre_parse.SubPattern(self.state, [item]).getwidth()[0] == 0

    def chars(self, items: list, flags: int) -> frozenset[str]:
        """Sample characters the single-character items anywhere in `items` match."""
        out: set[str] = set()
        for op, av in items:
            if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN):
                key = (repr((op, av)), flags)
                if key not in self.chars_cache:
                    one = _sre_parse.SubPattern(_sre_parse.State(), [(op, av)])
                    rx = _sre_compiler.compile(one, flags)
                    self.chars_cache[key] = frozenset(ch for ch in _SAMPLE if rx.match(ch))
                out |= self.chars_cache[key]
            elif op is _sre.GROUPREF:
                out.update(_SAMPLE)
            else:
                for sub, sub_flags in self.children(op, av, flags):
                    out |= self.chars(sub, sub_flags)
        return frozenset(out)


class PIIEntity(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.type != 'custom' || has(self.detector)",
                "a custom PII entity needs 'detector' (a regular expression)",
            )
        )
    )

    type: PIIType
    """Built-in detector (credit_card is Luhn-checked; ip covers v4 and v6) or custom."""
    strategy: PIIStrategy = "redact"
    """redact: replace with [REDACTED_TYPE]; mask: keep the last 4 characters; hash: stable
    hash; block: refuse the whole message."""
    name: str | None = Field(default=None, min_length=1, max_length=63, pattern=r"^[a-z][a-z0-9_]*$")
    """Optional label for a custom entity, used in findings, placeholders and metrics; without
    it the label is `custom` ([REDACTED_CUSTOM]). Entities with the same label share the
    strictest of their strategies."""
    detector: str | None = Field(default=None, min_length=1, max_length=1024)
    """Regular expression (Python `re` syntax); required for custom, replaces the built-in
    detector otherwise."""

    @property
    def label(self) -> str:
        """The type findings and placeholders carry: the built-in type, or for a custom
        entity its name (`custom` when it has none)."""
        if self.type == "custom":
            return self.name or CUSTOM_LABEL
        return self.type


class PIIConfig(ApiModel):
    entities: list[PIIEntity] = Field(min_length=1, max_length=32)
    apply_to: list[ApplyTo] = Field(
        default=["input", "output", "toolResults"],
        min_length=1,
        max_length=3,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Where detection runs. PII never reaches the model, logs or traces unredacted."""


def _mode_from_yaml_boolean(value: object) -> object:
    """`mode: off` unquoted is the boolean false to YAML 1.1 loaders (PyYAML, kubectl's): taken
    as "off". True (an unquoted on/yes/true) names no mode: refused with the values allowed."""
    if value is False:
        return "off"
    if value is True:
        raise PydanticCustomError(
            "literal_error",
            "Input should be 'enforce', 'observe' or 'off'; an unquoted on/yes/true is read by YAML as the "
            'boolean true: write the mode in quotes (mode: "enforce")',
        )
    return value


InjectionMode = Annotated[Literal["enforce", "observe", "off"], BeforeValidator(_mode_from_yaml_boolean)]


class InjectionConfig(ApiModel):
    mode: InjectionMode = "enforce"
    """enforce: act on detections; observe: only record them; off: disabled. An unquoted off,
    which YAML 1.1 (kubectl) reads as the boolean false, is stored as "off" by the operator's
    admission webhook; quoting it (mode: "off") works without one."""
    patterns: list[Pattern] | None = Field(default=None, max_length=64)
    """Extra regular expressions (Python `re` syntax), on top of the built-in detection of instruction
    override, role-play hijack, system-prompt extraction and tool coercion."""
    action: Literal["block", "escalate"] = "block"


class PolicyConfig(ApiModel):
    banned_phrases: list[Phrase] = Field(min_length=1, max_length=256)
    """Phrases that must not appear, e.g. bypass, circumvent, skip verification: any case,
    look-alike letters and spacing, joiners inside or between words (by-pass,
    skip_verification); a one-word phrase also matches the words it starts (bypassing)."""
    action: Literal["block", "escalate"] = "block"
    apply_to: list[ApplyTo] = Field(
        default=["input", "output"],
        min_length=1,
        max_length=3,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Where the phrases are looked for: the agent must not say them (output), and a request
    asking for them (input: "how do I bypass 2FA") is blocked or escalated to a person."""


class Limits(ApiModel):
    max_input_chars: int | None = Field(default=None, ge=1)
    max_output_chars: int | None = Field(default=None, ge=1)


class GuardrailSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.pii) || has(self.injection) || has(self.policy) || has(self.limits)",
                "a Guardrail needs at least one of pii, injection, policy or limits",
            )
        )
    )

    pii: PIIConfig | None = None
    injection: InjectionConfig | None = None
    policy: PolicyConfig | None = None
    limits: Limits | None = None


class GuardrailStatus(ResourceStatus):
    used_by: list[str] | None = None
    """Agents that reference this Guardrail."""


class Guardrail(Resource):
    KIND: ClassVar[ResourceKind] = ResourceKind(
        kind="Guardrail",
        plural="guardrails",
        scope="Namespaced",
        short_names=("grd", "fwguard"),
        description="PII, injection, policy and size protection applied to agents that reference it.",
        columns=(
            PrinterColumn("Injection", ".spec.injection.mode"),
            PrinterColumn("Policy", ".spec.policy.action"),
            READY_COLUMN,
            AGE_COLUMN,
        ),
    )

    kind: Literal["Guardrail"] = "Guardrail"
    spec: GuardrailSpec
    status: GuardrailStatus | None = None
