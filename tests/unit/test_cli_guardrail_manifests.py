"""What `fleetward guardrail scan -f` takes as a Guardrail: the manifest as the API server
reads it, so a file that passes here applies."""

from __future__ import annotations

import json
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


GUARDRAIL = (
    "apiVersion: fleetward.dev/v1alpha1\nkind: Guardrail\nmetadata: {name: pii}\n"
    "spec:\n  pii:\n    entities: [{type: email, strategy: redact}]\n"
)


def test_a_file_with_other_kinds_scans_with_its_guardrails_and_names_what_it_skipped(tmp_path: Path):
    path = tmp_path / "all.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: githouse}\n---\n"
        + GUARDRAIL
        + "---\napiVersion: fleetward.dev/v1alpha1\nkind: Agent\nmetadata: {name: a}\nspec: {}\n"
    )
    got = scan("-f", str(path), stdin='{"id": "m1", "text": "mail a@b.com"}\n')
    assert got.returncode == 0, got.stderr
    assert '"text": "mail [REDACTED_EMAIL]"' in got.stdout
    assert "skipped" in got.stderr and "kind Namespace" in got.stderr and "kind Agent" in got.stderr


def test_a_kubectl_list_is_read_item_by_item(tmp_path: Path):
    path = tmp_path / "list.yaml"
    items = "\n".join("  " + line for line in ("- " + GUARDRAIL.replace("\n", "\n  ")).splitlines())
    path.write_text("apiVersion: v1\nkind: List\nitems:\n" + items + "\n")
    got = scan("-f", str(path), stdin='{"id": 1, "text": "a@b.com"}\n')
    assert got.returncode == 0, got.stderr
    assert '"[REDACTED_EMAIL]"' in got.stdout


def test_any_json_scalar_id_is_echoed_back(tmp_path: Path):
    path = tmp_path / "g.yaml"
    path.write_text(GUARDRAIL)
    ids = ["c-1", 7, 1.5, True, None]
    stdin = "".join(json.dumps({"id": i, "text": "x"}) + "\n" for i in ids)
    got = scan("-f", str(path), stdin=stdin)
    assert got.returncode == 0, got.stderr
    assert [json.loads(line)["id"] for line in got.stdout.splitlines()] == ids
