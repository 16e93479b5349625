"""`fleetward kill | approve | release | status` without a reachable cluster: one clear
line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import socket

import pytest

from fleetward.cli.main import main


def test_no_kubeconfig_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no usable kubeconfig") and "--kubeconfig" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["kill", "stop", "--reason", "drill"], ["approve", "stop"], ["release", "stop"]])
def test_an_api_server_that_does_not_answer_is_one_line(tmp_path, capsys, argv):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
    )
    assert main([*argv, "--kubeconfig", str(kubeconfig)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not reach the Kubernetes API server") and "Traceback" not in err
