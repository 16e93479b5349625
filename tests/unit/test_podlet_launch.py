"""The podlet's container launcher mounts every volume even when an earlier mount (an
emptyDir at /tmp, say) covers the folder the later volumes' sources live in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fleetward.devcluster.podlet import launch


def test_a_volume_over_tmp_does_not_hide_the_other_sources(tmp_path: Path):
    assert str(tmp_path).startswith("/tmp/"), "the case needs sources under /tmp"
    empty = tmp_path / "emptydir"
    empty.mkdir()
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "settings.yaml").write_text("hello from the volume\n")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "mounts": [  # sorted by depth, as the podlet sends them
                    {"source": str(empty), "target": "/tmp", "readOnly": False, "file": False},
                    {"source": str(settings), "target": "/srv/fleetward-launch-test", "readOnly": True, "file": False},
                ],
                "workingDir": "/",
                "argv": ["cat", "/srv/fleetward-launch-test/settings.yaml"],
                "env": {"PATH": "/usr/bin:/bin"},
            }
        )
    )
    # The launcher reads its spec before mounting, so the spec may live under /tmp too.
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-S",
            "-E",
            launch.__file__,
            str(spec),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from the volume\n"
