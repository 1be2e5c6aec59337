"""The engine's event stream as the container backend reads it: what it forgets and queues."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.runtimes import base
from controller.runtimes.container import events


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
