"""What runs is known from files, so that a restarted controller adopts it.

``DATA_DIR/processes/<name>.json`` (labels, pid and the pid's start time,
written by the instance's shim, checked against ``/proc``), ``<name>.exit``
(exit code, whether the cgroup's OOM killer fired) and ``<name>.log`` (the
plugin's output: at most 8 MiB, the part before in ``<name>.log.1``), each
line starting with the time the shim read it from the plugin and a space.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.runtimes import base

SUFFIXES = ("json", "exit", "log", "log.1")
"""The files of one instance."""


def starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: object, started: object) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (not a reused pid)."""
    return isinstance(pid, int) and pid > 0 and starttime(pid) == started


def load(path: Path) -> dict[str, Any] | None:
    """A JSON record, or None when it is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            loaded: dict[str, Any] = json.load(handle)
            return loaded
    except (OSError, ValueError):
        return None


def tail(path: Path, size: int = 256 << 10) -> str:
    """The last ``size`` bytes of a log, as text."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - size))
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")
"""The time the shim puts before each line of a log."""


def log_lines(text: str, timestamps: bool) -> list[str]:
    """The lines of a log, with their time (as ``TIME LINE``) or without it.

    A line without one (written by the shim itself, or cut by the read) is
    given as it is.
    """
    lines = text.splitlines()
    if timestamps:
        return lines
    return [line[len(m.group()) :] if (m := STAMP.match(line)) else line for line in lines]


async def read(name: str, state: Path, exit_file: Path) -> base.Instance | None:
    """Instance ``name`` as its state and exit files describe it; None without a state file.

    An instance whose process is gone without an exit file yet is waited for
    (up to 2 s) while its shim lives: the shim writes the exit file then.
    """
    record = load(state)
    if record is None:
        return None
    ended = load(exit_file)
    if ended is None and not alive(record.get("pid"), record.get("starttime")):
        deadline = time.monotonic() + 2.0
        while alive(record.get("shim"), record.get("shim_starttime")):
            ended = load(exit_file)
            if ended is not None or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        ended = ended or load(exit_file) or {"exit_code": None}
    started = record.get("started_at")
    finished = (ended or {}).get("finished_at")
    return base.instance_from_labels(
        name,
        dict(record.get("labels") or {}),
        f"{record.get('pid')}.{record.get('starttime')}",
        base.InstanceState.RUNNING if ended is None else base.InstanceState.EXITED,
        exit_code=None if ended is None else ended.get("exit_code"),
        oom_killed=bool((ended or {}).get("oom_killed")),
        started_at=datetime.fromtimestamp(started, UTC) if started else None,
        finished_at=datetime.fromtimestamp(finished, UTC) if finished else None,
        pid=record.get("pid") if ended is None else None,
    )
