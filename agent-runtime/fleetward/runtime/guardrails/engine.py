"""The guardrail engine: Guardrail specs in, one verdict per text and stage out.

    engine = GuardrailEngine([spec_a, spec_b], hash_key=b"...")
    result = engine.scan(text, "input")   # -> ScanResult(verdict, text, findings)

The same engine runs in the agent runtime and behind `fleetward guardrail scan`. Its scans
of ASCII text run in the compiled core (core.py); the Python code below and in the detector
modules is the reference it is tested against and handles what the core hands back.

Composition of several Guardrails (all apply):
- verdict: block beats escalate beats allow;
- PII: every entity of every Guardrail whose `applyTo` has the stage; the same built-in type
  configured twice gets the strictest strategy (block > redact > hash > mask);
- injection: built-in detection runs once if any Guardrail has it on; each Guardrail in
  `enforce` mode whose built-in or own patterns matched adds its `action`; `observe` only
  records findings;
- policy and limits: each Guardrail's own action.

Where each part applies (the spec leaves it open; decided here):
- PII: the stages in `pii.applyTo`;
- injection: `input` and `toolResults` (text that flows *into* the model; indirect
  injection arrives in tool results); not `output`;
- policy (`bannedPhrases`): the stages in `policy.applyTo` (default input and output: a
  request asking how to bypass a check is escalated or blocked like an answer saying how);
- limits: `maxInputChars` on `input`, `maxOutputChars` on `output`. A text over the limit is
  blocked without being scanned further (no work is spent on oversized input).

A Guardrail's own regular expressions (PII `detector`, `injection.patterns[]`) run with a match
budget (userregex.py). One that runs out of it on a text fails closed: it counts as matching
the whole text, a finding of its own kind and type (`pii`/its label, `injection`/
`custom_pattern`) over [0, len(text)), so the entity's strategy or the injection action applies
to all of it (an injection Guardrail in `observe` mode only records it).

Strategies (see `render`): redact -> `[REDACTED_EMAIL]` (custom entity: its name upper-cased,
`[REDACTED_CUSTOM]` when it has none: unnamed custom entities all report the type `custom`
and, like any type configured twice, share the strictest of their strategies);
mask -> keep what identifies the least (email: the domain; card, phone, SSN, IBAN: the last 4
digits/characters; IPv4: the last octet; IPv6: the last group; API key: the provider prefix
and the last 4; others: the last 4 when the value has at least 10 characters); hash ->
`<email_hash:1a2b3c4d>`, the first 8 hex digits of HMAC-SHA256(installation key, value) when
the engine has a key, of SHA-256(value) otherwise (unkeyed short hashes of small spaces such
as SSNs can be reversed by brute force: give the engine a key in production). Values are
canonicalised before hashing (email lower-cased, card/phone/SSN digits only, IBAN without
spaces) so one person gets one pseudonym whatever the formatting.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from fleetward.runtime.guardrails import core
from fleetward.runtime.guardrails import injection as inj
from fleetward.runtime.guardrails.detectors import (
    BUILTIN_TYPES,
    PIIScanner,
    TokenRun,
    UserRegex,
    scan_token_runs,
)
from fleetward.runtime.guardrails.normalize import View, pii_view, policy_view
from fleetward.runtime.guardrails.policy import BannedPhrases
from fleetward.runtime.guardrails.userregex import GuardrailRegex

from fleetward.api.guardrail import GuardrailSpec

Stage = Literal["input", "output", "toolResults"]
Verdict = Literal["allow", "block", "escalate"]
Strategy = Literal["redact", "mask", "hash", "block"]
STAGES: tuple[Stage, ...] = ("input", "output", "toolResults")
INJECTION_STAGES = frozenset({"input", "toolResults"})
_VERDICT_RANK = {"allow": 0, "escalate": 1, "block": 2}
# Strictest first: what two Guardrails configuring the same type end up with.
STRATEGY_RANK = {"mask": 0, "hash": 1, "redact": 2, "block": 3}


class GuardrailConfigError(ValueError):
    """A Guardrail the engine cannot run (e.g. a regular expression that does not compile)."""


@dataclass(slots=True, unsafe_hash=True)  # hashable for de-duplication; not frozen: 4x cheaper to create
class Finding:
    kind: Literal["pii", "injection", "policy", "limit"]
    type: str
    start: int
    end: int

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "type": self.type, "start": self.start, "end": self.end}


@dataclass(frozen=True, slots=True)
class ScanResult:
    verdict: Verdict
    text: str | None
    """The text after redaction/masking/hashing; None when blocked."""
    findings: tuple[Finding, ...]


@dataclass(frozen=True, slots=True)
class _InjectionPolicy:
    name: str
    mode: Literal["enforce", "observe"]
    action: Literal["block", "escalate"]
    custom: inj.CustomPatterns | None


@dataclass(frozen=True, slots=True)
class _PolicyRule:
    name: str
    phrases: BannedPhrases
    action: Literal["block", "escalate"]


@dataclass(slots=True)
class _StagePlan:
    scanner: PIIScanner | None = None
    strategies: dict[str, Strategy] = field(default_factory=dict)
    injections: list[_InjectionPolicy] = field(default_factory=list)
    policies: list[_PolicyRule] = field(default_factory=list)
    limit: tuple[str, int] | None = None
    builtin_types: list[str] = field(default_factory=list)
    """The built-in PII types scanned for (sorted)."""
    ascii_fast_path: bool = True
    """No Guardrail regex among the PII entities: the compiled core's one-call scan applies."""

    @property
    def builtin_injection(self) -> bool:
        return bool(self.injections)


