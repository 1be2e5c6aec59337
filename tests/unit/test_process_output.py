"""A process plugin's output is kept under a size limit: a chatty plugin cannot fill the disk."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from controller.runtimes.process import shim


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
    assert current.endswith(lines[-1])  # the newest output is kept
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
    assert log.read_bytes() == b"hello\n"
    assert (tmp_path / "bh-kv-blue.log.1").read_bytes() == b"what the crashed run said\n"
