"""A Guardrail's own regular expressions: catastrophic shapes refused where patterns are
admitted (compile_pattern: the API, the admission webhook, the engine, the CLI), everything
else run with a match budget that fails closed, and the translation that lets PCRE2 and the
`regex` module run them with `re`'s matches."""

from __future__ import annotations

import io
import json
import random
import re
import sys
import time

import pytest
from fleetward.operator.webhooks import guardrail_problems
from fleetward.runtime.guardrails import GuardrailConfigError, GuardrailEngine, core, pii_middleware, userregex
from fleetward.runtime.guardrails.detectors import regex_detector
from fleetward.runtime.guardrails.userregex import GuardrailRegex

from fleetward.api.guardrail import GuardrailSpec, catastrophic_backtracking, compile_pattern
from fleetward.cli.main import main

CATASTROPHIC = [
    r"(a+)+$",
    r"(a*)*b",
    r"(a|aa)+$",
    r"(?:(a|aa))+$",
    r"(a|a?)+$",
    r"(\w+\s?)+$",
    r"^(\s*\w+)*$",
    r"(?:[a-z]+ ?)+$",
    r"(x\w+)+$",
    r"(.*a){20}",
    r"(.*,)+$",
    r"(\\.|[^\"])*\"",
    r"(foo|f\w+)+$",
    r"(?:\d+\.?)+$",
    r"((a+)?)+$",
    r"(a+b?)+$",
    r"(?i)([A-Z][a-z]+)+$",
]

ORDINARY = [
    r"EMP-[0-9]{6}",
    r"ghp_[A-Za-z0-9]{20}",
    r"(?i)wire\s+the\s+money",
    r"(?i)act as (the )?githouse (staff|admin)",
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    r"(?:[a-z0-9]+(?:-[a-z0-9]+)*\.)+[a-z]{2,}",
    r"(?:\d{1,3}\.){3}\d{1,3}",
    r"(ab+)+",
    r"(\w+\s)+",
    r"([^,]*,)+",
    r"(?:[^\"\\]|\\.)*",
    r"(foo|bar)+",
    r"(?:foo|foobar)+",
    r"(\w|\d)+",  # `re` merges the alternatives into one set
    r"([A-Z][a-z]+)+",
    r"(\w+@\w+\.\w+\s*)+",
    r"(?:\s*,\s*\w+)*",
    r"(?:a++)+",
    r"(?>(a+))+",
    r"(a+){2}",
]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_shapes_are_refused(pattern):
    problem = catastrophic_backtracking(re.compile(pattern))
    assert problem is not None and "catastrophic backtracking" in problem
    with pytest.raises(re.error, match="catastrophic backtracking"):
        compile_pattern(pattern)


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_are_accepted(pattern):
    assert catastrophic_backtracking(re.compile(pattern)) is None
    compile_pattern(pattern)


def test_the_refused_shapes_are_really_exponential():
    # Why they are refused: each added character doubles (or so) the time `re` takes to fail.
    times = []
    for n in (14, 18):
        started = time.perf_counter()
        re.match(r"(a+)+$", "a" * n + "!")
        times.append(time.perf_counter() - started)
    assert times[1] > 4 * times[0]


