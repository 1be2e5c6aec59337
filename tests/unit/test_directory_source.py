"""The directory source: specs in, changed keys out; user files never written."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from controller.errors import SpecError
from controller.sources.directory import APPLIED, DirectorySource
from controller.sources.store import Store

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


def new_source(directory: Path, enqueue=lambda key: None, **kwargs) -> DirectorySource:
    store = Store(directory.parent / f"{directory.name}-data" / "state.db")
    return DirectorySource(directory, store, enqueue, **kwargs)


def write(directory: Path, name: str, version: str = "0.1.0", team: str = "a") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, version=version, team=team))
    return path


def test_rescan_reports_added_changed_and_removed_keys(tmp_path):
    source = new_source(tmp_path)
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
    assert source.declared_keys() == ["a"]


def test_a_broken_file_keeps_its_last_valid_specs(tmp_path):
    source = new_source(tmp_path)
    path = write(tmp_path, "a")
    source.rescan()
    path.write_text(path.read_text().replace("version: 0.1.0", "version: nope"))
    assert source.rescan() == set(), "an invalid edit must not touch what runs"
    assert source.get("a") is not None
    assert "spec.version" in str(source.errors[str(path)])
    write(tmp_path, "a", version="0.3.0")
    assert source.rescan() == {"a"}
    assert source.errors == {}


def test_a_name_declared_twice_is_refused_in_the_second_file(tmp_path):
    source = new_source(tmp_path)
    write(tmp_path, "a")
    (tmp_path / "z.yaml").write_text(SPEC.format(name="a", version="9.9.9", team="x"))
    source.rescan()
    desired = source.get("a")
    assert desired is not None
    assert str(desired.plugin.spec.version) == "0.1.0"
    assert "declared twice" in str(source.errors[str(tmp_path / "z.yaml")])


def test_run_enqueues_all_then_follows_changes_and_resyncs(tmp_path):
    path = write(tmp_path, "a")
    before = path.read_bytes()
    enqueued: list[str] = []

    async def body() -> None:
        stop = asyncio.Event()
        source = new_source(tmp_path, enqueued.append, resync_seconds=0.5)
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


def test_generations_survive_a_restart_of_the_source(tmp_path):
    write(tmp_path, "a")
    source = new_source(tmp_path)
    source.rescan()
    write(tmp_path, "a", version="0.2.0")
    source.rescan()
    assert source.generation("a") == 2
    source.store.close()
    again = new_source(tmp_path)
    again.rescan()
    assert again.generation("a") == 2, "an unchanged spec keeps its generation"


async def test_applied_specs_join_the_files_and_never_shadow_them(tmp_path):
    write(tmp_path, "a")
    enqueued: list[str] = []
    source = new_source(tmp_path, enqueued.append)
    source.rescan()
    [applied] = await source.apply(SPEC.format(name="b", version="1.0.0", team="x"))
    assert applied.origin == APPLIED
    assert applied.generation == 1
    assert source.declared_keys() == ["a", "b"]
    assert enqueued == ["b"]
    with pytest.raises(SpecError, match="declared by the spec file"):
        await source.apply(SPEC.format(name="a", version="2.0.0", team="x"))
    with pytest.raises(SpecError, match="remove it from that file"):
        await source.delete("a")
    assert await source.delete("b")
    assert source.declared_keys() == ["a"]
    assert enqueued == ["b", "b"]


async def test_an_invalid_apply_stores_nothing(tmp_path):
    source = new_source(tmp_path)
    with pytest.raises(SpecError, match=r"spec\.version"):
        await source.apply(SPEC.format(name="b", version="nope", team="x"))
    assert source.store.applied() == {}


async def _until(condition, what: str) -> None:
    async with asyncio.timeout(20):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_burst_of_writes_is_read_once_and_an_idle_watch_reads_nothing(
    tmp_path, monkeypatch
):
    write(tmp_path, "a")
    source = new_source(tmp_path, resync_seconds=3600)
    scans = []
    rescan = source.rescan

    def counted():
        scans.append(time.monotonic())
        return rescan()

    monkeypatch.setattr(source, "rescan", counted)
    stop = asyncio.Event()
    runner = asyncio.create_task(source.run(stop))
    await _until(lambda: len(scans) == 1, "the first scan")
    for version in range(1, 6):  # an editor's save is several events; so is a script's burst
        write(tmp_path, "a", version=f"0.{version}.0")
    await _until(lambda: len(scans) >= 2, "the burst read")
    await asyncio.sleep(0.3)  # longer than the debounce: no further reading comes
    assert len(scans) == 2, "one reading for the burst"
    desired = source.get("a")
    assert desired is not None
    assert str(desired.plugin.spec.version) == "0.5.0"
    stop.set()
    await runner


async def test_a_spec_directory_removed_and_made_again_is_watched_again(tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    write(specs, "a")
    enqueued: list[str] = []
    source = new_source(specs, enqueued.append, resync_seconds=3600)
    stop = asyncio.Event()
    runner = asyncio.create_task(source.run(stop))
    await _until(lambda: "a" in enqueued, "a enqueued")
    (specs / "a.yaml").unlink()
    specs.rmdir()
    # A directory that cannot be listed keeps what it declared (as a broken file does).
    await _until(lambda: str(specs) in source.errors, "the missing directory reported")
    assert source.get("a") is not None
    specs.mkdir()
    write(specs, "b")
    await _until(lambda: source.get("b") is not None, "b seen in the directory made again")
    stop.set()
    await runner
