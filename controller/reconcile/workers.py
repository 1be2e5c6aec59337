"""The workers: N tasks that take keys from the queue and run one reconcile pass each.

A pass's outcome decides what happens to its key, as in controller-runtime:
success forgets the key's backoff (and requeues it after ``requeue_after`` when
the result asks); a :class:`~controller.errors.TemporaryError` or an
unexpected exception requeues it with backoff; a
:class:`~controller.errors.PermanentError` does not requeue it: only a change
of its spec will.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controller.errors import ControllerError, PermanentError, TemporaryError
from controller.reconcile.queue import ShutDownError, WorkQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """What a successful pass asks of the queue."""

    requeue_after: float | None = None
    """Reconcile this key again after so many seconds (e.g. to check a waiting instance)."""


Handler = Callable[[str], Awaitable[Result]]


class WorkerPool:
    """Runs ``handler`` for queued keys on ``size`` workers until the queue shuts down."""

    def __init__(self, queue: WorkQueue, handler: Handler, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.queue = queue
        self.handler = handler
        self.size = size
        self.busy = 0
        """Workers running a pass right now."""
        self.observe: Callable[[str, float], None] = lambda result, seconds: None
        """Told each pass's result (success, requeue, retry, error, permanent) and duration."""

    async def run(self) -> None:
        """Run the workers; returns once the queue is shut down and every pass has ended."""
        async with asyncio.TaskGroup() as group:
            for index in range(self.size):
                group.create_task(self._work(), name=f"worker-{index}")

    async def _work(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDownError:
                return
            self.busy += 1
            started = time.perf_counter()
            outcome = "error"
            try:
                outcome = await self._process(key)
            finally:
                self.busy -= 1
                self.queue.done(key)
                self.observe(outcome, time.perf_counter() - started)

    async def _process(self, key: str) -> str:
        try:
            result = await self.handler(key)
        except asyncio.CancelledError:
            raise
        except PermanentError as e:
            log.warning("reconcile of %s failed permanently: %s", key, e, extra={"plugin": key})
            self.queue.forget(key)
            return "permanent"
        except TemporaryError as e:
            log.info("reconcile of %s will be retried: %s", key, e, extra={"plugin": key})
            if e.delay is not None:
                self.queue.add_after(key, e.delay)
            else:
                self.queue.add_rate_limited(key)
            return "retry"
        except ControllerError as e:  # a runtime refused or failed: retry with backoff
            log.warning("reconcile of %s failed: %s", key, e, extra={"plugin": key})
            self.queue.add_rate_limited(key)
            return "error"
        except Exception:
            log.exception("reconcile of %s failed", key, extra={"plugin": key})
            self.queue.add_rate_limited(key)
            return "error"
        self.queue.forget(key)
        if result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)
            return "requeue"
        return "success"
