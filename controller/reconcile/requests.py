"""Operators' requests of one plugin (``bhctl swap ...``, a state import), as the reconciler
keeps them: recorded first, then carried out and answered by a pass of the plugin, the one
writer of its instances and routes."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Protocol

from controller.sources import store


class Requests(Protocol):
    """Where operators' requests are recorded (:class:`~controller.sources.store.Store`)."""

    def put_request(self, key: str, action: str, argument: str = "") -> store.Request: ...

    def pending_request(self, key: str) -> store.Request | None: ...

    def answer_request(self, id: int, outcome: str, message: str) -> None: ...

    def request(self, id: int) -> store.Request | None: ...


class MemoryRequests:
    """Requests kept in memory, for a reconciler without a store (tests)."""

    def __init__(self) -> None:
        self._all: dict[int, store.Request] = {}
        self._ids = itertools.count(1)

    def put_request(self, key: str, action: str, argument: str = "") -> store.Request:
        request = store.Request(next(self._ids), key, action, argument)
        self._all[request.id] = request
        return request

    def pending_request(self, key: str) -> store.Request | None:
        pending = (r for r in self._all.values() if r.key == key and r.outcome is None)
        return min(pending, key=lambda r: r.id, default=None)

    def answer_request(self, id: int, outcome: str, message: str) -> None:
        found = self._all[id]
        if found.outcome is None:
            self._all[id] = dataclasses.replace(found, outcome=outcome, message=message)

    def request(self, id: int) -> store.Request | None:
        return self._all.get(id)
