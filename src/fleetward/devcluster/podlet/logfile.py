"""A container's log file and the time each of its lines was written, so that `kubectl
logs --timestamps` and `--since`/`--since-time` work as on a kubelet.

The kubelet's runtime writes CRI log files (`<time> stdout F <line>`). The podlet keeps the
container's output as it was written instead (`<attempt>.log`, read as is by `make up`, the
tests and people), and beside it `<attempt>.log.times`: one fixed-size record per line, the
byte offset where the line starts and the time its first byte was read from the container,
in nanoseconds since the epoch. The container writes into a pipe; `LogCopier` (a thread)
copies it into the file and records the line starts, the records before the bytes, so a
reader that sees a line also finds its time.

Why not a library: nothing on PyPI writes or reads this; it is a pipe, a file and a list.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import struct
import threading
import time
from bisect import bisect_left
from pathlib import Path

log = logging.getLogger("podlet.logs")

_RECORD = struct.Struct("<QQ")  # line start offset, unix time in ns
READ_SIZE = 64 * 1024


def times_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".times")


class LogCopier(threading.Thread):
    """Copies what a container writes to `read_fd` (the read end of its stdout/stderr pipe)
    into its log file, and the start time of every line into the times file. Ends when
    every writer has closed the pipe (the container and whatever it started)."""

    def __init__(self, read_fd: int, log_path: Path, name: str) -> None:
        super().__init__(name=f"log-{name}", daemon=True)
        self.read_fd = read_fd
        self.log_path = log_path
        self.done = threading.Event()

    def run(self) -> None:
        try:
            try:
                with open(self.log_path, "ab", buffering=0) as out, open(times_path(self.log_path), "ab", 0) as ts:
                    self._copy(out, ts)
            except OSError as e:  # a full disk: the container must not hang on a pipe nobody reads
                log.warning("log of %s: %s; discarding the rest of its output", self.log_path, e)
                while os.read(self.read_fd, READ_SIZE):
                    pass
        except OSError:
            pass  # the pipe itself failed: nothing more can be read
        finally:
            os.close(self.read_fd)
            self.done.set()

    def _copy(self, out, ts) -> None:
        pos = out.tell()
        at_line_start = pos == 0 or _ends_with_newline(self.log_path, pos)
        while chunk := os.read(self.read_fd, READ_SIZE):
            now = time.time_ns()
            starts = [pos] if at_line_start else []
            i = chunk.find(b"\n")
            while i != -1 and i + 1 < len(chunk):
                starts.append(pos + i + 1)
                i = chunk.find(b"\n", i + 1)
            at_line_start = chunk.endswith(b"\n")
            if starts:
                _write_all(ts, b"".join(_RECORD.pack(s, now) for s in starts))
            _write_all(out, chunk)
            pos += len(chunk)


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


class LineTimes:
    """The line starts of a log file and their times, read from its times file and kept up
    to date while the file grows (`refresh`). A log without a times file (written before
    the podlet kept them) gets its lines from the file and the file's modification time
    for each."""

    def __init__(self, log_path: Path) -> None:
        self.offsets: list[int] = []
        self.times: list[int] = []
        self._path = times_path(log_path)
        self._read = 0  # bytes of the times file taken in
        if not self._path.is_file():
            self._from_log(log_path)
        self.refresh()

    def _from_log(self, log_path: Path) -> None:
        mtime = log_path.stat().st_mtime_ns
        pos = 0
        with open(log_path, "rb") as f:
            for line in f:
                self.offsets.append(pos)
                self.times.append(mtime)
                pos += len(line)

    def refresh(self) -> None:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            return
        whole = len(data) - len(data) % _RECORD.size  # a record being written is taken next time
        for offset, ns in _RECORD.iter_unpack(data[:whole]):
            self.offsets.append(offset)
            self.times.append(ns)
        self._read += whole

    def start_of_tail(self, lines: int) -> int | None:
        """Where the last `lines` lines start; None: none (the end of the file)."""
        if lines <= 0:
            return None
        return self.offsets[-lines] if lines <= len(self.offsets) else 0

    def start_since(self, since_ns: int) -> int | None:
        """Where the first line written at or after `since_ns` starts; None: none yet."""
        i = bisect_left(self.times, since_ns)
        return self.offsets[i] if i < len(self.offsets) else None

    def starts_between(self, start: int, end: int) -> list[tuple[int, int]]:
        """The lines that start in [start, end): (offset, time) each."""
        lo, hi = bisect_left(self.offsets, start), bisect_left(self.offsets, end)
        return list(zip(self.offsets[lo:hi], self.times[lo:hi], strict=True))


def format_time(ns: int) -> str:
    """RFC 3339 with nanoseconds, as the kubelet prefixes lines (`2006-01-02T15:04:05.000000000Z`)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def parse_time(text: str) -> int:
    """RFC 3339 (`sinceTime`) to ns since the epoch; ValueError when it is not one."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    fraction = 0
    if "." in value:  # Python's parser takes at most microseconds; keep the nanoseconds
        head, rest = value.split(".", 1)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if digits == 0:
            raise ValueError(text)
        fraction = int(rest[:digits].ljust(9, "0")[:9])
        value = head + rest[digits:]
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(text)
    return int(parsed.timestamp()) * 1_000_000_000 + fraction
