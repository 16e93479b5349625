"""Child processes of the local cluster: started with logs to a file, waited for
until ready, reported with the tail of their log when they crash, stopped with
SIGTERM and then SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class ComponentFailed(RuntimeError):
    """A component exited or did not become ready; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def die_with_parent() -> None:
    """Run in a child before exec: own session, and SIGTERM when the parent dies (no orphans)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 25) -> str:
    try:
        data = path.read_bytes()[-16384:].decode(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(data[-lines:])


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
    ):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 -- handed to the child, closed after Popen
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                user=self.user,
                preexec_fn=die_with_parent,
            )
        except OSError as e:
            raise ComponentFailed(f"{self.name}: cannot start {self.argv[0]}: {e}") from e
        finally:
            out.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failure(self, what: str) -> ComponentFailed:
        return ComponentFailed(f"{self.name} {what}; last lines of {self.log}:\n{tail(self.log)}")

    def check(self) -> None:
        """Raise with the log tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise self.failure(f"exited with code {self.proc.returncode}")

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str = "ready") -> None:
        """Poll `ready` (its errors mean "not yet"); fail at once, with the log tail, if the
        process exits, and with the log tail if the timeout passes."""

        def probe() -> bool:
            self.check()
            return ready()

        try:
            wait_for(probe, timeout, what, fatal=(ComponentFailed,))
        except TimeoutError:
            raise self.failure(f"was not {what} within {timeout:.0f} s") from None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, self.stop_signal)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def run_checked(name: str, argv: Sequence[str | os.PathLike], log: Path, **kwargs) -> None:
    """Run a one-shot command (e.g. initdb) with output in log; raise with its tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        rc = subprocess.call(
            [str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
        )
    if rc != 0:
        raise ComponentFailed(f"{name} failed with exit code {rc}; last lines of {log}:\n{tail(log)}")


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.2,
    fatal: tuple[type[BaseException], ...] = (),
) -> None:
    """Poll until `predicate()` is truthy. Its exceptions count as "not yet" (the last one
    is named in the TimeoutError), except those in `fatal`, which end the wait at once."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except fatal:
            raise
        except Exception as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s" + (f" (last error: {last})" if last else ""))
