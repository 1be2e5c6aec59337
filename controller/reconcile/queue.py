"""The work queue: client-go's ``util/workqueue`` semantics on asyncio.

Keys (plugin names, or ``namespace/name``) go in; workers take them out one
at a time. Like client-go's rate-limited delaying queue:

- a *dirty* set drops duplicates: a key added ten times before a worker takes
  it is reconciled once;
- a *processing* set keeps a key off two workers at once: a key added while it
  is being processed is remembered and queued again when :meth:`WorkQueue.done`
  is called, so the newest state is always reconciled after the change;
- :meth:`WorkQueue.add_after` queues a key later, the earliest pending time
  winning; :meth:`WorkQueue.add_rate_limited` uses per-key exponential backoff
  with jitter, reset by :meth:`WorkQueue.forget` after a success;
- unlike client-go's, a key taken by a worker drops its pending delay: the
  workers delay a key only after a pass over it, as that pass's result or
  error says, so the pass it is taken for says anew when it is due (an event
  that brings a plugin early saves the pass its last delay would have made);
- :meth:`WorkQueue.shut_down` drops what waits and releases idle workers;
  :meth:`WorkQueue.drain` also waits for the passes in flight to finish.
  Nothing is lost by dropping: a restarted controller lists every key again.

Not thread-safe: every method must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from dataclasses import dataclass, field


class ShutDownError(Exception):
    """Raised by :meth:`WorkQueue.get` once the queue is shut down and empty."""


@dataclass
class Backoff:
    """Per-key exponential backoff with jitter: ``base * 2**failures``, capped, +- jitter."""

    base: float = 0.05
    """Delay after the first failure, in seconds."""
    cap: float = 300.0
    """Longest delay, in seconds."""
    jitter: float = 0.1
    """Each delay is spread uniformly over +- this fraction, so that keys failing
    together do not retry together."""
    rand: Callable[[], float] = field(default=random.random, repr=False)
    _failures: dict[str, int] = field(default_factory=dict, repr=False)

    def when(self, key: str) -> float:
        """Record one more failure of ``key`` and return how long to wait before retrying it."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self.cap, self.base * 2.0 ** min(failures, 64))
        return max(0.0, delay * (1 + self.jitter * (2 * self.rand() - 1)))

    def failures(self, key: str) -> int:
        """How often ``key`` failed since it was last forgotten."""
        return self._failures.get(key, 0)

    def forget(self, key: str) -> None:
        """Reset ``key``'s backoff, after a successful pass or when it is deleted."""
        self._failures.pop(key, None)


class WorkQueue:
    """A deduplicating, rate-limited, delaying FIFO of keys for N workers."""

    def __init__(self, backoff: Backoff | None = None) -> None:
        self.backoff = backoff or Backoff()
        self._queue: collections.deque[str] = collections.deque()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._shutting_down = False

    def __len__(self) -> int:
        """Keys waiting for a worker (not those being processed or delayed)."""
        return len(self._queue)

    @property
    def processing(self) -> int:
        """Keys a worker holds right now."""
        return len(self._processing)

    @property
    def delayed(self) -> int:
        """Keys waiting for their time to come."""
        return len(self._timers)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def add(self, key: str) -> None:
        """Queue ``key`` now, unless it is queued already."""
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done()
        self._queue.append(key)
        self._notify()

    def add_after(self, key: str, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds; an earlier pending time for it wins."""
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def add_rate_limited(self, key: str) -> None:
        """Queue ``key`` after its next backoff delay."""
        self.add_after(key, self.backoff.when(key))

    def forget(self, key: str) -> None:
        """Reset ``key``'s backoff (it does not take the key out of the queue)."""
        self.backoff.forget(key)

    async def get(self) -> str:
        """Take the next key, dropping its pending delay; the caller must call :meth:`done`
        with it when finished."""
        while not self._queue or self._shutting_down:
            if self._shutting_down:
                raise ShutDownError
            await self._wait()
        key = self._queue.popleft()
        self._processing.add(key)
        self._dirty.discard(key)
        pending = self._timers.pop(key, None)
        if pending is not None:  # this pass says when it is due next
            pending[1].cancel()
        return key

    def done(self, key: str) -> None:
        """Mark ``key`` finished; if it was added meanwhile, queue it again."""
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._queue.append(key)
        self._notify()

    def shut_down(self) -> None:
        """Stop accepting keys, drop queued and delayed ones, release waiting workers."""
        self._shutting_down = True
        self._queue.clear()
        self._dirty.clear()
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._notify()

    async def drain(self) -> None:
        """Shut down and wait until no key is being processed."""
        self.shut_down()
        while self._processing:
            await self._wait()

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
