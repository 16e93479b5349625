"""What every benchmark does with its result: print it, and unless told not to, append it
as one JSON line to its file in docs/bench/ (one line per run, never rewritten)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def record(result: dict[str, Any], path: Path, *, write: bool) -> None:
    print(json.dumps(result, indent=2))
    if write:
        with path.open("a") as f:
            f.write(json.dumps(result) + "\n")
