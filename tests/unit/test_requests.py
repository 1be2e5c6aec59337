"""Operators' requests go through the plugin's own pass: recorded in the store first (so they
survive a restart), answered by the pass, refused with a reason while a swap runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from controller.reconcile.reconciler import Reconciler
from controller.spec import conditions
from controller.state import snapshots

from .test_reconciler import World

STATEFUL = "  state: {version: 1}\n  hotSwap: {scaleDownDelaySeconds: 30, autoPromote: false}\n"


@pytest.fixture
def kv(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.reconciler.snapshots = snapshots.Snapshots(tmp_path / "data" / "snapshots.db")
    world.write("kv", extra=STATEFUL)
    return world


def restarted(world: World) -> Reconciler:
    """Another controller over the same store, as after a restart."""
    again = Reconciler(
        world.source, world.runtime, world.plugins, clock=world.clock, requests=world.store
    )
    again.snapshots = world.reconciler.snapshots
    return again


async def test_a_swap_request_survives_a_restart_of_the_controller(kv: World) -> None:
    await kv.settle("kv")
    kv.write("kv", version="1.1.0", extra=STATEFUL)
    status = await kv.settle("kv")
    assert status.swap is not None
    assert status.swap.step.value == "AwaitingPromotion"
    request = kv.reconciler.request("kv", "promote")  # recorded; the controller dies here
    kv.reconciler = restarted(kv)
    status = await kv.settle("kv", passes=2)
    assert status.active_version == "1.1.0"
    kv.clock.offset += 31
    status = await kv.settle("kv", passes=2)
    assert status.swap is None
    answer = kv.store.request(request.id)
    assert answer is not None
    assert answer.outcome == "Done"


async def test_a_promote_before_the_new_color_is_ready_waits_for_it(kv: World) -> None:
    await kv.settle("kv")
    kv.runtime.unready.add("bh-kv-green")
    kv.write("kv", version="1.1.0", extra=STATEFUL)
    await kv.settle("kv", passes=2)
    request = kv.reconciler.request("kv", "promote")
    await kv.settle("kv", passes=3)
    pending = kv.store.request(request.id)
    assert pending is not None
    assert pending.outcome is None, "kept until the new color can be promoted"
    kv.runtime.unready.clear()
    status = await kv.settle("kv", passes=4)
    assert status.active_version == "1.1.0"
    done = kv.store.request(request.id)
    assert done is not None
    assert done.outcome == "Done"


async def test_a_state_import_is_carried_out_by_the_pass(kv: World) -> None:
    await kv.settle("kv")
    kv.plugins.states["bh-kv-blue"] = b'{"a": 1}'
    store = kv.reconciler.snapshots
    assert store is not None
    data = b'{"b": 2}'
    kept = store.save("kv", "1.0.0", 1, data, "import")
    request = kv.reconciler.request("kv", "import", str(kept.id))
    await kv.reconciler.reconcile("kv")
    assert kv.plugins.states["bh-kv-blue"] == data
    answer = kv.store.request(request.id)
    assert answer is not None
    assert answer.outcome == "Done"
    assert hashlib.sha256(data).hexdigest() in answer.message
    previous = [s for s in store.history("kv") if s.reason == "before-import"]
    assert len(previous) == 1
    assert [e.reason for e in kv.store.events("kv")][-1] == "StateImported"


async def test_a_state_import_during_a_swap_is_refused_with_a_reason(kv: World) -> None:
    await kv.settle("kv")
    kv.plugins.states["bh-kv-blue"] = b'{"a": 1}'
    kv.write("kv", version="1.1.0", extra=STATEFUL)
    status = await kv.settle("kv")
    assert status.swap is not None
    store = kv.reconciler.snapshots
    assert store is not None
    kept = store.save("kv", "1.0.0", 1, b'{"b": 2}', "import")
    request = kv.reconciler.request("kv", "import", str(kept.id))
    await kv.reconciler.reconcile("kv")
    answer = kv.store.request(request.id)
    assert answer is not None
    assert answer.outcome == "Refused"
    assert "swap to 1.1.0 is in progress" in answer.message
    assert kv.plugins.states["bh-kv-blue"] == b'{"a": 1}', "the state is left as it was"
    after = kv.store.status("kv")
    assert after is not None
    assert conditions.is_true(after.conditions, conditions.READY)


async def test_a_request_for_a_deleted_plugin_is_refused(kv: World) -> None:
    await kv.settle("kv")
    request = kv.reconciler.request("kv", "undo")
    (kv.specs / "kv.yaml").unlink()
    kv.source.rescan()
    await kv.reconciler.reconcile("kv")
    answer = kv.store.request(request.id)
    assert answer is not None
    assert answer.outcome == "Refused"
