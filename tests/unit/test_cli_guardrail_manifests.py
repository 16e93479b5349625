"""What `fleetward guardrail scan -f` takes as a Guardrail: the manifest as the API server
reads it, so a file that passes here applies."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_guardrail_cli import scan


def test_snake_case_field_names_are_refused_as_the_api_server_refuses_them(tmp_path: Path):
    # `apply_to` passed here (the models also take Python names) while kubectl apply refused it,
    # or, without strict validation, dropped it and redacted on every stage.
    path = tmp_path / "g.yaml"
    path.write_text(
        "apiVersion: fleetward.dev/v1alpha1\nkind: Guardrail\nmetadata: {name: g}\n"
        "spec:\n  pii:\n    entities: [{type: email, strategy: redact}]\n    apply_to: [output]\n"
    )
    got = scan("-f", str(path), stdin='{"id": 1, "text": "a@b.com"}\n')
    assert got.returncode == 2 and got.stdout == ""
    assert "spec.pii.apply_to: Extra inputs are not permitted" in got.stderr
