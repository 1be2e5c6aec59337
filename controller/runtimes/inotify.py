"""The watch that sees a starting instance's socket appear (inotify: :mod:`controller.inotify`).

Shared by the container and process backends: both learn that an instance
can be Ready the moment its socket is bound, instead of at the next probe.
Watches are of single directories, never recursive: nothing below them is
looked at.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from controller.errors import RuntimeBackendError
from controller.inotify import IN_CREATE, IN_IGNORED, IN_MOVED_TO, Inotify
from controller.runtimes import base


class SocketWatch:
    """The socket directories of starting instances, each watched until its socket appears.

    A backend opens it while it follows its events (:meth:`open`), watches an
    instance's directory before starting it (:meth:`add`), and hands each
    event of the descriptor to :meth:`appeared`, which gives the key of the
    plugin whose socket just appeared (its watch then removed).
    """

    def __init__(self) -> None:
        self.notify: Inotify | None = None
        self._keys: dict[int, str] = {}
        """Watch to the key of the plugin whose instance's directory it is."""

    def open(self) -> Inotify:
        try:
            self.notify = Inotify()
        except OSError as e:
            raise RuntimeBackendError(str(e)) from e
        return self.notify

    def close(self) -> None:
        if self.notify is not None:
            self.notify.close()
        self.notify = None
        self._keys.clear()

    def add(self, directory: Path, key: str, mask: int = IN_CREATE | IN_MOVED_TO) -> None:
        """Watch ``directory`` for the socket of ``key``'s instance; nothing while not open.

        Created, or renamed into place (the SDK binds under another name and renames the
        socket once it listens)."""
        if self.notify is not None:
            with contextlib.suppress(OSError):  # the directory is gone: nothing will appear
                self._keys[self.notify.add(directory, mask)] = key

    def appeared(self, wd: int, mask: int, filename: str) -> str | None:
        """The plugin key whose socket this event shows appearing, else None."""
        if mask & IN_IGNORED:  # its directory was removed
            self._keys.pop(wd, None)
            return None
        if filename != base.SOCKET_NAME or wd not in self._keys:
            return None
        if self.notify is not None:
            self.notify.remove(wd)
        return self._keys.pop(wd)
