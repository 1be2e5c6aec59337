"""inotify(7) through ctypes: watches of single directories, read by an event loop.

Below every other module of the controller: the runtimes watch socket
directories with it (:mod:`controller.runtimes.inotify`), the directory
source its spec directory.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
"""inotify event bits (inotify(7)); IN_IGNORED: the watch is gone (its directory removed)."""
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """Watches of single directories (never recursive: nothing below them is looked at).

    Its descriptor is non-blocking: an event loop reads it when it is
    readable (``loop.add_reader``), so a watch costs no wake-ups while
    nothing changes.
    """

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify: {os.strerror(code)}")

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
