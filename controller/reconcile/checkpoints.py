"""Checkpoints of a Ready instance's state, and restores into the instances that replace it.

A plugin with ``spec.state`` and ``checkpointSeconds`` above 0 has its
state checkpointed into the snapshot store while it is Ready; a new
instance of it (after a crash, an OOM kill, a removal or a Recreate
replacement) gets the newest good checkpoint back before it is Ready, so
before any route leads to it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from datetime import UTC, datetime

from controller.errors import ControllerError
from controller.runtimes import base
from controller.spec import models
from controller.state import snapshots as snapshots_module
from controller.swap import context, transfer

log = logging.getLogger(__name__)

STATE_TIMEOUT = 60.0
"""Longest a checkpoint or a restore may take, in seconds."""


class Checkpoints:
    """The checkpoints and restores of the plugin of one pass."""

    def __init__(
        self, ctx: context.PassContext, services: context.Services, effects: context.Effects
    ) -> None:
        self.c = ctx
        self.s = services
        self.e = effects

    def store(self) -> snapshots_module.Snapshots | None:
        """The store, when this plugin's state is checkpointed (and restored)."""
        state = self.c.spec.state
        if state is None or not state.checkpoint_seconds or self.s.snapshots is None:
            return None
        return self.s.snapshots

    async def restore(self, current: base.Instance, endpoint: str) -> bool:
        """Give a new instance the newest good checkpoint before it is Ready; False: try later.

        Runs once per instance: when it first answers its handshake and
        health check, before any route leads to it.
        """
        c, metrics = self.c, self.s.metrics
        store = self.store()
        if store is None:
            return True
        try:
            restored = await transfer.restore(
                self.s.plugins, store, c.key, endpoint, timeout=STATE_TIMEOUT
            )
        except (ControllerError, OSError, sqlite3.Error) as e:
            log.warning("restoring %s failed: %s", current.name, e, extra=c.log)
            c.found(
                "False",
                "RestoringState",
                f"restoring the state failed: {e}",
                progressing=("RestoringState", f"restoring the state of {current.name}"),
            )
            return False
        for skipped, why in restored.skipped:
            metrics.restores.labels(c.key, "Skipped").inc()
            await self.e.event(
                "Warning",
                "CheckpointSkipped",
                f"checkpoint {skipped.id} (taken {skipped.taken_at:%Y-%m-%d %H:%M:%S}Z) was "
                f"not restored: {why}",
            )
        snapshot = restored.snapshot
        if snapshot is None:
            if restored.skipped:
                metrics.restores.labels(c.key, "Empty").inc()
                await self.e.event(
                    "Warning", "NoCheckpoint", f"{current.name} starts empty: no good checkpoint"
                )
            c.memory.checkpointed = 0.0
            return True
        now = datetime.now(UTC)
        age = max(0.0, (now - snapshot.taken_at).total_seconds())
        metrics.restores.labels(c.key, "Restored").inc()
        metrics.restored_age.labels(c.key).set(age)
        c.status.last_restore = models.RestoreStatus(
            checkpoint=snapshot.id,
            revision=snapshot.revision,
            taken=snapshot.taken_at,
            age_seconds=round(age, 3),
            time=now,
            instance=current.name,
        )
        c.memory.checkpointed = 0.0  # a new lineage: checkpoint it soon
        await self.e.event(
            "Normal",
            "StateRestored",
            f"restored checkpoint {snapshot.id} (revision {snapshot.revision or 'none'}, "
            f"taken {snapshot.taken_at:%Y-%m-%d %H:%M:%S}Z, {age:.1f}s old) into "
            f"{current.name} before it was Ready; writes after it were lost",
        )
        return True

    async def checkpoint(self, current: base.Instance, endpoint: str, full: bool = False) -> float:
        """Checkpoint the Ready instance's state when it is due; the delay to the next pass."""
        c, metrics = self.c, self.s.metrics
        period = float(c.spec.health.period_seconds)
        store = self.store()
        if store is None:
            return period
        assert c.spec.state is not None
        every = float(c.spec.state.checkpoint_seconds)
        due = c.memory.checkpointed + every - c.now
        if due > 0:
            return min(period, due)
        try:
            taken = await transfer.checkpoint(
                self.s.plugins,
                store,
                c.key,
                endpoint,
                current.version,
                timeout=STATE_TIMEOUT,
                full=full,
                limit=c.spec.resources.memory.as_int(),
            )
        except (ControllerError, OSError, sqlite3.Error) as e:
            metrics.checkpoint_failures.labels(c.key).inc()
            if not c.memory.checkpoint_failing:
                await self.e.event("Warning", "CheckpointFailed", f"{current.name}: {e}")
            c.memory.checkpoint_failing = True
            return min(period, every)
        if c.memory.checkpoint_failing:
            await self.e.event("Normal", "CheckpointResumed", f"{current.name}: checkpointed again")
        c.memory.checkpoint_failing = False
        c.memory.checkpointed = c.now
        if taken.snapshot is not None:
            kind = "delta" if taken.snapshot.delta else "full"
            metrics.checkpoints.labels(c.key, kind).inc()
            metrics.checkpoint_bytes.labels(c.key).inc(taken.snapshot.size)
        return min(period, every)

    async def last(self, current: base.Instance) -> None:
        """Checkpoint an instance about to be replaced (stop, then start), whatever is due."""
        if self.store() is None:
            return
        endpoint = self.s.runtime.endpoint(current)
        with contextlib.suppress(ControllerError):
            # No new calls reach it (its route is cleared); let those in flight land.
            drain = float(self.c.spec.hot_swap.drain_timeout_seconds)
            await self.s.routes.wait_idle(endpoint, drain)
        self.c.memory.checkpointed = 0.0
        await self.checkpoint(current, endpoint, full=True)  # the next may be another version
