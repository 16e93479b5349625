"""Nothing the local cluster starts listens outside loopback."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path


def _pids_under(state: Path) -> set[int]:
    """PIDs whose command line mentions the cluster's state folder or binaries, and their children."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(state).encode() in cmd:
            pids.add(int(proc.name))
    return pids


def test_every_listening_socket_is_on_loopback(cluster, kafka, kafka_scram, postgres_dsn, prometheus):
    cluster.kwok()
    pids = _pids_under(cluster.state)
    assert len(pids) >= 8, f"expected the cluster's processes, found {pids}"
    out = subprocess.run(["ss", "-H", "-ltnup"], capture_output=True, text=True, check=True).stdout
    checked = 0
    for line in out.splitlines():  # e.g. tcp LISTEN 0 4096 127.0.0.1:6443 0.0.0.0:* users:(("etcd",pid=7,fd=3))
        fields = line.split()
        local = fields[4]
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if not owners & pids:
            continue
        host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
        assert host not in ("*", "0.0.0.0", "::"), f"listens on every interface: {line}"
        addr = ipaddress.ip_address(host)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:  # Java's ::ffff:127.0.0.1
            addr = addr.ipv4_mapped
        assert addr.is_loopback, f"listens outside loopback: {line}"
        checked += 1
    assert checked >= 8, f"only {checked} listening sockets of the cluster found:\n{out}"
