"""SPEC §9: the Dockerfile is multi-stage, its bases pinned, its images non-root. No container
engine runs here, so the file is checked as text; the chart's default images must name stages
it builds."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def stages() -> dict[str, dict]:
    found: dict[str, dict] = {}
    current = None
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            current = {"base": m.group(1), "user": None}
            found[m.group(2) or f"#{len(found)}"] = current
        elif (m := re.match(r"USER\s+(\S+)", line)) and current is not None:
            current["user"] = m.group(1)
    return found


def test_every_base_image_is_pinned_to_a_release():
    for name, stage in stages().items():
        base = stage["base"]
        if base in stages():  # FROM an earlier stage
            continue
        tag = base.rpartition(":")[2] if ":" in base else ""
        assert re.match(r"\d+\.\d+(\.\d+)?(-|$)", tag), f"stage {name}: base {base!r} is not pinned to a version"


def test_the_shipped_images_run_as_a_non_root_user():
    for target in ("operator", "gateway"):
        user = stages()[target]["user"]
        assert user is not None and not user.startswith(("0", "root")), f"stage {target} runs as {user!r}"


def test_the_charts_default_images_are_built_by_the_dockerfile():
    values = yaml.safe_load((REPO / "charts" / "fleetward" / "values.yaml").read_text())
    header = (REPO / "Dockerfile").read_text()
    shipped = [
        (values["operator"]["image"], "operator"),
        (values["runtime"]["image"], "operator"),  # one image: the operator, the runtime and the CLI
        (values["gateway"]["image"], "gateway"),
    ]
    for image, target in shipped:
        assert f"--target {target} -t {image} " in header, (image, target)
