"""The process runtime's seccomp filter, loaded in a forked child: what it refuses, what it allows.

The child loads it as a plugin process does (after ``no_new_privs``) and
reports what each system call did; the filter stays in the child only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
from typing import Any

from controller.runtimes.process import seccomp, shim

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
AF_VSOCK = 40


def _errno_of(call: Any) -> int:
    try:
        call()
    except OSError as e:
        return e.errno or -1
    return 0


def _probe() -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)

    def unshare(flags: int) -> None:
        if libc.unshare(flags) < 0:
            raise OSError(ctypes.get_errno(), "unshare")

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 7:
            raise OSError(errno.ECHILD, "the child did not run")

    userns = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True, check=False)
    return {
        "unshare_user": _errno_of(lambda: unshare(CLONE_NEWUSER)),
        "unshare_mount": _errno_of(lambda: unshare(CLONE_NEWNS)),
        "unshare_command": [userns.returncode, userns.stderr.decode(errors="replace")],
        "fork": _errno_of(fork),
        "tcp": _errno_of(lambda: socket.socket(socket.AF_INET).close()),
        "unix": _errno_of(lambda: socket.socket(socket.AF_UNIX).close()),
        "vsock": _errno_of(lambda: socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()),
        "mount": _errno_of(lambda: _mount(libc)),
        "getpid": os.getpid() > 0,
    }


def _mount(libc: Any) -> None:
    if libc.mount(b"none", b"/", None, ctypes.c_ulong(0x20), None) < 0:
        raise OSError(ctypes.get_errno(), "mount")


def in_filtered_child() -> dict[str, Any]:
    program = seccomp.program()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(shim.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0:
                raise OSError(ctypes.get_errno(), "no_new_privs")
            shim.load_seccomp(program)
            os.write(write, json.dumps(_probe()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    return dict(json.loads(text))


def test_namespaces_mounts_and_vsock_are_refused_and_the_rest_works():
    seen = in_filtered_child()
    assert seen["unshare_user"] == errno.EPERM, "no user namespace, with full capabilities in it"
    assert seen["unshare_mount"] == errno.EPERM
    code, message = seen["unshare_command"]
    assert code != 0
    assert "Operation not permitted" in message
    assert seen["mount"] == errno.EPERM
    assert seen["vsock"] == errno.EPERM
    assert (seen["fork"], seen["tcp"], seen["unix"]) == (0, 0, 0), "what a plugin needs works"
    assert seen["getpid"]


def test_the_filter_is_a_bpf_program():
    program = seccomp.program()
    assert len(program) % 8 == 0
    assert len(program) // 8 > len(seccomp.ALLOWED) // 2
