"""The engine's event stream, read on a thread of its own: which plugins' containers changed.

docker-py's event stream blocks, so a daemon thread reads it and hands the
event loop two things: every container named in an event (what was known of
it is old) and the keys of plugins whose instances started, died or were
killed for memory, for the work queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from controller.runtimes import base

log = logging.getLogger(__name__)

EVENTS = frozenset({"start", "die", "oom"})
"""Container events that send the plugin to the queue."""
KEEPS_INSPECTION = frozenset({"update"})
"""Container events that change nothing an inspection says of it (an ``update`` changes its
resources, as the start-up CPU boost's lowering does to every instance that starts): what is
known of it stays."""


def selector(controller_id: str) -> dict[str, list[str]]:
    """The engine's filter for the events of ``controller_id``'s containers.

    One label, and actions picked by :func:`follow`: Podman 4 honours only the
    first value of a repeated filter key.
    """
    return {"label": [f"{base.LABEL_CONTROLLER}={controller_id}"]}


def follow(
    stream: Iterable[Any],
    name: str,
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[str | None],
    forget: Callable[[str], None],
) -> threading.Thread:
    """Read ``stream`` on a new thread until it ends; None is queued then.

    ``forget`` is called on the loop with each container's name an event
    names (but those of :data:`KEEPS_INSPECTION`); the key of each plugin
    whose instance started, died or was killed for memory is put in ``queue``.
    """

    def pump() -> None:
        try:
            for event in stream:
                data: dict[str, Any] = event
                action = str(data.get("Action") or data.get("status") or "")
                if data.get("Type") != "container":
                    continue
                labels = (data.get("Actor") or {}).get("Attributes") or {}
                if labels.get("name") and action not in KEEPS_INSPECTION:  # it is old now
                    loop.call_soon_threadsafe(forget, str(labels["name"]))
                if action not in EVENTS:
                    continue
                if labels.get(base.LABEL_MANAGED_BY) != base.MANAGED_BY:
                    continue
                if labels.get(base.LABEL_PLUGIN) and base.LABEL_COLOR in labels:
                    loop.call_soon_threadsafe(queue.put_nowait, base.key_of(labels))
        except Exception:  # the stream ends when it is closed or when the engine goes away
            log.debug("%s event stream ended", name, exc_info=True)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(queue.put_nowait, None)

    thread = threading.Thread(target=pump, name=f"{name}-events", daemon=True)
    thread.start()
    return thread
