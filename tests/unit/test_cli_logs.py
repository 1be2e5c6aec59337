"""``bhctl logs`` (``--timestamps``, ``--replica``) through the real admin API over the
in-memory runtime."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.admin import server
from controller.cli import main
from controller.runtimes import base, memory
from controller.sources.directory import DirectorySource
from controller.sources.store import Store
from controller.spec import models

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {name: echo}
spec:
  image: blackhole/echo:0.1.0
  version: 0.1.0
  replicas: 2
"""


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose admin API serves ``echo``, whose two blue replicas run."""
    ready, stop = threading.Event(), threading.Event()
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "echo.yaml").write_text(SPEC)

    async def serve() -> None:
        source = DirectorySource(tmp_path / "specs", Store(tmp_path / "state.db"), lambda k: None)
        source.rescan()
        runtime = memory.MemoryRuntime()
        desired = source.get("echo")
        assert desired is not None
        labels = {base.LABEL_PLUGIN: "echo", base.LABEL_SPEC_HASH: "x"}
        await runtime.start(
            base.InstanceSpec("echo", models.Color.BLUE, desired.plugin.spec, labels)
        )
        runtime.write("bh-echo-blue", "serving")
        await runtime.start(
            base.InstanceSpec("echo", models.Color.BLUE, desired.plugin.spec, labels, replica=1)
        )
        runtime.write("bh-echo-blue-1", "serving as replica 1")
        api = server.AdminServer(source, runtime, tmp_path / "admin.sock")
        await api.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await api.stop()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield tmp_path
    stop.set()
    thread.join(30)


def bhctl(data: Path, *args: str) -> Any:
    return CliRunner().invoke(main.app, [*args, "--data-dir", str(data)], env={"COLUMNS": "200"})


def test_logs_timestamps_starts_each_line_with_when_it_was_written(data: Path) -> None:
    before = datetime.now(UTC)
    plain = bhctl(data, "logs", "echo")
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.splitlines() == ["echo 0.1.0 started", "serving"]
    stamped = bhctl(data, "logs", "echo", "--timestamps")
    assert stamped.exit_code == 0, stamped.output
    lines = stamped.stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["echo 0.1.0 started", "serving"]
    for line in lines:
        stamp = line.split(" ", 1)[0]
        assert stamp.endswith("Z")
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert abs((at - before).total_seconds()) < 60


def test_logs_of_another_replica_and_of_one_there_is_not(data: Path) -> None:
    second = bhctl(data, "logs", "echo", "--replica", "1")
    assert second.exit_code == 0, second.output
    assert second.stdout.splitlines() == ["echo 0.1.0 started", "serving as replica 1"]
    missing = bhctl(data, "logs", "echo", "--replica", "2")
    assert missing.exit_code != 0
    assert "replica 2: echo has replicas 0 to 1" in missing.output
