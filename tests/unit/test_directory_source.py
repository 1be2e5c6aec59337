"""The directory source: specs in, changed keys out; user files never written."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.sources.directory import DirectorySource

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
  labels: {{team: {team}}}
spec:
  image: blackhole/example-echo:0.1.0
  version: {version}
"""


def write(directory: Path, name: str, version: str = "0.1.0", team: str = "a") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, version=version, team=team))
    return path


def test_rescan_reports_added_changed_and_removed_keys(tmp_path):
    source = DirectorySource(tmp_path, lambda key: None)
    write(tmp_path, "a")
    write(tmp_path, "b")
    assert source.rescan() == {"a", "b"}
    assert source.rescan() == set(), "an unchanged directory changes nothing"
    assert source.generation("a") == 1
    write(tmp_path, "a", version="0.2.0")
    assert source.rescan() == {"a"}
    desired = source.get("a")
    assert desired is not None
    assert str(desired.plugin.spec.version) == "0.2.0"
    assert source.generation("a") == 2
    write(tmp_path, "b", team="c")
    assert source.rescan() == {"b"}, "a label change is a change"
    (tmp_path / "b.yaml").unlink()
    assert source.rescan() == {"b"}
    assert source.get("b") is None
    assert source.keys() == ["a"]


def test_a_broken_file_keeps_its_last_valid_specs(tmp_path):
    source = DirectorySource(tmp_path, lambda key: None)
    path = write(tmp_path, "a")
    source.rescan()
    path.write_text(path.read_text().replace("version: 0.1.0", "version: nope"))
    assert source.rescan() == set(), "an invalid edit must not touch what runs"
    assert source.get("a") is not None
    assert "spec.version" in str(source.errors[path])
    write(tmp_path, "a", version="0.3.0")
    assert source.rescan() == {"a"}
    assert source.errors == {}


def test_a_name_declared_twice_is_refused_in_the_second_file(tmp_path):
    source = DirectorySource(tmp_path, lambda key: None)
    write(tmp_path, "a")
    (tmp_path / "z.yaml").write_text(SPEC.format(name="a", version="9.9.9", team="x"))
    source.rescan()
    desired = source.get("a")
    assert desired is not None
    assert str(desired.plugin.spec.version) == "0.1.0"
    assert "declared twice" in str(source.errors[tmp_path / "z.yaml"])


def test_run_enqueues_all_then_follows_changes_and_resyncs(tmp_path):
    path = write(tmp_path, "a")
    before = path.read_bytes()
    enqueued: list[str] = []

    async def body() -> None:
        stop = asyncio.Event()
        source = DirectorySource(tmp_path, enqueued.append, resync_seconds=0.5)
        runner = asyncio.create_task(source.run(stop))
        async with asyncio.timeout(10):
            while enqueued != ["a"]:
                await asyncio.sleep(0.01)
            write(tmp_path, "b")
            while "b" not in enqueued:
                await asyncio.sleep(0.01)
            count = len(enqueued)
            while enqueued[count:].count("a") < 1:  # the resync enqueues unchanged keys too
                await asyncio.sleep(0.01)
        stop.set()
        await runner

    asyncio.run(body())
    assert path.read_bytes() == before, "the user's file was rewritten"
