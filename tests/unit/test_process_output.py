"""A process plugin's output is kept under a size limit (a chatty plugin cannot fill the disk),
each line with the time the shim read it."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from controller.runtimes.process import records, shim


def text(path: Path) -> str:
    """A log as the plugin wrote it: its lines without their times."""
    return "".join(line + "\n" for line in records.log_lines(path.read_text(), False))


def test_output_past_the_limit_moves_to_the_previous_log(tmp_path: Path):
    log = tmp_path / "bh-kv-blue.log"
    log.write_bytes(b"the previous run\n")
    read, write = os.pipe()
    lines = [f"line {i:06d} ".encode() + b"x" * 90 + b"\n" for i in range(5000)]  # ~500 KB

    def plugin() -> None:
        for line in lines:
            os.write(write, line)
        os.close(write)

    writer = threading.Thread(target=plugin)
    writer.start()
    shim._copy_output(read, str(log), limit=64 * 1024, stderr=False)
    writer.join()
    current, previous = log.read_bytes(), (tmp_path / "bh-kv-blue.log.1").read_bytes()
    assert len(current) <= 64 * 1024
    assert len(previous) <= 64 * 1024
    assert text(log).endswith(lines[-1].decode())  # the newest output is kept
    assert b"the previous run" not in current + previous  # rotated away long ago
    total = sum(len(x) for x in lines)
    assert total > 5 * 64 * 1024  # and yet only two limits' worth is on disk


def test_a_new_run_keeps_the_last_runs_log(tmp_path: Path):
    log = tmp_path / "bh-kv-blue.log"
    log.write_bytes(b"what the crashed run said\n")
    read, write = os.pipe()
    os.write(write, b"hello\n")
    os.close(write)
    shim._copy_output(read, str(log), stderr=False)
    assert text(log) == "hello\n"
    assert (tmp_path / "bh-kv-blue.log.1").read_bytes() == b"what the crashed run said\n"


def test_each_line_is_stamped_once_however_the_chunks_split_it():
    at = 1_700_000_000_123_456_789
    stamp = b"2023-11-14T22:13:20.123456789Z "
    first, start = shim.stamped(b"one\ntw", True, at)
    assert (first, start) == (stamp + b"one\n" + stamp + b"tw", False)
    second, start = shim.stamped(b"o\n\nthree\n", start, at)
    assert (second, start) == (b"o\n" + stamp + b"\n" + stamp + b"three\n", True)
    logged = (first + second).decode()
    assert records.log_lines(logged, False) == ["one", "two", "", "three"]
    assert records.log_lines(logged, True)[0] == stamp.decode() + "one"


def test_a_line_is_stamped_with_the_time_it_was_read(tmp_path: Path):
    log = tmp_path / "bh-kv-blue.log"
    read, write = os.pipe()
    before = datetime.now(UTC)
    os.write(write, b"early\n")

    def plugin() -> None:
        time.sleep(0.3)
        os.write(write, b"late\n")
        os.close(write)

    writer = threading.Thread(target=plugin)
    writer.start()
    shim._copy_output(read, str(log), stderr=False)
    writer.join()
    after = datetime.now(UTC)
    stamped = records.log_lines(log.read_text(), True)
    times = [datetime.fromisoformat(line.split(" ")[0][:26] + "+00:00") for line in stamped]
    assert [line.split(" ", 1)[1] for line in stamped] == ["early", "late"]
    assert before.replace(microsecond=0) <= times[0] < times[1] <= after
    assert (times[1] - times[0]).total_seconds() >= 0.2
