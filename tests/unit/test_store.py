"""The controller's SQLite records: generations, status, bounded events."""

from __future__ import annotations

from pathlib import Path

from controller.sources import store
from controller.spec import models


def test_events_are_bounded_and_repeats_counted(tmp_path: Path) -> None:
    records = store.Store(tmp_path / "state.db")
    for i in range(store.EVENTS_KEPT + 10):
        records.record("a", "Normal", "Created", f"event {i}")
    records.record("a", "Warning", "CrashLoop", "again")
    records.record("a", "Warning", "CrashLoop", "again")
    events = records.events("a")
    assert len(events) == store.EVENTS_KEPT
    assert events[-1].count == 2
    assert events[0].message == "event 11"
    assert (tmp_path / "state.db").stat().st_mode & 0o777 == 0o600


def test_status_is_kept_per_generation_and_forgotten(tmp_path: Path) -> None:
    records = store.Store(tmp_path / "state.db")
    assert records.generation("a", "h1") == 1
    assert records.generation("a", "h1") == 1
    assert records.generation("a", "h2") == 2
    records.put_status("a", models.PluginStatus(phase=models.Phase.RUNNING))
    status = records.status("a")
    assert status is not None
    assert status.phase is models.Phase.RUNNING
    records.record("a", "Normal", "Created", "x")
    records.forget("a")
    assert records.status("a") is None
    assert records.events("a") == []
    assert records.generation("a", "h2") == 1, "a plugin declared again starts over"
