"""Argo CD support (SPEC §9): the Lua health checks of every kind, run by a harness that
reproduces Argo CD's restricted Lua environment, against fixtures shaped like what the
operator writes; the argocd-cm snippet generated from them; the example Applications."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleetward.api.crdgen import KINDS
from fleetward.devcluster.layout import REPO, binaries
from tests.support.argocd import CHECKS, evaluate, harness, health_script

STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
EXAMPLES = REPO / "examples" / "argocd"
ARGOCD_CM = REPO / "argocd" / "argocd-cm.yaml"
KIND_NAMES = [k.KIND.kind for k in KINDS]


def _cases(kind: str) -> list[dict]:
    return yaml.safe_load((health_script(kind).parent / "health_test.yaml").read_text())["tests"]


def test_every_health_check_reports_what_its_fixtures_say():
    out = subprocess.run([str(harness()), "test", str(CHECKS)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    total = sum(len(_cases(kind)) for kind in KIND_NAMES)
    assert f"{total} case(s) passed, 0 failed" in out.stdout, out.stdout
    for kind in KIND_NAMES:
        assert f"ok   fleetward.dev/{kind} " in out.stdout


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_kind_has_a_health_check_with_a_fixture_per_status_it_returns(kind):
    script = health_script(kind)
    assert script.exists(), f"no Argo CD health check for {kind} at {script}"
    code = re.sub(r"--.*", "", script.read_text())
    # Fixtures cannot reach every line: no library Argo CD does not open, on any path.
    assert not re.findall(r"\b(?:string|math|os|io|debug)\s*\.", code)
    returned = set(re.findall(r'health\("(\w+)"', code))
    assert returned and returned <= STATUSES, returned
    cases = _cases(kind)
    assert returned <= {c["healthStatus"]["status"] for c in cases}, "a status the script returns has no fixture"
    # Every fixture is used, and is a valid object of the typed API (what the API server
    # would have stored), of the kind whose check it tests.
    testdata = script.parent / "testdata"
    assert {c["inputPath"] for c in cases} == {f"testdata/{p.name}" for p in testdata.glob("*.yaml")}
    model = next(k for k in KINDS if k.KIND.kind == kind)
    for case in cases:
        obj = yaml.safe_load((script.parent / case["inputPath"]).read_text())
        assert obj["kind"] == kind and obj["apiVersion"] == "fleetward.dev/v1alpha1"
        model.model_validate(obj)


def test_argocd_cm_is_generated_from_the_health_checks():
    out = subprocess.run(
        [sys.executable, str(REPO / "argocd" / "generate.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    config_map = yaml.safe_load(ARGOCD_CM.read_text())
    assert (config_map["kind"], config_map["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    # The scripts read back byte for byte: what Argo CD runs is what the harness tested.
    assert config_map["data"] == {
        f"resource.customizations.health.fleetward.dev_{kind}": health_script(kind).read_text() for kind in KIND_NAMES
    }


def _ready(message: str) -> dict:
    return {
        "apiVersion": "fleetward.dev/v1alpha1",
        "kind": "SOP",
        "metadata": {"name": "x", "generation": 1},
        "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True", "message": message}]},
    }


@pytest.mark.parametrize(
    ("body", "failure"),
    [
        ('string.format("%s", obj.status.conditions[1].message)', "attempt to index a non-table object(nil)"),
        ("obj.status.conditions[1].message:upper()", "attempt to index a non-table object(string)"),
        ('tostring(math.max(1, 2)) .. ""', "attempt to index a non-table object(nil)"),
    ],
)
def test_the_string_and_math_libraries_are_missing_as_in_argo_cd(tmp_path: Path, body: str, failure: str):
    script = tmp_path / "health.lua"
    script.write_text(f'return {{status = "Healthy", message = {body}}}\n')
    health, code = evaluate(script, _ready("all good"))
    assert code == 1 and health["status"] == "Unknown" and failure in health["message"], health
    # The same script without the missing library runs: the failure is the library's.
    script.write_text('return {status = "Healthy", message = "ok: " .. obj.status.conditions[1].message}\n')
    assert evaluate(script, _ready("all good")) == ({"status": "Healthy", "message": "ok: all good"}, 0)


def test_an_unknown_status_a_runaway_script_and_a_non_table_fail_as_in_argo_cd(tmp_path: Path):
    script = tmp_path / "health.lua"
    script.write_text('return {status = "Fine", message = "x"}\n')
    invalid = {"status": "Unknown", "message": "Lua returned an invalid health status"}
    assert evaluate(script, _ready("x")) == (invalid, 0)
    script.write_text("while true do end\n")  # Argo CD gives a script 1 s
    health, code = evaluate(script, _ready("x"))
    assert code == 1 and "context deadline exceeded" in health["message"]
    script.write_text('return "Healthy"\n')
    health, code = evaluate(script, _ready("x"))
    assert code == 1 and health["status"] == "Unknown" and "table" in health["message"]


def test_eval_reads_yaml_objects_as_argo_cd_sees_them():
    fixture = health_script("Agent").parent / "testdata" / "ready.yaml"
    health, code = evaluate(health_script("Agent"), fixture.read_text())
    assert code == 0 and health["status"] == "Healthy"


# -- the example Applications ------------------------------------------------------------


def _applications() -> dict[str, dict]:
    apps = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert (doc["apiVersion"], doc["kind"]) == ("argoproj.io/v1alpha1", "Application"), path
            apps[doc["metadata"]["name"]] = doc
    return apps


def test_the_example_applications_sync_paths_of_this_repository():
    apps = _applications()
    assert apps["githouse"]["spec"]["source"]["path"] == "examples/githouse"
    assert apps["fleetward"]["spec"]["source"]["path"] == "charts/fleetward"
    for app in apps.values():
        spec = app["spec"]
        source = spec["source"]
        assert source["repoURL"].startswith("https://") and source["targetRevision"]
        folder = REPO / source["path"]
        if "helm" in source:
            assert (folder / "Chart.yaml").exists() and (folder / "crds").is_dir()
        else:
            assert list(folder.glob("*.yaml")), folder
        assert spec["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
        options = spec["syncPolicy"]["syncOptions"]
        assert {"ServerSideApply=true", "CreateNamespace=true"} <= set(options)
        if spec.get("ignoreDifferences"):  # otherwise a sync would overwrite what is ignored
            assert "RespectIgnoreDifferences=true" in options
        assert spec["destination"]["namespace"]


def _synced_objects(app: dict, tmp_path: Path, render: int = 0) -> list[dict]:
    """The objects an Application syncs: the chart rendered as Argo CD renders it (helm
    template, with CRDs), or the YAML files of a directory."""
    source = app["spec"]["source"]
    if "helm" not in source:
        files = sorted((REPO / source["path"]).glob("*.yaml"))
        return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    values = tmp_path / f"values-{render}.yaml"
    values.write_text(json.dumps(source["helm"].get("valuesObject") or {}))
    out = subprocess.run(
        [
            str(binaries().helm),
            "template",
            source["helm"]["releaseName"],
            str(REPO / source["path"]),
            "--include-crds",
            "--kube-version",
            "1.36.0",
            "-n",
            app["spec"]["destination"]["namespace"],
            "-f",
            str(values),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _matches(entry: dict, obj: dict) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    meta = obj["metadata"]
    return (
        entry["group"] == group
        and entry["kind"] == obj["kind"]
        and entry.get("name", meta["name"]) == meta["name"]
        and entry.get("namespace", meta.get("namespace")) == meta.get("namespace")
    )


def _leaves(value, path: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{path}/{i}").items()}
    return {path: value}


def _covers(entry: dict, path: str) -> bool:
    patterns = [re.escape(p) for p in entry.get("jsonPointers", [])]
    for expr in entry.get("jqPathExpressions", []):
        # Only the jq used here: .field, .field[]? (every item).
        assert re.fullmatch(r"(\.\w+(\[\]\??)?)+", expr), f"unsupported jq path in this test: {expr}"
        steps = re.findall(r"\.(\w+)(\[\]\??)?", expr)
        patterns.append("".join("/" + re.escape(field) + (r"/\d+" if every else "") for field, every in steps))
    return any(re.fullmatch(f"{p}(/.*)?", path) for p in patterns)


def test_ignore_differences_name_synced_objects_and_cover_what_a_render_cannot_reproduce(tmp_path: Path):
    for name, app in _applications().items():
        first = _synced_objects(app, tmp_path, 0)
        entries = app["spec"].get("ignoreDifferences") or []
        for entry in entries:
            assert any(_matches(entry, obj) for obj in first), f"{name}: {entry} matches nothing it syncs"
        if "helm" not in app["spec"]["source"]:
            continue
        # helm template has no cluster to `lookup`: what the chart generates once (certificates,
        # keys) differs on every render, and must be ignored, or Argo CD would replace it.
        second = {(o["kind"], o["metadata"]["name"]): o for o in _synced_objects(app, tmp_path, 1)}
        changing = []
        for obj in first:
            other = _leaves(second[(obj["kind"], obj["metadata"]["name"])])
            changing += [(obj, p) for p, v in _leaves(obj).items() if other.get(p) != v]
        assert changing, "the chart renders the same twice: are its ignoreDifferences still needed?"
        for obj, path in changing:
            assert any(_matches(e, obj) and _covers(e, path) for e in entries), (
                f"{name}: {obj['kind']}/{obj['metadata']['name']} {path} differs on every render and is not ignored"
            )
