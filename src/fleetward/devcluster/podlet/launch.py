"""The first process of a podlet container, already inside its private mount namespace
(started as `unshare --mount --propagation private -- python -m ...launch SPEC`).

It bind-mounts the pod's volumes at their mountPaths (visible to this process tree
only) and execs the container command, so the container's PID is the one the podlet
started. Run with `python -S -E` and only the standard library: it runs once per
container start and must be quick.

The container runs as the podlet's own user: securityContext.runAsUser is not applied
on this development node (the interpreter and the project live under the developer's
home, which another uid usually cannot read).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    # Open every source before mounting anything: a volume mounted over, say, /tmp would
    # otherwise hide the sources of the volumes after it when the podlet's state lives there.
    sources = [os.open(m["source"], O_PATH) for m in spec["mounts"]]
    for m, fd in zip(spec["mounts"], sources, strict=True):  # by depth: nested targets land inside their parent
        if m.get("file"):
            os.makedirs(os.path.dirname(m["target"]), exist_ok=True)
            if not os.path.exists(m["target"]):
                open(m["target"], "a").close()
        else:
            os.makedirs(m["target"], exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", m["target"], MS_BIND | MS_REC)
        if m.get("readOnly"):
            _mount(None, m["target"], MS_BIND | MS_REMOUNT | MS_RDONLY)
    for fd in sources:
        os.close(fd)
    os.chdir(spec.get("workingDir") or "/")
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception as e:  # reported in the container log; the podlet sees the exit code
        print(f"podlet launch: {e}", file=sys.stderr)
        sys.exit(128)
