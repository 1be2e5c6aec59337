"""The controller's stores under faults: a read-only or full database, a damaged file.

SQLite's own switches stand in for the disk here (``query_only`` fails every
write as a read-only file does, ``max_page_count`` as a full disk does); the
integration tests fill a real tmpfs and remount it read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from controller import database
from controller.errors import StoreUnavailableError
from controller.metrics import telemetry
from controller.sources.directory import DirectorySource
from controller.sources.store import Store
from controller.spec import models
from controller.state import snapshots

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
spec:
  image: blackhole/example-echo:0.1.0
  version: {version}
"""


def write(directory: Path, name: str, version: str = "0.1.0") -> None:
    (directory / f"{name}.yaml").write_text(SPEC.format(name=name, version=version))


def read_only(store: Store, on: bool) -> None:
    store._db.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")


async def until(condition, what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)
    assert condition(), what


@contextlib.asynccontextmanager
async def running(source: DirectorySource) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


def new(tmp_path: Path) -> tuple[DirectorySource, Store, telemetry.Metrics, list[str]]:
    specs = tmp_path / "specs"
    specs.mkdir()
    metrics = telemetry.Metrics(CollectorRegistry())
    store = Store(tmp_path / "data" / "state.db", metrics.stores)
    queued: list[str] = []
    return DirectorySource(specs, store, queued.append), store, metrics, queued


def errors(metrics: telemetry.Metrics, store: str, operation: str) -> float:
    value = metrics.registry.get_sample_value(
        "blackhole_store_errors_total", {"store": store, "operation": operation}
    )
    return value or 0.0


async def test_a_spec_edit_on_a_read_only_store_waits_and_is_taken_in_once_it_works(tmp_path):
    source, store, metrics, queued = new(tmp_path)
    assert source.directory is not None
    write(source.directory, "a")
    async with running(source):
        await until(lambda: source.get("a") is not None, "a is declared")
        read_only(store, True)
        write(source.directory, "a", version="0.2.0")  # needs a new generation: a write
        write(source.directory, "b")  # a new plugin: a write
        await until(lambda: store.health.failing("state"), "the fault is seen")
        # Each file is read in turn: b's may come after the fault a's edit met.
        await until(lambda: source.declares("b"), "b's file is read")
        fault = store.health.faults()["state"]
        assert fault.reason == "ReadOnly"
        assert errors(metrics, "state", "write_generation") >= 1
        available = {"store": "state"}
        assert metrics.registry.get_sample_value("blackhole_store_available", available) == 0
        kept = source.get("a")
        assert kept is not None
        assert str(kept.plugin.spec.version) == "0.1.0", "the last recorded spec goes on"
        assert source.get("b") is None, "a new spec waits for the store"
        assert [e.reason for e in store.health.events] == ["StoreUnavailable"]
        read_only(store, False)

        def taken_in() -> bool:
            a, b = source.get("a"), source.get("b")
            return a is not None and str(a.plugin.spec.version) == "0.2.0" and b is not None

        await until(taken_in, "the edits are taken in once the store works again")
        assert source.generation("a") == 2
        assert not store.health.failing()
        assert [e.reason for e in store.health.events] == ["StoreUnavailable", "StoreRecovered"]
        assert "b" in queued


async def test_status_and_events_are_kept_while_the_store_cannot_take_them(tmp_path):
    source, store, _, _ = new(tmp_path)
    assert source.directory is not None
    write(source.directory, "a")
    async with running(source):
        await until(lambda: source.get("a") is not None, "a is declared")
        read_only(store, True)
        status = models.PluginStatus(phase=models.Phase.RUNNING)
        with pytest.raises(StoreUnavailableError) as raised:
            await source.write_status("a", status)
        assert raised.value.reason == "ReadOnly"
        assert await source.read_status("a") == status, "what was not written reads back"
        await source.record_event("a", "Normal", "Ready", "a is Ready")  # does not raise
        assert [e.reason for e in await source.events("a")] == ["Ready"]
        read_only(store, False)
        await until(lambda: not source.degraded, "what waited is written")
        assert store.status("a") == status
        assert [e.reason for e in store.events("a")] == ["Ready"]


async def test_a_full_disk_is_a_fault_of_its_own(tmp_path):
    source, store, metrics, _ = new(tmp_path)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    for index in range(100):
        await source.record_event("a", "Normal", "Spam", "x" * 4000 + str(index))  # never raises
    with pytest.raises(StoreUnavailableError) as raised:
        store.record("a", "Normal", "Spam", "y" * 4000)
    assert raised.value.reason == "DiskFull"
    assert len(await source.events("a")) > 1, "the events the disk could not take are kept"
    assert store.health.faults()["state"].reason == "DiskFull"
    assert errors(metrics, "state", "record_event") >= 1