class GuardrailEngine:
    """Scans texts against one or more Guardrail specs. Thread-safe; build once, reuse."""

    def __init__(
        self,
        specs: Sequence[GuardrailSpec],
        *,
        names: Sequence[str] | None = None,
        hash_key: bytes | None = None,
    ) -> None:
        if names is not None and len(names) != len(specs):
            raise ValueError("names must give one name per spec")
        self.names = list(names) if names is not None else [f"guardrail[{i}]" for i in range(len(specs))]
        self._hash_key = hash_key
        self._plans: dict[str, _StagePlan] = {stage: _build_plan(stage, specs, self.names) for stage in STAGES}

    def scan(self, text: str, stage: Stage = "input") -> ScanResult:
        plan = self._plans.get(stage)
        if plan is None:
            raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
        findings: list[Finding] = []
        verdict: Verdict = "allow"

        if plan.limit is not None:
            limit_name, limit = plan.limit
            if len(text) > limit:
                return ScanResult("block", None, (Finding("limit", limit_name, limit, len(text)),))

        # PII candidates as (type, start, end, value); value None means text[start:end].
        candidates: list[tuple[str, int, int, str | None]] = []
        builtin_hits: list[tuple[str, int, int]] = []
        normalized: View | None = None
        compiled = core.active()
        fast = None
        if compiled is not None and plan.ascii_fast_path and text.isascii():
            # ASCII text (views are the text itself), no Guardrail regexes among the PII
            # entities: the compiled core does the PII and built-in injection scans in one call.
            try:
                fast = compiled.scan_ascii(text, plan.builtin_types, plan.builtin_injection)
            except core.LimitError:
                pass  # pathological text: the step-by-step path below (see core.LimitError)
        if fast is not None:
            candidates = [(t, s, e, None) for t, s, e in fast[0]]
            builtin_hits = fast[1]
        else:
            runs: list[TokenRun] | None = None
            if plan.scanner is not None:
                out = plan.scanner.scan(text, want_runs=plan.builtin_injection)
                candidates = [(c.type, c.start, c.end, c.value) for c in out.candidates]
                normalized = out.view if out.view.index is not None else None
                # The scanner's token runs are in its (NFKC) view's offsets; reuse them only when
                # that view is the input itself (ASCII text), else find them again on the input.
                runs = out.runs if normalized is None else None
            elif not text.isascii() and any(p.custom for p in plan.injections):
                view = pii_view(text)
                normalized = view if view.index is not None else None
            if plan.injections:
                if runs is None:
                    runs = scan_token_runs(text)
                builtin_hits = [(hit.family, hit.start, hit.end) for hit in inj.detect_builtin(text, runs)]

        for pii_type, start, end, _ in candidates:
            findings.append(Finding("pii", pii_type, start, end))
            if plan.strategies[pii_type] == "block":
                verdict = "block"

        if plan.injections:
            for family, start, end in builtin_hits:
                findings.append(Finding("injection", family, start, end))
            for policy in plan.injections:
                own = policy.custom.find(text, normalized) if policy.custom else []
                for hit in own:
                    findings.append(Finding("injection", hit.family, hit.start, hit.end))
                if policy.mode == "enforce" and (builtin_hits or own):
                    verdict = _worst(verdict, policy.action)

        policy_text = policy_view(text) if plan.policies else None
        for rule in plan.policies:
            hits = rule.phrases.find(text, policy_text)
            for hit in hits:
                findings.append(Finding("policy", hit.phrase, hit.start, hit.end))
            if hits:
                verdict = _worst(verdict, rule.action)

        if len(findings) > 1 and (len(findings) > len(candidates) or normalized is not None):
            # PII findings in ASCII text are unique and in order by construction (resolved,
            # non-overlapping); the others may repeat (built-in and a Guardrail's own pattern
            # on the same span) and interleave: dict.fromkeys de-duplicates in order, then sort.
            findings = sorted(dict.fromkeys(findings), key=_finding_order)
        if verdict == "block":
            return ScanResult("block", None, tuple(findings))
        return ScanResult(verdict, self._apply(text, candidates, plan.strategies), tuple(findings))

    def _apply(
        self, text: str, candidates: list[tuple[str, int, int, str | None]], strategies: dict[str, Strategy]
    ) -> str:
        if not candidates:
            return text
        pieces: list[str] = []
        pos = 0
        for pii_type, start, end, value in candidates:  # sorted, non-overlapping
            pieces.append(text[pos:start])
            strategy = strategies[pii_type]
            if strategy == "redact":  # the common case; needs no value
                pieces.append(f"[REDACTED_{pii_type.upper()}]")
            else:
                pieces.append(render(pii_type, text[start:end] if value is None else value, strategy, self._hash_key))
            pos = end
        pieces.append(text[pos:])
        return "".join(pieces)


