"""The SDK's pytest plugin: the ``blackhole_plugin`` fixture, registered when the SDK is installed.

::

    def test_echo(blackhole_plugin):
        echo = blackhole_plugin(Echo())                 # in this process
        real = blackhole_plugin.subprocess("plugin.py")  # the real program
        assert echo.call("ping", {"x": 1}) == {"method": "ping", "payload": {"x": 1}}

Every plugin it starts is stopped after the test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from blackhole_sdk import testing
from blackhole_sdk.plugin import Plugin


class Launcher:
    """Starts plugins for one test and stops them after it."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack

    def __call__(self, plugin: Plugin, **options: Any) -> testing.Harness:
        """``plugin`` served from this process (options as :func:`testing.in_process`)."""
        return self._stack.enter_context(testing.in_process(plugin, **options))

    def subprocess(self, argv: Sequence[str] | str, **options: Any) -> testing.Harness:
        """The plugin program ``argv`` in a process of its own (see :func:`testing.subprocess`)."""
        return self._stack.enter_context(testing.subprocess(argv, **options))


@pytest.fixture
def blackhole_plugin() -> Iterator[Launcher]:
    """Start plugins in-process or as subprocesses; each is stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield Launcher(stack)
