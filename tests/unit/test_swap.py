"""Blue/green swaps on the in-memory runtime: promotion, every rollback, requests, interruption."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from controller.spec import conditions, models
from controller.state import snapshots

from .test_reconciler import World

STATEFUL = "  state: {{version: {state}}}\n  hotSwap: {{scaleDownDelaySeconds: 30{swap}}}\n"


def write(world: World, version: str, state: int = 1, swap: str = "") -> None:
    world.write("kv", version=version, extra=STATEFUL.format(state=state, swap=swap))


@pytest.fixture
def kv(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.reconciler.snapshots = snapshots.Snapshots(tmp_path / "data" / "snapshots.db")
    write(world, "1.0.0")
    return world


async def ready_on_blue(world: World) -> None:
    status = await world.settle("kv")
    assert conditions.is_true(status.conditions, "Ready")
    world.plugins.states["bh-kv-blue"] = b'{"a": 1}'


async def test_a_new_version_takes_over_with_the_state_and_the_old_goes_later(kv: World) -> None:
    await ready_on_blue(kv)
    write(kv, "1.1.0")
    status = await kv.settle("kv")
    assert status.active_color is models.Color.GREEN
    assert status.active_version == "1.1.0"
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.PROMOTED
    assert status.last_swap is not None
    assert status.last_swap.pause_milliseconds is not None
    assert kv.plugins.states["bh-kv-green"] == b'{"a": 1}', "the state moved"
    assert "bh-kv-blue" in kv.plugins.draining, "the old color is frozen, not changed"
    assert set(kv.runtime.instances) == {"bh-kv-blue", "bh-kv-green"}, "kept for rollback"
    history = kv.reconciler.snapshots.history("kv")  # type: ignore[union-attr]
    [snapshot] = [s for s in history if s.reason == "swap"]
    assert snapshot.plugin_version == "1.0.0"

    kv.clock.offset += 31
    status = await kv.settle("kv")
    assert set(kv.runtime.instances) == {"bh-kv-green"}
    assert status.swap is None
    assert status.phase is models.Phase.RUNNING
    assert status.last_swap is not None
    assert status.last_swap.result == "Promoted"
    assert [i.color for i in status.instances] == [models.Color.GREEN]
    reasons = [e.reason for e in kv.store.events("kv")]
    assert reasons[-3:] == ["SwapStarted", "SwapPromoted", "SwapCompleted"]


async def test_a_failed_import_rolls_back_and_is_not_tried_again(kv: World) -> None:
    await ready_on_blue(kv)
    kv.plugins.failing["bh-kv-green"] = "import_state"
    write(kv, "1.1.0")
    status = await kv.settle("kv")
    assert set(kv.runtime.instances) == {"bh-kv-blue"}
    assert status.active_color is models.Color.BLUE
    assert status.phase is models.Phase.DEGRADED
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.reason == "SwapFailedImport"
    assert conditions.is_true(status.conditions, "Ready"), "the old color still serves"
    assert "bh-kv-blue" not in kv.plugins.draining, "it takes calls again"
    assert kv.plugins.states["bh-kv-blue"] == b'{"a": 1}'
    starts = kv.runtime.calls["start"]
    await kv.settle("kv")
    assert kv.runtime.calls["start"] == starts, "the same spec is not swapped to again"
    write(kv, "1.1.1")
    kv.plugins.failing.clear()
    status = await kv.settle("kv")
    assert status.active_version == "1.1.1", "a new spec is tried"


async def test_a_new_color_that_never_gets_ready_rolls_back(kv: World) -> None:
    await ready_on_blue(kv)
    kv.runtime.unready.add("bh-kv-green")
    write(kv, "1.1.0")
    await kv.settle("kv")
    kv.clock.offset += 31
    status = await kv.settle("kv")
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.reason == "SwapFailedNotReady"
    assert set(kv.runtime.instances) == {"bh-kv-blue"}


async def test_a_crash_after_promotion_returns_to_the_old_color(kv: World) -> None:
    await ready_on_blue(kv)
    write(kv, "1.1.0")
    await kv.settle("kv")
    kv.runtime.crash("bh-kv-green", 1)
    status = await kv.settle("kv")
    assert status.active_color is models.Color.BLUE
    assert set(kv.runtime.instances) == {"bh-kv-blue"}
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.reason == "SwapFailedAfterPromotion"
    assert kv.plugins.states["bh-kv-blue"] == b'{"a": 1}', "the frozen state serves again"


async def test_one_failed_health_check_after_promotion_is_not_a_rollback(kv: World) -> None:
    """After promotion as before it: rolled back at failureThreshold checks in a row."""
    await ready_on_blue(kv)
    write(kv, "1.1.0")
    status = await kv.settle("kv")
    assert status.active_color is models.Color.GREEN
    kv.runtime.unready.add("bh-kv-green")
    status = await kv.settle("kv", passes=1)
    assert status.active_color is models.Color.GREEN, "one slow answer"
    assert status.swap is not None
    kv.runtime.unready.discard("bh-kv-green")
    status = await kv.settle("kv", passes=1)
    assert status.active_color is models.Color.GREEN
    kv.runtime.unready.add("bh-kv-green")
    status = await kv.settle("kv", passes=3)  # failureThreshold: 3 in a row
    assert status.active_color is models.Color.BLUE
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.reason == "SwapFailedAfterPromotion"
    assert "3 health check(s) in a row" in degraded.message


async def test_checks_and_manual_promotion(kv: World) -> None:
    await ready_on_blue(kv)
    check = ", autoPromote: false, checks: [{method: echo, payload: {x: 1}, expect: {x: 1}}]"
    write(kv, "1.1.0", swap=check)
    status = await kv.settle("kv")
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.AWAITING_PROMOTION
    assert status.active_color is models.Color.BLUE
    kv.reconciler.request("kv", "promote")
    status = await kv.settle("kv", passes=1)
    assert status.active_color is models.Color.GREEN

    bad = ", checks: [{method: echo, payload: {x: 1}, expect: {x: 2}}]"
    write(kv, "1.2.0", swap=bad)
    kv.clock.offset += 31
    status = await kv.settle("kv")
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.reason == "SwapFailedChecks"
    assert 'expected {"x": 2}' in degraded.message
    assert status.active_color is models.Color.GREEN


async def test_abort_puts_the_old_color_back(kv: World) -> None:
    await ready_on_blue(kv)
    write(kv, "1.1.0", swap=", autoPromote: false")
    await kv.settle("kv")
    kv.reconciler.request("kv", "abort")
    status = await kv.settle("kv", passes=1)
    assert status.last_swap is not None
    assert (status.last_swap.result, status.last_swap.reason) == ("Aborted", "SwapAborted")
    assert set(kv.runtime.instances) == {"bh-kv-blue"}


async def test_a_swap_cut_short_while_promoting_starts_over(kv: World) -> None:
    await ready_on_blue(kv)
    write(kv, "1.1.0", swap=", autoPromote: false")
    status = await kv.settle("kv")
    assert status.swap is not None
    # As a controller killed with calls held would have left it:
    status.swap.step = models.SwapStep.PROMOTING
    kv.store.put_status("kv", status)
    kv.plugins.draining.add("bh-kv-blue")
    status = await kv.settle("kv", passes=1)
    assert status.swap is None
    assert "bh-kv-blue" not in kv.plugins.draining
    assert set(kv.runtime.instances) == {"bh-kv-blue"}
    assert status.last_swap is not None
    assert status.last_swap.reason == "SwapInterrupted"
    status = await kv.settle("kv")
    assert status.swap is not None, "and it begins again"
    assert json.loads(kv.plugins.states["bh-kv-blue"]) == {"a": 1}


async def test_going_back_to_an_older_state_version_takes_the_newest_snapshot_it_reads(
    kv: World,
) -> None:
    await ready_on_blue(kv)  # 1.0.0, state version 1: {"a": 1}
    write(kv, "2.0.0", state=2)
    await kv.settle("kv")
    kv.plugins.states["bh-kv-green"] = b'{"a": 1, "written-by": 2}'
    kv.clock.offset += 31
    await kv.settle("kv")
    write(kv, "1.0.0", state=1)  # back, e.g. after 2.0.0 misbehaved
    status = await kv.settle("kv")
    assert status.active_version == "1.0.0"
    assert kv.plugins.states[f"bh-kv-{status.active_color}"] == b'{"a": 1}'
    promoted = [e for e in kv.store.events("kv") if e.reason == "SwapPromoted"][-1]
    assert re.search(r"cannot go back to 1: the state is snapshot \d+ \(1\.0\.0", promoted.message)


async def test_going_back_never_takes_an_export_or_an_import_for_a_checkpoint(
    kv: World,
) -> None:
    await ready_on_blue(kv)  # 1.0.0, state version 1: {"a": 1}
    write(kv, "2.0.0", state=2)
    await kv.settle("kv")
    kv.clock.offset += 31
    await kv.settle("kv")
    states = kv.reconciler.snapshots
    assert states is not None
    # Newer whole snapshots of state version 1 that are no checkpoints of the plugin's:
    states.save("kv", "2.0.0", 1, b'{"exported": 1}', snapshots.EXPORT)
    states.save("kv", "2.0.0", 1, b'{"imported": 1}', "import")
    assert states.get("kv", max_state_version=1).data == b'{"a": 1}'
    assert states.newest_full("kv", 1).reason in snapshots.CHECKPOINT_REASONS
    write(kv, "1.0.0", state=1)
    status = await kv.settle("kv")
    assert status.active_version == "1.0.0"
    assert kv.plugins.states[f"bh-kv-{status.active_color}"] == b'{"a": 1}'


async def test_undo_goes_back_to_the_previous_spec_until_the_spec_changes(kv: World) -> None:
    await ready_on_blue(kv)  # 1.0.0, state version 1
    write(kv, "1.1.0", state=2)
    await kv.settle("kv")
    kv.clock.offset += 31
    status = await kv.settle("kv")
    assert status.active_version == "1.1.0"
    assert status.swap is None
    kv.reconciler.request("kv", "undo")
    status = await kv.settle("kv")
    assert status.active_version == "1.0.0"
    assert status.swap is not None, "a swap back, blue/green like any other"
    assert kv.plugins.states[f"bh-kv-{status.active_color}"] == b'{"a": 1}'
    pinned = conditions.find(status.conditions, "Pinned")
    assert pinned is not None
    assert pinned.status == "True"
    assert "not the declared 1.1.0" in pinned.message
    kv.clock.offset += 31
    status = await kv.settle("kv")
    assert status.active_version == "1.0.0", "the pin holds while the spec is unchanged"
    progressing = conditions.find(status.conditions, "Progressing")
    assert progressing is not None
    assert "observed state matches the spec" not in progressing.message, "it does not"
    assert progressing.reason == "SwapUndone"
    write(kv, "1.2.0", state=2)
    kv.clock.offset += 31
    status = await kv.settle("kv", passes=8)
    assert status.active_version == "1.2.0"
    pinned = conditions.find(status.conditions, "Pinned")
    assert pinned is not None
    assert pinned.status == "False"


async def test_after_a_rollback_the_old_version_runs_on_through_restarts_and_crashes(
    kv: World,
) -> None:
    await ready_on_blue(kv)
    kv.plugins.failing["bh-kv-green"] = "import_state"
    write(kv, "1.1.0", state=2)
    await kv.settle("kv")
    # A restarted controller: nothing in memory, the same records.
    from controller.reconcile.reconciler import Reconciler

    snapshots_db = kv.reconciler.snapshots
    kv.reconciler = Reconciler(
        kv.source, kv.runtime, kv.plugins, snapshots=snapshots_db, clock=kv.clock
    )
    status = await kv.settle("kv")
    assert set(kv.runtime.instances) == {"bh-kv-blue"}
    assert status.phase is models.Phase.DEGRADED
    assert conditions.is_true(status.conditions, "Ready")
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert degraded.reason == "SwapFailedImport"
    kv.runtime.crash("bh-kv-blue", 1)
    kv.clock.offset += 5
    status = await kv.settle("kv")
    [instance] = kv.runtime.instances.values()
    assert instance.version == "1.0.0", "restarted as what it was, not as the refused spec"
    assert instance.state.value == "running"
    assert status.phase is models.Phase.DEGRADED


async def test_an_abort_with_the_old_color_gone_keeps_the_new_one(kv: World) -> None:
    await ready_on_blue(kv)
    write(kv, "1.1.0", state=2)
    await kv.settle("kv")
    kv.runtime.crash("bh-kv-blue", 1)
    kv.reconciler.request("kv", "abort")
    status = await kv.settle("kv", passes=1)
    assert status.active_color is models.Color.GREEN
    assert "bh-kv-green" in kv.runtime.instances
    assert "SwapNotAborted" in [e.reason for e in kv.store.events("kv")]


async def test_the_serving_color_is_health_checked_while_the_new_one_waits(kv: World) -> None:
    await ready_on_blue(kv)
    write(kv, "1.1.0", state=2, swap=", autoPromote: false")
    status = await kv.settle("kv")
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.AWAITING_PROMOTION
    kv.runtime.unready.add("bh-kv-blue")
    status = await kv.settle("kv", passes=1)
    ready = conditions.find(status.conditions, "Ready")
    assert ready is not None
    assert (ready.status, ready.reason) == ("False", "ActiveUnhealthy")
    kv.runtime.unready.clear()
    status = await kv.settle("kv", passes=1)
    assert conditions.is_true(status.conditions, "Ready")


async def test_each_spec_made_is_a_revision_and_undo_goes_back_to_any_of_them(kv: World) -> None:
    specs = kv.reconciler.specs
    assert specs is not None
    await ready_on_blue(kv)  # revision 1: 1.0.0
    write(kv, "1.1.0")
    await kv.settle("kv")
    assert [(r.revision, r.version, r.result) for r in specs.revisions("kv")] == [
        (1, "1.0.0", ""),
        (2, "1.1.0", "InProgress"),
    ]
    kv.clock.offset += 31
    await kv.settle("kv")
    write(kv, "1.2.0", swap=", checks: [{method: echo, payload: {x: 1}, expect: {x: 2}}]")
    status = await kv.settle("kv")
    assert status.active_version == "1.1.0"
    found = [(r.revision, r.version, r.result, r.reason) for r in specs.revisions("kv")]
    assert found == [
        (1, "1.0.0", "", ""),
        (2, "1.1.0", "Promoted", ""),
        (3, "1.2.0", "RolledBack", "SwapFailedChecks"),
    ]
    assert len({r.instance_hash for r in specs.revisions("kv")}) == 3

    asked = kv.reconciler.request("kv", "undo", "2")
    await kv.settle("kv", passes=1)
    answer = kv.store.request(asked.id)
    assert answer is not None
    assert (answer.outcome, answer.message) == ("Refused", "revision 2 (1.1.0) runs already")
    asked = kv.reconciler.request("kv", "undo", "9")
    await kv.settle("kv", passes=1)
    answer = kv.store.request(asked.id)
    assert answer is not None
    assert answer.outcome == "Refused"
    assert "no revision 9" in answer.message

    asked = kv.reconciler.request("kv", "undo", "1")
    status = await kv.settle("kv")
    answer = kv.store.request(asked.id)
    assert answer is not None
    assert answer.outcome == "Done"
    assert status.active_version == "1.0.0"
    pinned = conditions.find(status.conditions, "Pinned")
    assert pinned is not None
    assert pinned.status == "True"
    kv.clock.offset += 31
    status = await kv.settle("kv")
    assert status.active_version == "1.0.0", "the pin holds while the spec is unchanged"
    revisions = specs.revisions("kv")
    assert [(r.revision, r.version, r.result) for r in revisions][-1] == (4, "1.0.0", "Promoted")
    assert revisions[-1].instance_hash == revisions[0].instance_hash, "made again: a new number"


async def test_a_restart_makes_no_revision_and_old_ones_are_pruned(
    kv: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots, "REVISIONS_KEPT", 3)
    specs = kv.reconciler.specs
    assert specs is not None
    await ready_on_blue(kv)
    kv.runtime.crash("bh-kv-blue")
    await kv.settle("kv")
    assert [r.revision for r in specs.revisions("kv")] == [1]
    for minor in range(1, 5):
        write(kv, f"1.{minor}.0")
        await kv.settle("kv")
        kv.clock.offset += 31
        await kv.settle("kv")
    assert [(r.revision, r.version) for r in specs.revisions("kv")] == [
        (3, "1.2.0"),
        (4, "1.3.0"),
        (5, "1.4.0"),
    ]


def test_specs_of_an_earlier_file_become_the_first_revisions(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "snapshots.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE specs (key TEXT NOT NULL, instance_hash TEXT NOT NULL, spec TEXT NOT NULL, "
        "saved_at TEXT NOT NULL, PRIMARY KEY (key, instance_hash))"
    )
    db.executemany(
        "INSERT INTO specs VALUES (?, ?, ?, ?)",
        [
            ("kv", "bbb", '{"version": "1.1.0"}', "2026-01-02T00:00:00+00:00"),
            ("kv", "aaa", '{"version": "1.0.0"}', "2026-01-01T00:00:00+00:00"),
        ],
    )
    db.commit()
    db.close()
    specs = snapshots.Specs(snapshots.Snapshots(path))
    assert [(r.revision, r.version, r.instance_hash) for r in specs.revisions("kv")] == [
        (1, "1.0.0", "aaa"),
        (2, "1.1.0", "bbb"),
    ]
    assert specs.get("kv", "aaa") == '{"version": "1.0.0"}', "undo still finds them"