def _finding_order(f: Finding) -> tuple[int, int, str, str]:
    return (f.start, f.end, f.kind, f.type)


def _worst(a: Verdict, b: Verdict) -> Verdict:
    return a if _VERDICT_RANK[a] >= _VERDICT_RANK[b] else b


def _build_plan(stage: Stage, specs: Sequence[GuardrailSpec], names: Sequence[str]) -> _StagePlan:
    plan = _StagePlan()
    builtin: set[str] = set()
    user_regexes: list[UserRegex] = []
    for name, spec in zip(names, specs, strict=True):
        if spec.pii is not None and stage in spec.pii.apply_to:
            for i, entity in enumerate(spec.pii.entities):
                where = f"{name}: spec.pii.entities[{i}]"
                label = entity.label
                if entity.type == "custom" and not entity.detector:
                    raise GuardrailConfigError(f"{where}: a custom entity needs 'detector'")
                if entity.detector is not None:
                    user_regexes.append(UserRegex(label, compile_user_regex(entity.detector, f"{where}.detector")))
                else:
                    builtin.add(entity.type)
                previous = plan.strategies.get(label)
                if previous is None or STRATEGY_RANK[entity.strategy] > STRATEGY_RANK[previous]:
                    plan.strategies[label] = entity.strategy
        if spec.injection is not None and spec.injection.mode != "off" and stage in INJECTION_STAGES:
            patterns = tuple(
                compile_user_regex(p, f"{name}: spec.injection.patterns[{i}]")
                for i, p in enumerate(spec.injection.patterns or ())
            )
            plan.injections.append(
                _InjectionPolicy(
                    name, spec.injection.mode, spec.injection.action, inj.CustomPatterns(patterns) if patterns else None
                )
            )
        if spec.policy is not None and stage in spec.policy.apply_to:
            try:
                phrases = BannedPhrases.of(spec.policy.banned_phrases)
            except ValueError as e:
                raise GuardrailConfigError(f"{name}: spec.policy.{e}") from e
            plan.policies.append(_PolicyRule(name, phrases, spec.policy.action))
        if spec.limits is not None:
            limit = None
            if stage == "input" and spec.limits.max_input_chars is not None:
                limit = ("maxInputChars", spec.limits.max_input_chars)
            elif stage == "output" and spec.limits.max_output_chars is not None:
                limit = ("maxOutputChars", spec.limits.max_output_chars)
            if limit is not None and (plan.limit is None or limit[1] < plan.limit[1]):
                plan.limit = limit  # the smallest limit of all Guardrails wins
    if plan.strategies:
        plan.builtin_types = sorted(builtin & set(BUILTIN_TYPES))
        plan.scanner = PIIScanner(builtin=plan.builtin_types, user_regexes=user_regexes)
        plan.ascii_fast_path = not user_regexes
    return plan


