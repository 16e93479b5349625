"""The alerting rules (SPEC §8): checked and unit-tested with promtool, and kept in step
with the metrics the components really export and with the runbooks in docs/alerts.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from fleetward.devcluster.layout import binaries
from tests.support.metrics import metric_names, undeclared

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts/fleetward/monitoring/rules.yaml"
RULE_TESTS = ROOT / "tests/rules/rules.test.yaml"
RUNBOOKS = ROOT / "docs/alerts.md"


def _alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binaries().promtool), *args], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120
    )


def test_the_rule_file_is_valid_for_prometheus():
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_every_alert_behaves_as_its_promtool_cases_say():
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_where_it_fires():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        check["alertname"] for case in cases for check in case.get("alert_rule_test", []) if check.get("exp_alerts")
    }
    missing = sorted({a["alert"] for a in _alerts()} - fired)
    assert not missing, f"alerts without a promtool case that fires: {missing}"


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section():
    runbooks = RUNBOOKS.read_text()
    headings = {line[4:].strip() for line in runbooks.splitlines() if line.startswith("### ")}
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"], name
        assert alert["annotations"]["runbook"] == f"docs/alerts.md#{name.lower()}", name
        assert name in headings, f"docs/alerts.md has no '### {name}' section"


def test_every_metric_a_rule_reads_is_exported_by_a_component():
    missing = undeclared(metric_names(RULES.read_text()))
    assert not missing, f"rules read metrics no component declares: {missing}"
