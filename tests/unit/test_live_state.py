"""Live state on the in-memory runtime: the SDK's Store, pre-copy swaps, checkpoints, restores.

The revision chain is what keeps state whole: a delta applies only on the
revision it was made from, a checkpoint chain stops at its first missing
or damaged link, and a torn checkpoint is passed over for the one before.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from blackhole_sdk import RevisionError, Store

from controller.reconcile.reconciler import Reconciler
from controller.spec import conditions, models
from controller.state import snapshots

from .test_reconciler import World

STATEFUL = (
    "  state: {{version: 1{checkpoint}}}\n"
    "  hotSwap: {{scaleDownDelaySeconds: 30, preCopyTargetBytes: {target}{swap}}}\n"
)


def write(world: World, version: str, *, swap: str = "", checkpoint: str = "", target: int = 0):
    extra = STATEFUL.format(swap=swap, checkpoint=checkpoint, target=target)
    world.write("kv", version=version, extra=extra)


@pytest.fixture
def kv(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.reconciler.snapshots = snapshots.Snapshots(tmp_path / "data" / "snapshots.db")
    world.plugins.revisions = True
    write(world, "1.0.0")
    return world


def store(world: World, color: str) -> Store:
    return world.plugins.stores[f"bh-kv-{color}"]


def contents(s: Store) -> dict[str, object]:
    return {k: s[k] for k in s}


# The Store itself.


def test_a_delta_moves_exactly_what_changed_since_a_revision() -> None:
    source, target = Store(), Store()
    for i in range(100):
        source[f"k{i}"] = {"n": i}
    whole, revision = source.dump(), source.revision
    target.load(whole, revision)
    assert target.revision == revision
    source["k1"] = "changed"
    del source["k2"]
    source["new"] = [1, 2]
    delta = source.changes(revision)
    assert delta is not None
    data, now = delta
    assert json.loads(data) == {"set": {"new": [1, 2], "k1": "changed"}, "deleted": ["k2"]}
    target.apply(data, revision, now)
    assert contents(target) == contents(source)
    assert target.revision == source.revision


def test_a_delta_on_the_wrong_base_is_refused_and_changes_nothing() -> None:
    source, target = Store(), Store()
    source["a"] = 1
    target.load(source.dump(), source.revision)
    base = source.revision
    source["b"] = 2
    first = source.changes(base)
    assert first is not None
    source["c"] = 3
    second = source.changes(first[1])
    assert second is not None
    # The first delta was lost: the second does not apply on the state before it.
    with pytest.raises(RevisionError):
        target.apply(second[0], first[1], second[1])
    assert contents(target) == {"a": 1}
    target.apply(first[0], base, first[1])
    target.apply(second[0], first[1], second[1])
    assert contents(target) == {"a": 1, "b": 2, "c": 3}


def test_a_copy_written_locally_forks_so_no_revision_names_two_states() -> None:
    source, copy = Store(), Store()
    source["a"] = 1
    copy.load(source.dump(), source.revision)
    copy["x"] = "local"  # the copy diverges
    source["y"] = "remote"
    assert copy.revision != source.revision
    assert copy.revision.split(":")[0] != source.revision.split(":")[0]
    assert copy.changes(source.revision) is None, "no delta from a revision it does not own"


def test_deltas_from_before_forgotten_deletions_become_whole_copies() -> None:
    s = Store(tombstones=10)
    s["keep"] = 1
    old = s.revision
    for i in range(30):
        s[f"t{i}"] = i
        del s[f"t{i}"]
    assert s.changes(old) is None, "too old: the deletions since are forgotten"
    assert s.changes(s.revision) is not None


# Swaps.


async def ready_on_blue(world: World, entries: int = 50) -> Store:
    status = await world.settle("kv")
    assert conditions.is_true(status.conditions, "Ready")
    blue = store(world, "blue")
    for i in range(entries):
        blue[f"k{i}"] = {"value": i, "text": "x" * 100}
    return blue


async def test_a_pre_copy_swap_moves_writes_made_during_the_copy_and_holds_only_the_last(
    kv: World,
) -> None:
    blue = await ready_on_blue(kv)
    exports = []

    def writes_during_the_copy(name: str) -> None:  # the old color serves on meanwhile
        exports.append(name)
        if name == "bh-kv-blue" and name not in kv.plugins.draining:  # a frozen one takes none
            blue[f"written-during-{len(exports)}"] = len(exports)

    kv.plugins.on_export = writes_during_the_copy
    write(kv, "1.1.0", target=100)
    status = await kv.settle("kv")
    assert status.active_color is models.Color.GREEN
    assert status.last_swap is not None
    assert (status.last_swap.state_transfer or "").startswith("PreCopy")
    assert contents(store(kv, "green")) == contents(blue), "every write moved"
    assert status.last_swap.held_state_bytes is not None
    assert status.last_swap.state_bytes is not None
    assert status.last_swap.held_state_bytes < len(blue.dump()) / 10, "only a delta was held"
    assert status.last_swap.pause_milliseconds is not None
    kept = kv.reconciler.snapshots.checkpoints("kv")  # type: ignore[union-attr]
    swap = [s for s in kept if s.reason == "swap"]
    assert not swap[0].delta, "a full copy first"
    assert all(s.delta for s in swap[1:]), "then deltas"


async def test_a_delta_on_the_wrong_base_rolls_back_with_the_old_color_serving_intact(
    kv: World,
) -> None:
    blue = await ready_on_blue(kv)
    before = contents(blue)
    rounds = []

    def green_diverges(name: str) -> None:
        rounds.append(name)
        if len(rounds) == 2:  # between the first copy and the next delta: green writes
            store(kv, "green")["stray"] = "not from blue"
        if "bh-kv-blue" not in kv.plugins.draining:
            blue[f"w{len(rounds)}"] = len(rounds)

    kv.plugins.on_export = green_diverges
    write(kv, "1.1.0", target=10**6)
    status = await kv.settle("kv", passes=2)
    assert status.swap is None
    assert status.last_swap is not None
    assert status.last_swap.result == "RolledBack"
    assert status.last_swap.reason == "SwapFailedImport"
    assert status.active_color is models.Color.BLUE
    assert "bh-kv-green" not in kv.runtime.instances
    assert "bh-kv-blue" not in kv.plugins.draining, "the old color takes calls"
    assert {k: v for k, v in contents(blue).items() if not k.startswith("w")} == before


async def test_a_plugin_without_revisions_still_swaps_with_a_whole_copy(kv: World) -> None:
    kv.plugins.revisions = False
    await kv.settle("kv")
    kv.plugins.states["bh-kv-blue"] = b'{"a": 1}'
    write(kv, "1.1.0")
    status = await kv.settle("kv")
    assert status.active_color is models.Color.GREEN
    assert kv.plugins.states["bh-kv-green"] == b'{"a": 1}'
    assert status.last_swap is not None
    assert (status.last_swap.state_transfer or "").startswith("FullCopy")


async def test_a_rolled_back_swap_is_tried_again_after_its_settings_change_or_on_retry(
    kv: World,
) -> None:
    await ready_on_blue(kv)
    kv.plugins.failing["bh-kv-green"] = "import_state"
    write(kv, "1.1.0")
    status = await kv.settle("kv")
    assert status.last_swap is not None
    assert status.last_swap.result == "RolledBack"
    assert status.last_swap.pause_milliseconds is None, "it failed before calls were held"
    status = await kv.settle("kv")
    assert status.swap is None, "not tried again as is"
    assert status.active_version == "1.0.0"
    kv.plugins.failing.clear()
    write(kv, "1.1.0", swap=", maxPauseMilliseconds: 500")  # only a swap setting changes
    status = await kv.settle("kv")
    assert status.active_version == "1.1.0", "tried again, and promoted"

    kv.clock.offset += 31
    await kv.settle("kv")
    kv.plugins.failing["bh-kv-blue"] = "import_state"
    write(kv, "1.2.0", swap=", maxPauseMilliseconds: 500")
    status = await kv.settle("kv")
    assert status.last_swap is not None
    assert status.last_swap.result == "RolledBack"
    kv.plugins.failing.clear()
    kv.reconciler.request("kv", "retry")
    status = await kv.settle("kv")
    assert status.active_version == "1.2.0", "bhctl swap retry tries the same spec again"


async def test_a_rolled_back_swap_reports_how_long_calls_were_held(kv: World) -> None:
    kv.plugins.revisions = False  # a whole copy under the hold
    await kv.settle("kv")
    kv.plugins.states["bh-kv-blue"] = b"x" * 200_000
    kv.plugins.chunk_bytes = 16  # many chunks: more than 1 ms while held
    write(kv, "1.1.0", swap=", maxPauseMilliseconds: 1")
    status = await kv.settle("kv", passes=3)
    last = status.last_swap
    assert last is not None
    assert last.result == "RolledBack"
    assert last.reason == "SwapFailedPause"
    assert last.pause_milliseconds is not None
    assert last.pause_milliseconds > 1
    degraded = conditions.find(status.conditions, "Degraded")
    assert degraded is not None
    assert "maxPauseMilliseconds" in degraded.message
    assert kv.plugins.states["bh-kv-blue"] == b"x" * 200_000, "the old color kept its state"


# Checkpoints and restores.


async def checkpointed(world: World) -> None:
    world.clock.offset += 11  # past checkpointSeconds (10)
    await world.settle("kv", passes=1)


async def test_a_crashed_instance_gets_the_newest_checkpoint_back_before_it_is_ready(
    kv: World,
) -> None:
    blue = await ready_on_blue(kv)
    await checkpointed(kv)
    blue["after-the-first"] = 1
    await checkpointed(kv)
    blue["lost"] = "written after the last checkpoint"
    expected = {k: v for k, v in contents(blue).items() if k != "lost"}
    kept = kv.reconciler.snapshots.checkpoints("kv")  # type: ignore[union-attr]
    assert kept[-1].delta, "the second checkpoint is a delta"

    kv.runtime.crash("bh-kv-blue")
    kv.clock.offset += 2  # past the backoff
    status = await kv.settle("kv")
    assert conditions.is_true(status.conditions, "Ready")
    assert contents(store(kv, "blue")) == expected
    reasons = [e.reason for e in kv.store.events("kv")]
    restored = reasons.index("StateRestored")
    assert reasons.index("Ready", reasons.index("Restarted")) > restored, "restored, then Ready"
    assert status.last_restore is not None
    assert status.last_restore.checkpoint == kept[-1].id
    event = next(e for e in kv.store.events("kv") if e.reason == "StateRestored")
    assert f"checkpoint {kept[-1].id}" in event.message


async def test_a_damaged_checkpoint_is_skipped_for_the_newest_good_one(kv: World) -> None:
    blue = await ready_on_blue(kv)
    await checkpointed(kv)
    good = contents(blue)
    blue["in-the-damaged-delta"] = 1
    await checkpointed(kv)
    db = kv.reconciler.snapshots._db  # type: ignore[union-attr]
    newest = db.execute("SELECT max(id) FROM snapshots").fetchone()[0]
    db.execute("UPDATE snapshot_chunks SET data = x'00' WHERE snapshot = ?", (newest,))

    kv.runtime.crash("bh-kv-blue")
    kv.clock.offset += 2
    status = await kv.settle("kv")
    assert conditions.is_true(status.conditions, "Ready")
    assert contents(store(kv, "blue")) == good
    skipped = [e for e in kv.store.events("kv") if e.reason == "CheckpointSkipped"]
    assert skipped
    assert f"checkpoint {newest}" in skipped[0].message


async def test_a_lost_delta_ends_the_chain_before_it(kv: World) -> None:
    blue = await ready_on_blue(kv)
    await checkpointed(kv)
    good = contents(blue)
    blue["in-the-lost-delta"] = 1
    await checkpointed(kv)
    blue["in-the-orphan-delta"] = 2
    await checkpointed(kv)
    kept = kv.reconciler.snapshots.checkpoints("kv")  # type: ignore[union-attr]
    lost = kept[-2]
    assert lost.delta
    db = kv.reconciler.snapshots._db  # type: ignore[union-attr]
    db.execute("DELETE FROM snapshots WHERE id = ?", (lost.id,))

    kv.runtime.crash("bh-kv-blue")
    kv.clock.offset += 2
    await kv.settle("kv")
    assert contents(store(kv, "blue")) == good, "the orphan does not chain: not applied"


async def test_a_torn_checkpoint_is_never_read_and_removed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "snapshots.db"
    store_ = snapshots.Snapshots(path)
    ident = store_.begin("kv", "1.0.0", 1, "checkpoint", sha256="0" * 64, size=10, revision="e:1")
    store_.append(ident, 0, b"12345")  # the controller died here
    assert store_.checkpoints("kv") == []
    store_.close()
    again = snapshots.Snapshots(path)
    assert again._db.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 0


async def test_checkpoints_off_restores_nothing(kv: World) -> None:
    write(kv, "1.0.0", checkpoint=", checkpointSeconds: 0")
    blue = await ready_on_blue(kv)
    await checkpointed(kv)
    assert kv.reconciler.snapshots.checkpoints("kv") == []  # type: ignore[union-attr]
    assert len(blue) == 50
    kv.runtime.crash("bh-kv-blue")
    kv.clock.offset += 2
    await kv.settle("kv")
    assert len(store(kv, "blue")) == 0, "the plugin keeps its state itself: nothing restored"


async def test_a_recreated_instance_gets_the_state_it_had_when_it_was_stopped(kv: World) -> None:
    write(kv, "1.0.0", swap=", strategy: Recreate")
    blue = await ready_on_blue(kv)
    blue["just-before-the-edit"] = True  # no checkpoint is due: the replacement takes one
    write(kv, "1.1.0", swap=", strategy: Recreate")
    status = await kv.settle("kv")
    assert status.active_version == "1.1.0"
    assert store(kv, "blue") is not blue, "a new instance"
    assert contents(store(kv, "blue")) == contents(blue)


async def test_more_state_than_the_plugins_memory_can_hold_is_not_stored(kv: World) -> None:
    kv.plugins.revisions = False
    kv.write("kv", memory="6Mi", extra=STATEFUL.format(swap="", checkpoint="", target=0))
    await kv.settle("kv")
    kv.plugins.states["bh-kv-blue"] = b"x" * (7 << 20)  # a plugin claiming what it cannot hold
    await checkpointed(kv)
    assert kv.reconciler.snapshots.checkpoints("kv")[-1].size == 0  # type: ignore[union-attr]
    failed = [e for e in kv.store.events("kv") if e.reason == "CheckpointFailed"]
    assert failed
    assert "more than its memory limit" in failed[0].message


async def test_an_instance_replaced_while_no_controller_ran_gets_its_checkpoint(
    kv: World,
) -> None:
    """A process that answers its first handshake where the status recorded a Ready one (a
    pod the platform replaced while the controller was down) has none of the state: the
    next controller restores the newest checkpoint into it, as after a crash."""
    blue = await ready_on_blue(kv)
    await checkpointed(kv)
    expected = contents(blue)
    # The platform replaces the process: same instance, a new process with empty state.
    instance = kv.runtime.instances["bh-kv-blue"]
    kv.runtime.instances["bh-kv-blue"] = dataclasses.replace(instance, id=instance.id + "-new")
    kv.plugins.stores["bh-kv-blue"] = Store()
    kv.reconciler = Reconciler(kv.source, kv.runtime, kv.plugins, clock=kv.clock, requests=kv.store)
    kv.reconciler.snapshots = snapshots.Snapshots(kv.store.path.parent / "snapshots.db")
    status = await kv.settle("kv")
    assert conditions.is_true(status.conditions, "Ready")
    assert contents(store(kv, "blue")) == expected
    assert status.last_restore is not None


async def test_a_live_instance_adopted_by_a_new_controller_keeps_its_state(kv: World) -> None:
    """The same process answering again (a controller restart) is not given a checkpoint."""
    blue = await ready_on_blue(kv)
    await checkpointed(kv)
    blue["after-the-checkpoint"] = "kept"
    kv.reconciler = Reconciler(kv.source, kv.runtime, kv.plugins, clock=kv.clock, requests=kv.store)
    kv.reconciler.snapshots = snapshots.Snapshots(kv.store.path.parent / "snapshots.db")
    status = await kv.settle("kv")
    assert conditions.is_true(status.conditions, "Ready")
    assert store(kv, "blue")["after-the-checkpoint"] == "kept"
    assert status.last_restore is None
