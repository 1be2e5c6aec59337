"""The work queue and workers, with client-go's semantics."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from controller.errors import PermanentError, TemporaryError
from controller.reconcile.queue import Backoff, ShutDownError, WorkQueue
from controller.reconcile.workers import Result, WorkerPool


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def test_duplicates_are_dropped_and_order_kept():
    async def body() -> None:
        q = WorkQueue()
        for key in ["a", "b", "a", "c", "b"]:
            q.add(key)
        assert len(q) == 3
        assert [await q.get() for _ in range(3)] == ["a", "b", "c"]

    run(body)


def test_a_key_added_while_processing_runs_again_after_done():
    async def body() -> None:
        q = WorkQueue()
        q.add("a")
        key = await q.get()
        q.add("a")
        q.add("a")
        assert len(q) == 0, "a key being processed must not be handed to a second worker"
        q.done(key)
        assert len(q) == 1
        assert await q.get() == "a"
        q.done("a")
        assert len(q) == 0

    run(body)


def test_get_waits_for_a_key():
    async def body() -> None:
        q = WorkQueue()
        getter = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        assert not getter.done()
        q.add("x")
        assert await getter == "x"

    run(body)


def test_add_after_keeps_the_earliest_time():
    async def body() -> None:
        q = WorkQueue()
        q.add_after("a", 5)
        q.add_after("a", 0.02)
        q.add_after("a", 10)
        assert q.delayed == 1
        assert await asyncio.wait_for(q.get(), 1) == "a"
        assert q.delayed == 0

    run(body)


def test_a_key_taken_early_drops_its_pending_delay():
    async def body() -> None:
        q = WorkQueue()
        q.add_after("a", 0.05)
        q.add_after("b", 0.05)
        q.add("a")  # an event brings it before its time
        assert await q.get() == "a"
        assert q.delayed == 1, "the pass it is taken for says when it is due next"
        q.done("a")
        assert await asyncio.wait_for(q.get(), 1) == "b"
        q.done("b")
        await asyncio.sleep(0.1)
        assert len(q) == 0, "a's old delay must not bring it again"

    run(body)


def test_backoff_doubles_is_capped_jittered_and_reset():
    b = Backoff(base=1, cap=8, jitter=0, rand=lambda: 0.5)
    assert [b.when("k") for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert b.failures("k") == 6
    assert b.when("other") == 1, "backoff is per key"
    b.forget("k")
    assert b.when("k") == 1
    low = Backoff(base=1, jitter=0.1, rand=lambda: 0.0).when("k")
    high = Backoff(base=1, jitter=0.1, rand=lambda: 1.0).when("k")
    assert low == pytest.approx(0.9)
    assert high == pytest.approx(1.1)


def test_shut_down_releases_workers_and_drops_waiting_keys():
    async def body() -> None:
        q = WorkQueue()
        waiting = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        q.add_after("later", 0.01)
        q.shut_down()
        with pytest.raises(ShutDownError):
            await waiting
        q.add("new")
        await asyncio.sleep(0.02)
        assert (len(q), q.delayed) == (0, 0)

    run(body)


def test_drain_waits_for_passes_in_flight():
    async def body() -> None:
        q = WorkQueue()
        finished: list[str] = []
        release = asyncio.Event()

        async def handler(key: str) -> Result:
            await release.wait()
            finished.append(key)
            return Result()

        pool = WorkerPool(q, handler, size=2)
        runner = asyncio.create_task(pool.run())
        q.add("a")
        q.add("b")
        q.add("c")
        await until(lambda: pool.busy == 2)
        drain = asyncio.create_task(q.drain())
        await asyncio.sleep(0.01)
        assert not drain.done(), "drain returned while passes were in flight"
        release.set()
        await drain
        await runner
        assert sorted(finished) == ["a", "b"], "queued keys are dropped, in-flight ones finish"

    run(body)


def test_no_key_is_ever_processed_by_two_workers_at_once():
    async def body() -> None:
        q = WorkQueue()
        active: set[str] = set()
        overlaps: list[str] = []
        passes: dict[str, int] = {}
        rng = random.Random(7)

        async def handler(key: str) -> Result:
            if key in active:
                overlaps.append(key)
            active.add(key)
            passes[key] = passes.get(key, 0) + 1
            await asyncio.sleep(rng.random() / 500)
            active.discard(key)
            return Result()

        pool = WorkerPool(q, handler, size=8)
        runner = asyncio.create_task(pool.run())
        for _ in range(500):
            q.add(f"k{rng.randrange(10)}")
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        await until(lambda: len(q) == 0 and q.processing == 0)
        await q.drain()
        await runner
        assert overlaps == []
        assert set(passes) == {f"k{i}" for i in range(10)}
        assert sum(passes.values()) < 500, "duplicates were not merged"

    run(body)


def outcome_pool(
    outcome: Callable[[int], Awaitable[Result]],
) -> tuple[WorkQueue, WorkerPool, list[float]]:
    """A pool whose handler's n-th call does ``outcome(n)``; records each call's time."""
    q = WorkQueue(Backoff(base=0.01, cap=1, jitter=0))
    calls: list[float] = []

    async def handler(key: str) -> Result:
        calls.append(asyncio.get_running_loop().time())
        return await outcome(len(calls))

    return q, WorkerPool(q, handler, size=1), calls


def test_temporary_errors_back_off_then_success_forgets():
    async def body() -> None:
        async def outcome(n: int) -> Result:
            if n <= 3:
                raise TemporaryError("not yet")
            return Result()

        q, pool, calls = outcome_pool(outcome)
        runner = asyncio.create_task(pool.run())
        q.add("k")
        await until(lambda: len(calls) == 4)
        await until(lambda: q.processing == 0)
        assert q.backoff.failures("k") == 0, "success must reset the backoff"
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert gaps[0] >= 0.009
        assert gaps[1] >= 0.019
        assert gaps[2] >= 0.039
        await q.drain()
        await runner

    run(body)


def test_unexpected_errors_are_retried_permanent_ones_are_not():
    async def body() -> None:
        async def crash(n: int) -> Result:
            if n == 1:
                raise RuntimeError("boom")
            raise PermanentError("invalid spec")

        q, pool, calls = outcome_pool(crash)
        runner = asyncio.create_task(pool.run())
        q.add("k")
        await until(lambda: len(calls) == 2)
        await asyncio.sleep(0.1)
        assert len(calls) == 2, "a permanent error must not be retried"
        assert q.delayed == 0
        await q.drain()
        await runner

    run(body)


def test_requeue_after_and_explicit_delay():
    async def body() -> None:
        async def outcome(n: int) -> Result:
            if n == 1:
                return Result(requeue_after=0.05)
            if n == 2:
                raise TemporaryError("engine busy", delay=0.05)
            return Result()

        q, pool, calls = outcome_pool(outcome)
        runner = asyncio.create_task(pool.run())
        q.add("k")
        await until(lambda: len(calls) == 3)
        assert calls[1] - calls[0] >= 0.049
        assert calls[2] - calls[1] >= 0.049
        await q.drain()
        await runner

    run(body)
