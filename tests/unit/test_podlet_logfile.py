"""A podlet container's log keeps the time of each line (logfile.py), so that the log
endpoint can answer `kubectl logs --timestamps`, `--since` and `--since-time`."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from fleetward.devcluster.podlet.logfile import LineTimes, LogCopier, format_time, parse_time, times_path
from fleetward.devcluster.podlet.logserver import LogQuery, _stamped

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


def copy(path: Path, *writes: bytes, pause: float = 0.0) -> LogCopier:
    """What a container writes, in separate writes, through a pipe into `path`."""
    read_end, write_end = os.pipe()
    copier = LogCopier(read_end, path, "test")
    copier.start()
    for data in writes:
        os.write(write_end, data)
        time.sleep(pause)
    os.close(write_end)
    assert copier.done.wait(5)
    return copier


def test_every_line_start_is_timed_also_when_a_line_arrives_in_pieces(tmp_path):
    log = tmp_path / "0.log"
    before = time.time_ns()
    copy(log, b"one\ntw", b"o\nthree", b"\n", b"four\n", pause=0.05)
    after = time.time_ns()

    assert log.read_bytes() == b"one\ntwo\nthree\nfour\n"  # the output as written, nothing added
    times = LineTimes(log)
    assert times.offsets == [0, 4, 8, 14]
    assert before <= times.times[0] <= times.times[1] < times.times[2] < times.times[3] <= after
    # "two" started in the first write: its time is that write's, not the second's.
    assert times.times[1] == times.times[0]


def test_a_log_appended_to_continues_its_lines(tmp_path):
    log = tmp_path / "0.log"
    copy(log, b"first\nunfinished")
    copy(log, b" line\nnext\n")
    times = LineTimes(log)
    assert log.read_bytes() == b"first\nunfinished line\nnext\n"
    assert times.offsets == [0, 6, 22]


def test_lines_are_stamped_as_the_kubelet_does(tmp_path):
    log = tmp_path / "0.log"
    copy(log, b"alpha\nbeta\n", b"gamma\n", pause=0.02)
    times = LineTimes(log)
    data = log.read_bytes()

    stamped = _stamped(data, 0, times).splitlines(keepends=True)
    assert [STAMP.sub(b"", line) for line in stamped] == [b"alpha\n", b"beta\n", b"gamma\n"]
    assert all(STAMP.match(line) for line in stamped)
    assert stamped[2].startswith(format_time(times.times[2]).encode())
    # Read from inside a line: that line's rest has no stamp of its own.
    assert _stamped(data[3:], 3, times) == b"ha\n" + b"".join(stamped[1:])


def test_tail_and_since_choose_where_to_start(tmp_path):
    log = tmp_path / "0.log"
    copy(log, b"a\nb\n", b"c\nd\n", pause=0.05)
    times = LineTimes(log)
    late = times.times[2]  # "c" and "d" came later than "a" and "b"

    assert LogQuery().start(times) == 0
    assert LogQuery(tail_lines=1).start(times) == 6
    assert LogQuery(tail_lines=99).start(times) == 0
    assert LogQuery(tail_lines=0).start(times) is None  # nothing: the end
    assert LogQuery(since_ns=late).start(times) == 4
    assert LogQuery(since_ns=late + 1).start(times) is None
    assert LogQuery(since_ns=0).start(times) == 0
    # Both: the later start wins.
    assert LogQuery(tail_lines=3, since_ns=late).start(times) == 4
    assert LogQuery(tail_lines=1, since_ns=0).start(times) == 6


def test_a_log_without_times_falls_back_to_its_modification_time(tmp_path):
    log = tmp_path / "0.log"
    log.write_bytes(b"old\nlog\n")
    assert not times_path(log).exists()
    times = LineTimes(log)
    assert times.offsets == [0, 4]
    assert times.times == [log.stat().st_mtime_ns] * 2


def test_new_lines_are_found_when_the_log_grows(tmp_path):
    log = tmp_path / "0.log"
    copy(log, b"a\n")
    times = LineTimes(log)
    copy(log, b"b\n")
    assert times.offsets == [0]
    times.refresh()
    assert times.offsets == [0, 2]


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1970-01-01T00:00:01Z", 1_000_000_000),
        ("1970-01-01T00:00:01.5Z", 1_500_000_000),
        ("1970-01-01T00:00:01.000000007Z", 1_000_000_007),
        ("1970-01-01T01:00:01+01:00", 1_000_000_000),
    ],
)
def test_since_time_is_rfc3339_with_nanoseconds(text, ns):
    assert parse_time(text) == ns
    assert format_time(parse_time("2026-12-08T09:15:02.000000042Z")) == "2026-12-08T09:15:02.000000042Z"


@pytest.mark.parametrize("text", ["yesterday", "2026-12-08T09:15:02", "2026-12-08T09:15:02.Z", ""])
def test_a_since_time_that_is_not_rfc3339_is_refused(text):
    with pytest.raises(ValueError):
        parse_time(text)
