"""Status that tells the truth: the phase read from the conditions, transition times that move
only on flips, errors that reach status, and a swap's probe backoff that survives passes."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.errors import RuntimeBackendError
from controller.reconcile import status as status_module
from controller.runtimes import base
from controller.spec import conditions, models
from controller.state import snapshots

from .test_reconciler import World

STATEFUL = "  state: {{version: 1}}\n  hotSwap: {{scaleDownDelaySeconds: 30{swap}}}\n"


def consistent(status: models.PluginStatus) -> None:
    """The phase is what the conditions say, and the conditions say one thing."""
    found = status.conditions
    assert status.phase is conditions.phase_of(found)
    ready = conditions.is_true(found, conditions.READY)
    degraded = conditions.is_true(found, conditions.DEGRADED)
    if status.phase is models.Phase.RUNNING:
        assert ready
        assert not degraded
    if status.phase is models.Phase.DEGRADED:
        assert degraded
    if status.phase is models.Phase.PENDING:
        assert not ready
        assert not degraded
    if status.phase is models.Phase.FAILED:
        assert conditions.is_true(found, conditions.STALLED)
        assert not ready
    if status.phase is models.Phase.SWAPPING:
        progressing = conditions.find(found, conditions.PROGRESSING)
        assert progressing is not None
        assert progressing.reason in conditions.SWAP_REASONS
    assert len({c.type for c in found}) == len(found)


def transitions_move_only_on_flips(before: models.PluginStatus, after: models.PluginStatus) -> None:
    for condition in after.conditions:
        old = conditions.find(before.conditions, condition.type)
        if old is not None and old.status == condition.status:
            assert old.last_transition_time == condition.last_transition_time, condition.type


ACTIONS = st.lists(
    st.sampled_from(
        ["pass", "crash", "oom", "tick", "long-tick", "unready", "ready", "version", "pause"]
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS)
async def test_phase_and_conditions_never_disagree_over_random_observations(
    actions: list[str],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        world.write("echo")
        await world.settle("echo", passes=3)
        versions = iter(f"1.{n}.0" for n in range(1, 100))
        previous = world.store.status("echo")
        assert previous is not None
        for action in actions:
            instance = next(iter(world.runtime.instances), None)
            if action in ("crash", "oom") and instance:
                world.runtime.crash(instance, exit_code=1, oom=action == "oom", line="boom")
            elif action == "tick":
                world.clock.offset += 1.5
            elif action == "long-tick":
                world.clock.offset += 120
            elif action == "unready" and instance:
                world.runtime.unready.add(instance)
            elif action == "ready":
                world.runtime.unready.clear()
            elif action == "version":
                world.write("echo", version=next(versions))
            elif action == "pause" and instance:
                world.runtime.pause(instance)
            await world.reconciler.reconcile("echo")
            current = world.store.status("echo")
            assert current is not None
            consistent(current)
            transitions_move_only_on_flips(previous, current)
            previous = current


FINDINGS = st.builds(
    conditions.Finding,
    ready=st.sampled_from(["True", "False", "Unknown"]),
    reason=st.sampled_from(["InstanceReady", "CrashLoop", "BackOff", "InvalidSpec"]),
    message=st.text(max_size=20),
    progressing=st.none()
    | st.tuples(
        st.sampled_from([*sorted(conditions.SWAP_REASONS), "BackOff", "InstanceStarting"]),
        st.text(max_size=10),
    ),
    degraded=st.none() | st.tuples(st.sampled_from(["CrashLoop", "SwapFailedChecks"]), st.text()),
    stalled=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(first=FINDINGS, second=FINDINGS, held_back=st.booleans(), pinned=st.booleans())
def test_computed_status_is_consistent_for_any_finding(
    first: conditions.Finding, second: conditions.Finding, held_back: bool, pinned: bool
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    record = models.PluginStatus(
        last_swap=models.SwapStatus(
            from_version="1.0.0", to_version="1.1.0", result="RolledBack", reason="SwapAborted"
        )
    )
    beside = status_module.Beside(
        held_back=held_back, pinned=("1.0.0", "1.1.0") if pinned else None
    )
    one = status_module.compute(models.PluginStatus(), record, first, beside, 1, now)
    two = status_module.compute(one, record, second, beside, 1, now + timedelta(seconds=5))
    consistent(one)
    consistent(two)
    transitions_move_only_on_flips(one, two)


async def test_backing_off_after_a_restart_is_degraded_in_phase_and_condition(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.write("echo")
    await world.settle("echo")
    world.runtime.crash("bh-echo-blue", exit_code=1)
    world.clock.offset += 1.1
    await world.settle("echo")  # restarted once
    world.runtime.crash("bh-echo-blue", exit_code=1)
    await world.reconciler.reconcile("echo")  # within its backoff now
    status = world.store.status("echo")
    assert status is not None
    degraded = conditions.find(status.conditions, conditions.DEGRADED)
    assert degraded is not None
    assert degraded.status == "True"
    assert degraded.reason == "BackOff"
    assert status.phase is models.Phase.DEGRADED
    consistent(status)


@pytest.fixture
def kv(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.reconciler.snapshots = snapshots.Snapshots(tmp_path / "data" / "snapshots.db")
    world.write("kv", extra=STATEFUL.format(swap=""))
    return world


async def test_a_rolled_back_swap_keeps_its_degraded_transition_time(kv: World) -> None:
    await kv.settle("kv")
    kv.plugins.failing["bh-kv-green"] = "import_state"
    kv.write("kv", version="1.1.0", extra=STATEFUL.format(swap=""))
    await kv.settle("kv", passes=8)
    status = kv.store.status("kv")
    assert status is not None
    assert status.last_swap is not None
    assert status.last_swap.result == "RolledBack"
    degraded = conditions.find(status.conditions, conditions.DEGRADED)
    assert degraded is not None
    assert degraded.status == "True"
    again: models.PluginStatus | None = status
    for _ in range(10):  # time passes, nothing changes
        kv.clock.offset += 5
        await kv.reconciler.reconcile("kv")
        again = kv.store.status("kv")
        assert again is not None
        after = conditions.find(again.conditions, conditions.DEGRADED)
        assert after == degraded
        consistent(again)
    assert again is not None
    progressing = conditions.find(again.conditions, conditions.PROGRESSING)
    assert progressing is not None
    assert "observed state matches" not in progressing.message


async def test_a_starting_swap_backs_off_its_probes_across_passes(kv: World) -> None:
    await kv.settle("kv")
    kv.runtime.unready.add("bh-kv-green")
    kv.write("kv", version="1.1.0", extra=STATEFUL.format(swap=""))
    delays = []
    for _ in range(8):
        result = await kv.reconciler.reconcile("kv")
        assert result.requeue_after is not None
        delays.append(result.requeue_after)
    assert delays[1:] == sorted(delays[1:]), delays
    assert delays[-1] >= 0.5, f"still probing every {delays[-1] * 1000:.0f} ms: {delays}"
    status = kv.store.status("kv")
    assert status is not None
    assert status.phase is models.Phase.SWAPPING


async def test_an_error_a_pass_meets_reaches_status_with_one_event(tmp_path: Path) -> None:
    world = World(tmp_path)
    original = world.runtime.start

    async def refuse(desired: base.InstanceSpec) -> base.Instance:
        raise RuntimeBackendError("invalid mount config: mount path must be absolute")

    world.runtime.start = refuse  # type: ignore[method-assign]
    world.write("echo")
    for _ in range(5):
        with pytest.raises(RuntimeBackendError):
            await world.reconciler.reconcile("echo")
    status = world.store.status("echo")
    assert status is not None
    ready = conditions.find(status.conditions, conditions.READY)
    assert ready is not None
    assert ready.status == "False"
    assert ready.reason == "RuntimeError"
    assert "mount path must be absolute" in ready.message
    assert status.phase is models.Phase.DEGRADED
    warnings = [e for e in world.store.events("echo") if e.reason == "RuntimeError"]
    assert len(warnings) == 1, "one event, not one per pass"
    world.runtime.start = original  # type: ignore[method-assign]
    status = await world.settle("echo")
    assert status.phase is models.Phase.RUNNING
    consistent(status)


def test_what_the_runtime_cannot_enforce_is_a_condition_until_it_can() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    found = conditions.Finding("True", "InstanceReady", "answers")
    why = {"spec.resources.pids": "no per-pod PID limit here"}
    one = status_module.compute(
        models.PluginStatus(),
        models.PluginStatus(),
        found,
        status_module.Beside(unenforced=why),
        1,
        now,
    )
    unenforced = conditions.find(one.conditions, conditions.UNENFORCED)
    assert unenforced is not None
    assert (unenforced.status, unenforced.reason) == ("True", "NotEnforced")
    assert unenforced.message == "spec.resources.pids: no per-pod PID limit here"
    assert one.phase is models.Phase.RUNNING  # a warning: it runs, Ready
    consistent(one)
    two = status_module.compute(one, models.PluginStatus(), found, status_module.Beside(), 1, now)
    after = conditions.find(two.conditions, conditions.UNENFORCED)
    assert after is not None
    assert (after.status, after.reason) == ("False", "Enforced")
    never = status_module.compute(
        models.PluginStatus(), models.PluginStatus(), found, status_module.Beside(), 1, now
    )
    assert conditions.find(never.conditions, conditions.UNENFORCED) is None
