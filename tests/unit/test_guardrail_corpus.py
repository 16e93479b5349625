"""The labelled corpus (tests/data/guardrail_corpus/corpus.jsonl) against the engine.

Goals (issue 6 §5): no labelled PII value survives a redacting Guardrail (0 leaks),
injection recall >= 99 %, false positives <= 2 % of the lines that hold no injection.
Precision/recall per category are printed (pytest -s) and recorded in docs/bench/guardrail.md.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fleetward.runtime.guardrails import GuardrailEngine

from fleetward.api.guardrail import GuardrailSpec

CORPUS = Path(__file__).resolve().parents[1] / "data" / "guardrail_corpus" / "corpus.jsonl"
PII_TYPES = ["email", "credit_card", "ip", "phone", "us_ssn", "iban", "api_key", "jwt"]
ENTITIES = [{"type": t, "strategy": "redact"} for t in PII_TYPES] + [
    {"type": "custom", "name": "employee_id", "detector": "EMP-[0-9]{6}", "strategy": "redact"}
]
REDACTING = GuardrailEngine([GuardrailSpec.model_validate({"pii": {"entities": ENTITIES}})])
INJECTION = GuardrailEngine([GuardrailSpec.model_validate({"injection": {"mode": "enforce", "action": "block"}})])


@pytest.fixture(scope="module")
def evaluation() -> dict:
    lines = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    tp, fn, fp = Counter(), Counter(), Counter()
    leaks, fp_lines, missed = [], [], []
    injection_hits = family_hits = injection_lines = clean_lines = 0
    by_obfuscation: Counter = Counter()
    by_obfuscation_hit: Counter = Counter()
    for line in lines:
        text = line["text"]
        redacted = REDACTING.scan(text, "input")
        injected = INJECTION.scan(text, "input")
        findings = list(redacted.findings)
        matched = set()
        for label in line["pii"]:
            hit = next(
                (f for f in findings if f.type == label["type"] and text[f.start : f.end] == label["value"]), None
            )
            if hit:
                tp[label["type"]] += 1
                matched.add(hit)
            else:
                fn[label["type"]] += 1
            if redacted.text is None or label["value"] in redacted.text:
                leaks.append((line["id"], label["value"]))
        unexpected = [f for f in findings if f not in matched]
        for f in unexpected:
            fp[f.type] += 1
        flagged = [f for f in injected.findings if f.kind == "injection"]
        if line["category"] == "injection":
            injection_lines += 1
            by_obfuscation[line["obfuscation"]] += 1
            if flagged:
                injection_hits += 1
                by_obfuscation_hit[line["obfuscation"]] += 1
                family_hits += any(f.type == line["injection"] for f in flagged)
            else:
                missed.append((line["id"], text))
        else:
            clean_lines += 1
            if flagged or unexpected:
                fp_lines.append(
                    (line["id"], text, [(f.kind, f.type, text[f.start : f.end]) for f in flagged + unexpected])
                )
    return {
        "lines": len(lines),
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "leaks": leaks,
        "fp_lines": fp_lines,
        "missed": missed,
        "injection_recall": injection_hits / injection_lines,
        "family_accuracy": family_hits / max(1, injection_hits),
        "fp_rate": len(fp_lines) / clean_lines,
        "clean_lines": clean_lines,
        "injection_lines": injection_lines,
        "by_obfuscation": {k: (by_obfuscation_hit[k], n) for k, n in sorted(by_obfuscation.items())},
    }


def test_corpus_is_big_enough_and_covers_every_category(evaluation):
    assert evaluation["lines"] >= 400
    assert set(evaluation["tp"]) >= {*PII_TYPES, "employee_id"}
    assert evaluation["injection_lines"] >= 100 and evaluation["clean_lines"] >= 200


def test_report_per_category(evaluation):
    print(f"\ncorpus: {evaluation['lines']} lines")
    for t in sorted(set(evaluation["tp"]) | set(evaluation["fn"]) | set(evaluation["fp"])):
        tp, fn, fp = evaluation["tp"][t], evaluation["fn"][t], evaluation["fp"][t]
        print(
            f"  pii {t:12} precision {tp / max(1, tp + fp):.3f}  recall {tp / max(1, tp + fn):.3f}  (tp {tp}, fp {fp}, fn {fn})"
        )
    print(
        f"  injection recall {evaluation['injection_recall']:.4f} over {evaluation['injection_lines']} lines, "
        f"family right {evaluation['family_accuracy']:.3f}"
    )
    for name, (hit, n) in evaluation["by_obfuscation"].items():
        print(f"    {name:20} {hit}/{n}")
    print(
        f"  false-positive lines {len(evaluation['fp_lines'])}/{evaluation['clean_lines']} = {evaluation['fp_rate']:.4f}"
    )
    for item in evaluation["fp_lines"]:
        print(f"    FP {item}")
    for item in evaluation["missed"]:
        print(f"    MISSED {item}")
    assert evaluation["tp"]  # the report ran over real findings


def test_no_pii_value_survives_redaction(evaluation):
    assert evaluation["leaks"] == []


def test_injection_recall_at_least_99_percent(evaluation):
    assert evaluation["injection_recall"] >= 0.99, evaluation["missed"]


def test_false_positives_at_most_2_percent(evaluation):
    assert evaluation["fp_rate"] <= 0.02, evaluation["fp_lines"]
