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


@pytest.mark.parametrize(
    ("value", "words"),
    [("0", "0 is out of range: 1 to 3600 seconds"), ("soon", "'soon' is not a whole number of seconds")],
)
def test_a_bad_drain_timeout_is_refused_by_the_parser(capsys, value, words):
    with pytest.raises(SystemExit) as exit_info:
        main(["kill", "stop", "--reason", "drill", "--drain-timeout", value])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_a_bad_selector_is_refused_before_the_kubeconfig_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert main(["kill", "stop", "--reason", "drill", "--selector", "tier=pay ments"]) == 2
    err = capsys.readouterr().err
    assert "--selector: 'tier=pay ments': expected key=value" in err and "kubeconfig" not in err


def test_status_of_one_switch_shows_its_settings():
    from fleetward.cli.killswitch import describe

    text = describe(
        {
            "metadata": {"name": "githouse-stop"},
            "spec": {
                "engaged": True,
                "reason": "drill",
                "scope": {"namespaces": ["githouse"], "agentSelector": {"matchLabels": {"tier": "payments"}}},
                "actions": {"scaleToZero": False},
            },
            "status": {"phase": "Drained", "affectedAgents": 2},
        }
    )
    assert "scope:         namespaces githouse; agents with tier=payments" in text
    assert "mode:          drain, drain timeout 30 s" in text
    assert "actions:       revokeCredentials=true, drainQueues=true, closeSessions=true, scaleToZero=false" in text
    assert "every agent in the cluster" in describe({"metadata": {"name": "all"}, "spec": {"engaged": False}})