def test_reads_that_work_do_not_clear_a_write_fault(tmp_path):
    _, store, _, _ = new(tmp_path)
    read_only(store, True)
    with pytest.raises(StoreUnavailableError):
        store.put_applied("a", "{}")
    assert store.applied() == {}
    assert store.health.failing("state"), "a full disk reads: only a write says it works again"
    read_only(store, False)
    store.put_applied("a", "{}")
    assert not store.health.failing("state")


def test_a_mistake_of_ours_is_not_a_fault_of_the_disk(tmp_path):
    _, store, _, _ = new(tmp_path)
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.applied()
    assert not store.health.failing()


def damage_header(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.write(b"this is not a database at all!" * 4)


def damage_pages(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(4096)  # the header page stays: the file opens, its tables do not read
        handle.write(b"\xa5" * (size - 4096))


def filled_snapshots(path: Path) -> None:
    store = snapshots.Snapshots(path)
    for index in range(20):
        store.save("kv", "1.0.0", 1, bytes([index]) * 20_000, "export")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()


def test_a_snapshot_store_with_a_damaged_header_is_moved_aside_at_start(tmp_path):
    path = tmp_path / "snapshots.db"
    filled_snapshots(path)
    damage_header(path)
    health = database.Health()
    store = snapshots.Snapshots(path, health=health)  # no traceback: a fresh store
    assert store.history("kv") == []
    aside = sorted(tmp_path.glob("snapshots.db.damaged-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))], "moved aside"
    reset = health.resets()["snapshots"]
    assert str(path) in reset.message
    assert aside[0].name in reset.message
    assert [e.reason for e in health.events] == ["StoreDamaged"]
    store.save("kv", "1.0.0", 1, b"again", "export")
    assert len(store.history("kv")) == 1


def test_damaged_snapshot_pages_found_at_start_are_reported_once_and_it_starts_afresh(tmp_path):
    path = tmp_path / "snapshots.db"
    filled_snapshots(path)
    damage_pages(path)
    health = database.Health()
    store = snapshots.Snapshots(path, health=health)
    for _ in range(3):
        with pytest.raises(snapshots.SnapshotNotFoundError):
            store.get("kv")  # the fresh store: nothing in it, and no fault
    assert [e.reason for e in health.events] == ["StoreDamaged"], "one report, naming the file"
    assert str(path) in health.events[0].message
    assert not health.failing()


def test_damaged_snapshot_pages_found_later_are_reported_once_and_it_starts_afresh(tmp_path):
    path = tmp_path / "snapshots.db"
    store = snapshots.Snapshots(path)
    chunk = bytes(range(256)) * 1024
    ident = store.begin("kv", "1.0.0", 1, "checkpoint", sha256="0", size=0, revision="r1")
    for seq in range(8):
        store.append(ident, seq, chunk)
    store.finish(ident, "kv")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    size = path.stat().st_size
    with path.open("r+b") as handle:  # the chunks, at the end of the file
        handle.seek(size // 2)
        handle.write(b"\xa5" * (size - size // 2))
    health = database.Health()
    store = snapshots.Snapshots(path, health=health)
    assert [s.id for s in store.checkpoints("kv")] == [ident]
    with pytest.raises(StoreUnavailableError) as raised:
        list(store.chunks(ident))
    assert raised.value.reason == "Damaged"
    assert [e.reason for e in health.events] == ["StoreDamaged"], "one report, naming the file"
    assert str(path) in health.events[0].message
    assert list(tmp_path.glob("snapshots.db.damaged-*")), "moved aside"
    assert store.checkpoints("kv") == [], "the fresh store"
    assert not health.failing()
    specs = snapshots.Specs(store)
    specs.save("kv", "abc", "{}")
    assert specs.get("kv", "abc") == "{}", "what shares the file follows it to the fresh one"


def test_a_damaged_snapshot_store_is_replaced_at_most_once_per_backoff(tmp_path):
    health = database.Health()
    assert health.may_reset("snapshots", 100.0)
    assert not health.may_reset("snapshots", 100.1)
    assert health.may_reset("snapshots", 100.0 + database.FIRST_RETRY)
    assert not health.may_reset("snapshots", 100.0 + database.FIRST_RETRY * 2)


def test_a_damaged_state_store_stops_start_up_with_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "state.db"
    Store(path).close()
    damage_header(path)
    with pytest.raises(StoreUnavailableError) as raised:
        Store(path)
    assert raised.value.reason == "Damaged"
    assert str(path) in str(raised.value)
    assert ".recover" in str(raised.value)
    assert path.exists(), "never replaced: it holds applied specs and swaps in progress"
