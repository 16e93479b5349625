"""`fleetward llm serve` as a real process: startup line, answers, --record, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_openai import ChatOpenAI

from fleetward.cli.main import build_parser

SCENARIO = """
name: cli-demo
rules:
  - name: greet
    match: {lastUser: hello}
    respond: {content: "Hello from the CLI stand-in."}
"""


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleetward.cli.main", "llm", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(process: subprocess.Popen[str], seconds: float = 30) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    assert ready, f"no output within {seconds}s"
    return process.stdout.readline()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_records_and_stops_cleanly(tmp_path: Path, stop_signal: signal.Signals) -> None:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(SCENARIO)
    record = tmp_path / "requests.jsonl"
    process = start("--port", "0", "--scenario", str(scenario), "--record", str(record))
    try:
        line = read_line(process)
        assert "LLM stand-in (scripted, NOT a language model)" in line
        assert "1 scenario rule from cli-demo" in line
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line)
        assert found, line
        model = ChatOpenAI(base_url=found.group(1), api_key="sk-cli-secret", model="m", max_retries=0, timeout=10)
        assert model.invoke("hello").content == "Hello from the CLI stand-in."
        process.send_signal(stop_signal)
        rest, _ = process.communicate(timeout=15)
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            process.communicate()
    assert "stopping" in rest
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [(x["rule"]["name"], x["status"]) for x in lines] == [("greet", 200)]
    assert "sk-cli-secret" not in record.read_text()


def test_bad_scenario_exits_2_naming_rule_and_field(tmp_path: Path) -> None:
    scenario = tmp_path / "bad.yaml"
    scenario.write_text("rules:\n  - name: ok\n    respond: {content: x}\n  - name: typo\n    respnd: {content: y}\n")
    process = start("--port", "0", "--scenario", str(scenario))
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert f"{scenario}: rules[1] ('typo'): field respnd: Extra inputs are not permitted" in stderr
    assert "allowed here: name, match, respond, error, timeout, delaySeconds, holdSeconds, waitForGate, times" in stderr


def test_help_says_it_is_a_stand_in(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside the phrases asserted below
    with pytest.raises(SystemExit):
        build_parser().parse_args(["llm", "serve", "--help"])
    help_text = capsys.readouterr().out
    assert "A STAND-IN, not a model" in help_text
    assert "--scenario FILE_OR_DIR" in help_text and "default: 127.0.0.1" in help_text


def test_port_in_use_is_reported(tmp_path: Path) -> None:
    first = start("--port", "0")
    try:
        port = re.search(r":(\d+)/v1", read_line(first)).group(1)  # type: ignore[union-attr]
        second = start("--port", port)
        _, stderr = second.communicate(timeout=30)
        assert second.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in stderr
    finally:
        first.terminate()
        first.communicate(timeout=15)
    assert first.returncode == 0
