"""The `fleetward` command builds its parser without importing what only one command
needs: the operator, the tool services and the model stand-in run as `fleetward ...`
processes and must not carry the agent runtime's LangGraph/LangChain stack (64 MiB of the
operator's resident memory when they did)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("fleetward.runtime.main", "langgraph", "langchain_core", "langchain_openai", "onnxruntime")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_building_the_parser_imports_no_runtime_stack() -> None:
    loaded = _modules_after("from fleetward.cli.main import build_parser\nbuild_parser()")
    assert not {m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY}


def test_the_operator_command_imports_no_runtime_stack() -> None:
    code = (
        "from fleetward.cli.main import build_parser\n"
        "args = build_parser().parse_args(['operator', 'run'])\n"
        "from fleetward.operator import handlers, reconcile, context\n"
        "from fleetward.operator.settings import OperatorSettings\n"
        "handlers.register(OperatorSettings())"
    )
    loaded = _modules_after(code)
    assert "kopf" in loaded  # the operator's modules were imported for real
    assert not {m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY}


def test_the_runtime_command_still_parses_its_arguments() -> None:
    from fleetward.cli.main import build_parser

    args = build_parser().parse_args(["runtime", "run", "--config", "/etc/fleetward/runtime.json", "--check"])
    assert str(args.config) == "/etc/fleetward/runtime.json" and args.check
    assert args.handler.__module__ == "fleetward.cli.runtime"
