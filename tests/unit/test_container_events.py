"""The engine's event stream as the container backend reads it: what it forgets and queues,
and what its cache of inspections then knows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from controller.runtimes import base
from controller.runtimes.container import events, inspection


def event(action: str, name: str) -> dict[str, Any]:
    labels = {
        "name": name,
        base.LABEL_MANAGED_BY: base.MANAGED_BY,
        base.LABEL_PLUGIN: "echo",
        base.LABEL_COLOR: "blue",
    }
    return {"Type": "container", "Action": action, "Actor": {"Attributes": labels}}


async def followed(stream: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    forgotten: list[str] = []
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    events.follow(stream, "docker", asyncio.get_running_loop(), queue, forgotten.append)
    queued = []
    while (key := await queue.get()) is not None:
        queued.append(key)
    await asyncio.sleep(0)  # the callbacks queued before the end have run
    return forgotten, queued


def test_an_update_keeps_what_an_inspection_said_and_other_events_drop_it() -> None:
    stream = [event("create", "a"), event("start", "a"), event("update", "a"), event("die", "b")]
    forgotten, queued = asyncio.run(followed(stream))
    assert forgotten == ["a", "a", "b"]  # not a third time for the update
    assert queued == ["echo", "echo"]  # its start and b's death


def test_a_name_the_engine_did_not_list_is_no_container_until_it_changes() -> None:
    cache = inspection.InspectionCache()
    cache.listed(time.monotonic(), ["bh-a-blue"])
    assert cache.get("bh-b-blue") == (False, None), "not while events are not followed"
    cache.following = True
    cache.forget("bh-c-blue")  # changed before the list was asked for
    time.sleep(0.001)
    cache.listed(time.monotonic(), ["bh-a-blue"])
    assert cache.get("bh-b-blue") == (True, None)
    assert cache.get("bh-a-blue") == (False, None), "a listed one is inspected"
    assert cache.get("bh-c-blue") == (True, None)
    cache.forget("bh-b-blue")  # an event: it may exist now
    assert cache.get("bh-b-blue") == (False, None)
    cache.stop_following()
    assert cache.get("bh-d-blue") == (False, None)