def test_a_refusal_names_the_field_in_the_engine_the_webhook_and_the_cli(tmp_path):
    spec = {
        "injection": {"patterns": ["ok", "(a+)+$"]},
        "pii": {"entities": [{"type": "custom", "detector": "(a*)*b"}]},
    }
    with pytest.raises(GuardrailConfigError) as err:
        GuardrailEngine([GuardrailSpec.model_validate(spec)], names=["g"])
    assert "g: spec.pii.entities[0].detector: invalid regular expression '(a*)*b'" in str(err.value)
    assert "catastrophic backtracking" in str(err.value)
    assert [field for field, _ in guardrail_problems(spec)] == [
        "spec.pii.entities[0].detector",
        "spec.injection.patterns[1]",
    ]
    path = tmp_path / "g.yaml"
    path.write_text("kind: Guardrail\nmetadata: {name: g}\nspec:\n  injection: {patterns: ['(a+)+$']}\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"id": 1, "text": "' + b"a" * 40 + b'!"}\n')))
        mp.setattr(sys, "stdout", stdout)
        mp.setattr(sys, "stderr", stderr)
        code = main(["guardrail", "scan", "-f", str(path), "--stage", "input"])
    assert code == 2 and stdout.getvalue() == ""
    assert "g: spec.injection.patterns[0]: invalid regular expression '(a+)+$'" in stderr.getvalue()


@pytest.fixture(params=["compiled", "python"])
def execution(request):
    if request.param == "python":
        with core.reference_python():
            yield request.param
    else:
        yield request.param


@pytest.fixture
def unchecked(monkeypatch):
    """Admit any pattern (as a Guardrail stored before the check would be), and shorter
    budgets so the tests stay fast."""
    monkeypatch.setattr(userregex, "compile_pattern", re.compile)
    monkeypatch.setattr(userregex, "TIME_BUDGET", 0.05)
    monkeypatch.setattr(userregex, "PYTHON_TIME_BUDGET", 0.1)


def test_over_budget_an_injection_pattern_fails_closed(unchecked, execution, caplog):
    # `(a|aa)+$` on 40 a's and a "!": 10^8 years for `re`; either engine gives up within its budget.
    engine = GuardrailEngine([GuardrailSpec.model_validate({"injection": {"patterns": [r"(a|aa)+$"]}})])
    text = "a" * 60 + "!"
    started = time.perf_counter()
    result = engine.scan(text, "input")
    assert time.perf_counter() - started < 2
    assert result.verdict == "block"
    assert [(f.kind, f.type, f.start, f.end) for f in result.findings] == [("injection", "custom_pattern", 0, 61)]
    assert "ran out of its match budget" in caplog.text
    observed = GuardrailEngine(
        [GuardrailSpec.model_validate({"injection": {"mode": "observe", "patterns": [r"(a|aa)+$"]}})]
    )
    quiet = observed.scan(text, "input")
    assert quiet.verdict == "allow" and [f.type for f in quiet.findings] == ["custom_pattern"]


@pytest.mark.parametrize(
    ("strategy", "verdict", "rendered"), [("redact", "allow", "[REDACTED_TAG]"), ("block", "block", None)]
)
def test_over_budget_a_pii_detector_covers_the_whole_text(unchecked, execution, strategy, verdict, rendered):
    entity = {"type": "custom", "name": "tag", "detector": r"(a|aa)+$", "strategy": strategy}
    engine = GuardrailEngine([GuardrailSpec.model_validate({"pii": {"entities": [entity]}})])
    text = "a" * 60 + "!"
    result = engine.scan(text, "output")
    assert (result.verdict, result.text) == (verdict, rendered)
    assert [(f.kind, f.type, f.start, f.end) for f in result.findings] == [("pii", "tag", 0, 61)]
    # the runtime's LangChain middleware redacts the same
    detect = regex_detector("tag", GuardrailRegex(r"(a|aa)+$"))
    assert [(m["start"], m["end"]) for m in detect(text)] == [(0, 61)]


def test_a_quadratic_pattern_over_a_long_text_is_stopped(unchecked):
    # PCRE2's match limit restarts at every start position: only the time budget, checked at
    # each of them, stops this one (`re` takes ~20 s on 200 KB; the `regex` module optimises it).
    rx = GuardrailRegex(r"(?s).*x$")
    text = "fox " * 50_000
    started = time.perf_counter()
    assert rx.spans(text) is None
    assert time.perf_counter() - started < 1


def test_middleware_detectors_use_the_budget_too(unchecked):
    spec = GuardrailSpec.model_validate(
        {"pii": {"entities": [{"type": "custom", "name": "tag", "detector": r"(a|aa)+$"}], "applyTo": ["input"]}}
    )
    (middleware,) = pii_middleware([spec])
    assert [(m["type"], m["start"], m["end"]) for m in middleware.detector("a" * 60 + "!")] == [("tag", 0, 61)]


def test_long_texts_with_ordinary_patterns_stay_within_the_budget(execution):
    words = ["the", "quick", "brown", "fox", "refund", "order", "jane", "doe", "example", "com"]
    rng = random.Random(3)
    text = " ".join(rng.choice(words) for _ in range(10_000)) + " EMP-123456 wire the money"
    for pattern in [
        r"EMP-[0-9]{6}",
        r"(?i)wire\s+the\s+money",
        r".*refund.*order",
        r"\b[A-Z]{2}\d{6}\b",
        r"(\w+)\s+\1",
    ]:
        expected = [m.span() for m in re.finditer(pattern, text) if m.end() > m.start()]
        assert GuardrailRegex(pattern).spans(text) == expected, pattern


# The translation: what PCRE2 and the `regex` module find is what `re.finditer` finds.
TRANSLATED = [
    *ORDINARY,
    r"ghp_\w{8}",
    r"\bfoo\b",
    r"\Bo\B",
    r"^\w+$",
    r"(?m)^\w+$",
    r"(?m)^",
    r"$",
    r"(?m)$",
    r"\s+",
    r"\S+",
    r"\d+",
    r"\D+",
    r"\W+",
    r"(?i)k",
    r"(?i)[a-z]+",
    r"(?i)[^a-z]+",
    r"(?i)s",
    r"(?i)i",
    r"(?i)\u0130",
    r"(?i)[\u0100-\u017f]+",
    r"(?a)\w+",
    r"(?a)\b\w",
    r"(?s).",
    r".",
    r"a*",
    r"a*?",
    r"(a)|b",
    r"(\w)\1",
    r"(?P<x>a)(?P=x)",
    r"(a)?(?(1)b|c)",
    r"(?<=a)b",
    r"(?<!a)b",
    r"a(?=b)",
    r"a(?!b)",
    r"(?>a+)b",
    r"a++b",
    r"a{2,3}",
    r"a{2,}?",
    r"\Aab",
    r"ab\Z",
    r"(?x) a b # comment",
    r"(?i:A)b",
    r"[^\W\d_]+",
    r"(?i)é",
    r"(?i)ß",
    r"[é-ü]",
    r"[\x00-\x1f]",
    r"(?:)",
    r"|a",
    r"\b",
    r"\B",
    r"½|Ⅻ|²",
    r"[[:alpha:]]",
]
ALPHABET = [*'aAbBkKsSiI \n\t\x1c.-_,é\u0301ſKıİßẞ½Ⅻ²😀\u00a0\u2028xyz0123٣\ufffd"\\', "foo", "ab", "fo o"]


def _texts() -> list[str]:
    rng = random.Random(11)
    texts = ["", "a", "ab", "aab\n", "foo bar\nbaz\n", "ghp_abcdefgh1 EMP-123456", "Wire  THE money", "\ud800a\udfffb"]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25))) for _ in range(200)]
    return texts


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # [[:alpha:]] is a set of "[:alph"
@pytest.mark.parametrize("pattern", TRANSLATED)
def test_the_translation_finds_what_re_finds(pattern):
    compiled = re.compile(pattern)
    rx = GuardrailRegex(compiled)
    for text in _texts():
        expected = [
            m.span() for m in compiled.finditer(re.sub("[\ud800-\udfff]", "\ufffd", text)) if m.end() > m.start()
        ]
        assert rx.spans(text) == expected, (pattern, text)
        with core.reference_python():
            assert rx.spans(text) == expected, (pattern, text, "regex module")