def compile_user_regex(pattern: str, where: str) -> GuardrailRegex:
    """A Guardrail's own regular expression (a PII `detector`, an `injection.patterns[]`
    entry), compiled in the one dialect the API defines (`compile_pattern`, which the
    operator's admission webhook checks with as well, and which refuses patterns that
    backtrack catastrophically) and run with a match budget (userregex.py); errors name
    `where`."""
    try:
        return GuardrailRegex(pattern)
    except re.error as e:
        raise GuardrailConfigError(f"{where}: invalid regular expression {pattern!r}: {e}") from e


# --------------------------------------------------------------------------- strategies

_API_KEY_PREFIX = re.compile(
    r"^(?:sk-ant-[a-z]+[0-9]*-|sk-(?:proj|svcacct|admin)-|sk-|[sr]k_(?:live|test)_|gh[pousr]_|github_pat_"
    r"|xox[a-z]-|xapp-|glpat-|hf_|AKIA|ASIA|ABIA|ACCA|AIza)"
)
_DIGIT = re.compile(r"[0-9]")
_ALNUM = re.compile(r"[0-9A-Za-z]")


def render(label: str, value: str, strategy: Strategy, hash_key: bytes | None = None) -> str:
    """The replacement for one detected value (strategy `block` never reaches here)."""
    if strategy == "redact":
        return f"[REDACTED_{label.upper()}]"
    if strategy == "hash":
        # surrogatepass: text from JSON may hold a lone surrogate ("\ud800"), which strict UTF-8
        # refuses; a Guardrail regex can match one. The hash stays stable and distinct.
        canonical = _canonical(label, value).encode("utf-8", "surrogatepass")
        if hash_key:
            digest = hmac.new(hash_key, canonical, hashlib.sha256).hexdigest()
        else:
            digest = hashlib.sha256(canonical).hexdigest()
        return f"<{label}_hash:{digest[:8]}>"
    if strategy == "mask":
        return mask(label, value)
    raise ValueError(f"strategy {strategy!r} does not transform text")


def _keep_last(value: str, pattern: re.Pattern[str], keep: int = 4) -> str:
    """Star every character `pattern` matches except the last `keep` of them."""
    total = len(pattern.findall(value))
    seen = 0

    def star(m: re.Match[str]) -> str:
        nonlocal seen
        seen += 1
        return m.group() if seen > total - keep else "*"

    return pattern.sub(star, value)


def mask(label: str, value: str) -> str:
    if label == "email":
        return "****@" + value.rpartition("@")[2]
    if label in ("credit_card", "phone", "us_ssn"):
        return _keep_last(value, _DIGIT)
    if label == "iban":
        return _keep_last(value, _ALNUM)
    if label == "ip":
        if ":" in value:
            return "****:" + value.rpartition(":")[2]
        return "*.*.*." + value.rpartition(".")[2]
    if label == "api_key":
        prefix = _API_KEY_PREFIX.match(value)
        return (prefix.group() if prefix else "") + "****" + value[-4:]
    return "****" + value[-4:] if len(value) >= 10 else "****"


def _canonical(label: str, value: str) -> str:
    if label == "email":
        return value.lower()
    if label in ("credit_card", "us_ssn"):
        return "".join(_DIGIT.findall(value))
    if label == "phone":
        digits = "".join(_DIGIT.findall(value))
        return "+" + digits if value.lstrip().startswith("+") else digits
    if label == "iban":
        return value.replace(" ", "").upper()
    if label == "ip":
        return value.lower()
    return value
