"""The quick start runs as written: its shell blocks, in order, against Docker.

The page marks the blocks to run with ``<!-- doctest -->`` and what a block
must print with ``<!-- doctest: output -->`` on the block after it. Each
expected line must appear in the output, in order, word for word; ``...``
stands for the rest of a line (an age, a pid). The blocks run in one shell,
from a fresh directory that holds the checkout's ``examples`` and ``.venv``
(as links), so nothing of the checkout is changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from controller.cli import gateway as gateway_process
from controller.runtimes import base, container

from .conftest import EngineUnderTest, _remove, get_engine

pytestmark = pytest.mark.docker

TOP = Path(__file__).resolve().parents[2]
QUICKSTART = TOP / "docs" / "quickstart.md"
CONTROLLER_ID = "quickstart"
"""The id the page gives its controller."""

_BLOCK = re.compile(r"<!-- doctest(?P<output>: output)? -->\n```[a-z]*\n(?P<body>.*?)```", re.S)


@dataclass
class Step:
    commands: str
    expected: list[str] | None = None


def steps(page: str) -> list[Step]:
    """The marked blocks of a page: commands, each with the output expected of it (or None)."""
    found: list[Step] = []
    for match in _BLOCK.finditer(page):
        body = match["body"]
        if match["output"]:
            assert found, "an output block must follow a command block"
            assert found[-1].expected is None, "one output block per command block"
            found[-1].expected = [line for line in body.splitlines() if line.strip()]
        else:
            found.append(Step(body))
    return found


def _matches(expected: str, line: str) -> bool:
    want, got = expected.split(), line.split()
    if want and want[-1] == "...":
        want = want[:-1]
        return got[: len(want)] == want and len(got) >= len(want)
    if want and want[-1].endswith("...)"):  # "(pid ...)": a word whose end varies
        head = want[-1][: -len("...)")]
        return got[:-1] == want[:-1] and bool(got) and got[-1].startswith(head)
    return got == want


def check_output(expected: list[str], output: str) -> None:
    """Every expected line in ``output``, in order."""
    lines = output.splitlines()
    position = 0
    for want in expected:
        for index in range(position, len(lines)):
            if _matches(want, lines[index]):
                position = index + 1
                break
        else:
            pytest.fail(f"expected a line like {want!r} (in order) in:\n{output}")


def test_the_steps_are_read_from_the_page() -> None:
    found = steps(QUICKSTART.read_text())
    assert len(found) >= 6
    assert any("bhctl run" in s.commands for s in found)
    assert sum(s.expected is not None for s in found) >= 4
    check_output(["a b ..."], "x\n a  b c \n")
    with pytest.raises(pytest.fail.Exception):
        check_output(["a b", "x"], "x\na b\n")


@contextlib.contextmanager
def _one_at_a_time() -> Iterator[None]:
    """The page's controller id is fixed: two runs of this test on one engine take turns."""
    lock = Path(tempfile.gettempdir()) / "blackhole-quickstart-doctest.lock"
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _clean(engine: EngineUnderTest, work: Path) -> None:
    pid_file = work / "quickstart" / "controller.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), 9)
    data = work / "quickstart" / "data"
    if data.exists():
        gateway_process.stop_running(data)
    _remove(engine.client, f"{base.LABEL_CONTROLLER}={CONTROLLER_ID}")
    with contextlib.suppress(docker.errors.NotFound):
        engine.client.volumes.get(f"bh-{CONTROLLER_ID}-kv-store-data").remove(force=True)


def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    engine = get_engine(container.Engine.DOCKER)  # the page is written for Docker
    found = steps(QUICKSTART.read_text())
    (tmp_path / "examples").symlink_to(TOP / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    with _one_at_a_time():
        _clean(engine, tmp_path)
        try:
            # One shell for all blocks: each block's output is cut out between markers.
            script = ["set -euo pipefail"]
            for number, step in enumerate(found, 1):
                script += [f"echo '@@step {number}@@'", step.commands]
            script.append("echo '@@step 0@@'")  # the end
            env = {k: v for k, v in os.environ.items() if not k.startswith("BLACKHOLE_")}
            result = subprocess.run(
                ["bash", "-c", "\n".join(script)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            log = tmp_path / "quickstart" / "controller.log"
            context = result.stderr + (log.read_text() if log.exists() else "")
            assert result.returncode == 0, f"{result.stdout}\n{context}"
            parts = re.split(r"^@@step (\d+)@@$", result.stdout, flags=re.M)
            outputs = {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}
            assert outputs.pop(0, None) is not None, result.stdout
            assert sorted(outputs) == list(range(1, len(found) + 1)), result.stdout
            for number, step in enumerate(found, 1):
                if step.expected is not None:
                    check_output(step.expected, outputs[number])
            # What the page says it leaves behind: nothing.
            assert not (tmp_path / "quickstart").exists()
            selector: dict[str, Any] = {"label": f"{base.LABEL_CONTROLLER}={CONTROLLER_ID}"}
            assert engine.client.containers.list(all=True, filters=selector) == []
            assert engine.client.volumes.list(filters=selector) == []
        finally:
            _clean(engine, tmp_path)