def test_the_known_difference_is_case_insensitive_back_references_on_special_letters():
    # `re` compares lower-case forms; PCRE2 case-folds ("ſ" folds to "s", its lower case is itself).
    rx = GuardrailRegex(re.compile(r"(?i)(\w)\1"))
    assert rx.spans("sS ab") == [(0, 2)]
    assert [m.span() for m in re.finditer(r"(?i)(\w)\1", "sſ")] == []
    assert rx.spans("sſ") == [(0, 2)]


def test_a_lone_surrogate_reads_as_u_fffd():
    rx = GuardrailRegex(re.compile("TAG-."))
    assert rx.spans("x TAG-\udfff y") == [(2, 7)]


def test_cli_scan_with_a_budgeted_pattern_answers(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(
        "kind: Guardrail\nmetadata: {name: g}\nspec:\n"
        "  injection: {patterns: ['(?i)wire\\s+the\\s+money']}\n"
        "  pii: {entities: [{type: custom, name: emp, detector: 'EMP-[0-9]{6}'}]}\n"
    )
    stdout = io.StringIO()
    lines = [{"id": 1, "text": "please WIRE the  money, EMP-123456"}, {"id": 2, "text": "EMP-654321 only"}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(map(json.dumps, lines)).encode())))
        mp.setattr(sys, "stdout", stdout)
        assert main(["guardrail", "scan", "-f", str(path), "--stage", "input"]) == 0
    first, second = (json.loads(line) for line in stdout.getvalue().splitlines())
    assert first["verdict"] == "block"
    assert {(f["kind"], f["type"], f["start"], f["end"]) for f in first["findings"]} == {
        ("injection", "custom_pattern", 7, 22),
        ("pii", "emp", 24, 34),
    }
    assert (second["verdict"], second["text"]) == ("allow", "[REDACTED_EMP] only")


@pytest.mark.parametrize("pattern", [r"a{70000}", r"a{2,70000}", r"(?:a{1000}){1000}", r"(?:(?:ab){300}){300}"])
def test_repetition_bounds_above_what_the_engines_take_are_refused(pattern):
    with pytest.raises(re.error, match="repetition bounds above 65535"):
        compile_pattern(pattern)
    compile_pattern(r"(?:[a-z]{2,63}\.){1,10}a{65535}")
