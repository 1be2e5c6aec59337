"""inotify through ctypes, and the watch that sees a starting instance's socket appear.

Shared by the container and process backends: both learn that an instance
can be Ready the moment its socket is bound, instead of at the next probe.
Watches are of single directories, never recursive: nothing below them is
looked at.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from pathlib import Path

from controller.errors import RuntimeBackendError
from controller.runtimes import base

IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_IGNORED = 0x8000
"""inotify event bits: a name moved in, a name created, the watch gone (its directory removed)."""
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """Watches of single directories (never recursive: nothing below them is looked at).

    How runtimes see an instance's socket appear: its directory is the
    plugin's, and a watch that descended into it would follow whatever
    links the plugin put there.
    """

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            code = ctypes.get_errno()
            raise RuntimeBackendError(f"inotify: {os.strerror(code)}")

    def add(self, path: Path, mask: int) -> int:
        wd = int(_libc.inotify_add_watch(self.fd, str(path).encode(), mask))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify watch of {path}: {os.strerror(code)}")
        return wd

    def remove(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int, str]]:
        """The (watch, event bits, file name) of each event that arrived."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        events, offset = [], 0
        while offset + 16 <= len(data):
            wd, mask, _, size = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode(errors="replace")
            events.append((wd, mask, name))
            offset += 16 + size
        return events

    def close(self) -> None:
        os.close(self.fd)


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
        self.notify = Inotify()
        return self.notify

    def close(self) -> None:
        if self.notify is not None:
            self.notify.close()
        self.notify = None
        self._keys.clear()

    def add(self, directory: Path, key: str, mask: int = IN_CREATE) -> None:
        """Watch ``directory`` for the socket of ``key``'s instance; nothing while not open."""
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
