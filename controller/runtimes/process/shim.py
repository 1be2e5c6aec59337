"""The launcher program and each instance's shim: a warm fork server that starts plugins isolated.

Run by the process runtime as a program of its own (:mod:`.launcher` starts
it and speaks its protocol; the standard library only, so it loads no part
of the controller), it imports the plugin SDK and gRPC once, then keeps one
forked copy of itself waiting: a warm interpreter. On cgroup v1 that copy
first forks a **spare** plugin process and moves it into a spare group
``.spare-<pid>`` of its own in each hierarchy (the move waits for an RCU
grace period of the kernel's, 5-25 ms: done before any start, not in one);
the spare runs nothing more until it is handed a request. The backend writes
a launch request (length-prefixed JSON) to the launcher's stdin; the waiting
copy takes it, renames the spare's groups to the instance's (cgroup v1 allows
a rename within the parent) and writes the spec's limits into them (without
a spare: makes the groups, and the plugin process joins them), tells the
launcher (which forks the next copy, which makes the next spare: the launcher
itself never reads a request, so no plugin's settings linger in the memory
the next plugin or spare is forked from) and becomes the instance's
**shim**: it hands the spare its request (or forks the plugin), answers the
backend with the plugin's pid, writes the
instance's state file, copies the plugin's output into its log (kept under
``LOG_BYTES``: past it the log moves to ``.log.1``, so a chatty plugin
cannot fill the controller's disk), waits for the plugin and writes its exit
file (exit code, 128 + signal when killed, whether its cgroup's OOM killer
fired). The shim is in a session of its own: plugins and shims outlive the
launcher and the controller, whose next run adopts them.

The plugin process, before it runs a line of the plugin's code, is in its
cgroups with their limits written (a spare: it was moved in before its start;
else it joins them), enters new mount, PID, IPC, UTS and (``network``) network
namespaces with only loopback up, pivots into a read-only root built from
bind mounts (system directories, the plugin's code, its interpreter) with a
private ``/tmp``, ``/run`` and minimal ``/dev``, its socket directory at
``/run/blackhole``, drops to an unprivileged uid with no capabilities and
``no_new_privs``, loads the seccomp filter the backend compiled
(:mod:`.seccomp`), and then runs the plugin: in this interpreter, the SDK
already imported (``warm``), or by executing another one.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import gc
import json
import os
import signal
import socket
import struct
import sys
import time
import traceback
from typing import Any

LOG_BYTES = 8 << 20
"""Most bytes of plugin output kept in its log; the previous part is kept as ``.log.1``."""

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
SYSCALLS = {
    "x86_64": {"pivot_root": 155, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "mount_setattr": 442},
}
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
"""The device nodes a plugin gets in its /dev."""
PRELOAD = ("asyncio", "json", "logging", "runpy", "blackhole_sdk", "blackhole_sdk.server")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def _read_only(target: str) -> None:
    """Make a bind mount and every mount below it read-only, nosuid and nodev.

    ``mount_setattr`` (Linux 5.12) does the whole tree at once; older kernels
    get the top mount remounted, which covers the usual system directories.
    """
    number = SYSCALLS.get(os.uname().machine, {}).get("mount_setattr")
    if number is not None:
        attr = struct.pack(
            "QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0
        )
        buffer = ctypes.create_string_buffer(attr, len(attr))
        result = _libc.syscall(number, AT_FDCWD, target.encode(), AT_RECURSIVE, buffer, len(attr))
        if result == 0:
            return
        if ctypes.get_errno() != errno.ENOSYS:
            _check(result, f"make {target} read-only")
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    mount("none", target, None, flags, None)


def _pivot_root(new_root: str) -> None:
    number = SYSCALLS.get(os.uname().machine, {}).get("pivot_root")
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown on {os.uname().machine}")
    os.chdir(new_root)
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def load_seccomp(program: bytes) -> None:
    """Load a compiled seccomp filter (BPF, 8 bytes an instruction) on this process, for good.

    Needs ``no_new_privs`` (or CAP_SYS_ADMIN); the filter is inherited by
    every child and survives ``execve``.
    """
    if not program or len(program) % 8:
        raise ValueError(f"a seccomp filter of {len(program)} bytes is not a BPF program")
    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(instructions, ctypes.c_void_p))
    mode = ctypes.c_ulong(SECCOMP_MODE_FILTER)
    zero = ctypes.c_ulong(0)
    _check(_libc.prctl(PR_SET_SECCOMP, mode, ctypes.byref(fprog), zero, zero), "seccomp")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        import fcntl

        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


# The plugin process: isolation, then the plugin.


def _make_root(request: dict[str, Any]) -> None:
    """Build the plugin's root in a tmpfs on ``request["root"]`` and pivot into it.

    The private ``/tmp`` and ``/run`` are mounted first and the bind mounts
    after, on top of them: a plugin's code or interpreter under ``/tmp`` (a
    checkout there) is then seen in its place, not hidden by the private one.
    """
    root = request["root"]
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for name in ("proc", "dev", "tmp", "run"):
        os.makedirs(f"{root}/{name}", mode=0o755, exist_ok=True)
    tmp = f"mode=1777,size={int(request['tmp_bytes'])}"
    mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, tmp)
    mount("tmpfs", f"{root}/run", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
    bound: list[str] = []
    for path in sorted(set(request["binds"])):
        if any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound):
            continue  # inside a directory bound already
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), root + path)  # e.g. /lib -> usr/lib
            continue
        if not os.path.isdir(path):
            continue
        target = root + path
        os.makedirs(target, mode=0o755, exist_ok=True)
        mount(path, target, None, MS_BIND | MS_REC, None)
        _read_only(target)
        bound.append(path)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    mount("tmpfs", f"{root}/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for device in DEVICES:
        if os.path.exists(f"/dev/{device}"):
            open(f"{root}/dev/{device}", "w").close()  # an empty mount point
            mount(f"/dev/{device}", f"{root}/dev/{device}", None, MS_BIND, None)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(target, f"{root}/dev/{name}")
    os.symlink("/proc/self/fd/1", f"{root}/dev/stdout")
    os.symlink("/proc/self/fd/2", f"{root}/dev/stderr")
    os.mkdir(f"{root}/run/blackhole", 0o755)
    mount(request["socket_dir"], f"{root}/run/blackhole", None, MS_BIND, None)
    for source, target, read_only in request["volumes"]:
        try:
            os.makedirs(root + target, mode=0o755, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"volume mount point {target}: {e.strerror}") from e
        mount(source, root + target, None, MS_BIND, None)
        if read_only:
            _read_only(root + target)
    flags = MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    mount("tmpfs", root, "tmpfs", flags, None)  # the top itself: no new files
    _pivot_root(root)


def _join(groups: list[str]) -> None:
    """Move this process into ``groups`` (one directory per hierarchy)."""
    for group in groups:
        with open(os.path.join(group, "cgroup.procs"), "w") as procs:
            procs.write("0")


def _isolate(request: dict[str, Any]) -> None:
    """Everything between fork and the plugin's first line; raises on any failure."""
    if not request.get("placed"):  # a spare is in its groups already
        _join(request["cgroups"])
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    if request["network"]:
        flags |= CLONE_NEWNET
    _check(_libc.unshare(flags), "unshare")
    if request["network"]:
        _loopback_up()
    hostname = request["name"][:63].encode()
    _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _make_root(request)
    uid, gid = int(request["uid"]), int(request["gid"])
    for capability in range(64):  # the bounding set too: nothing to regain, ever
        if _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) < 0:
            break  # past the last capability this kernel knows
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir(request["cwd"])
    load_seccomp(base64.b64decode(request["seccomp"]))


def _plugin(request: dict[str, Any], log: int, errors: int) -> int:
    """In the plugin process: isolate, then run the plugin; returns its exit code."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in (null, log):
        os.close(fd)
    os.closerange(3, errors)
    os.closerange(errors + 1, 65536)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        _isolate(request)
        if not request["warm"]:
            os.execve(request["argv"][0], request["argv"], request["env"])
    except BaseException as e:  # told to the shim, which tells the backend
        os.write(errors, f"{e}".encode(errors="replace")[:4000])
        return 127
    os.close(errors)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    entrypoint = request["entrypoint"]
    sys.argv = [entrypoint]
    sys.path[:0] = [os.path.dirname(entrypoint), *request["python_path"]]
    import runpy

    try:
        runpy.run_path(entrypoint, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


# The shim: one per instance, the plugin's parent.


def _starttime(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[19])


def _write_json(path: str, record: dict[str, Any]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle)
    os.replace(temporary, path)


def _oom_kills(path: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except OSError:
        pass
    return 0


def stamped(chunk: bytes, line_start: bool, now_ns: int) -> tuple[bytes, bool]:
    """``chunk`` with the time it was read (RFC 3339 in UTC, to the nanosecond, and a space)
    before each line that begins in it, as container engines keep their logs; and whether
    the next chunk begins a line. ``line_start``: whether this one does."""
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode()
    stamp += b".%09dZ " % nanos
    parts = chunk.split(b"\n")
    out = []
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        begins = line_start if index == 0 else True
        out.append(stamp + part if begins and not (last and not part) else part)
    return b"\n".join(out), chunk.endswith(b"\n")


def _copy_output(source: int, path: str, limit: int = LOG_BYTES, stderr: bool = True) -> None:
    """The plugin's output into ``path``, each line stamped with the time it was read
    (:func:`stamped`), moved to ``path.1`` whenever it passes ``limit``.

    The previous run's log (a restart keeps the instance's name) is kept as
    ``path.1`` too. Returns at end of file: when the plugin, PID 1 of its
    namespace, is gone with everything it started.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
    if os.path.exists(path):
        os.replace(path, f"{path}.1")
    log = os.open(path, flags, 0o640)
    if stderr:
        os.dup2(log, 2)  # the shim's own troubles, if any, go beside the plugin's output
    written = 0
    line_start = True
    while chunk := os.read(source, 65536):
        chunk, line_start = stamped(chunk, line_start, time.time_ns())
        for offset in range(0, len(chunk), limit):  # the times make a chunk longer
            piece = chunk[offset : offset + limit]
            if written + len(piece) > limit and written:
                os.close(log)
                os.replace(path, f"{path}.1")
                log = os.open(path, flags, 0o640)
                if stderr:
                    os.dup2(log, 2)
                written = 0
            os.write(log, piece)
            written += len(piece)
    os.close(source)
    os.close(log)


class _Child:
    """A plugin process forked by the shim, and the shim's ends of its pipes."""

    def __init__(self, pid: int, output: int, errors: int, go: int | None) -> None:
        self.pid, self.output, self.errors, self.go = pid, output, errors, go


def _session() -> None:
    """The shim's own session and signals (it outlives the launcher and the controller)."""
    if os.getsid(0) != os.getpid():
        os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def _fork_plugin(request: dict[str, Any] | None, spare: list[str], taken: int) -> _Child:
    """Fork the plugin process, PID 1 of a new PID namespace; with ``request`` None a spare:
    it joins the groups ``spare`` and waits, running nothing, until it is handed its
    request, then runs as the plugin (see :func:`_spare_plugin`)."""
    output_in, output_out = os.pipe2(os.O_CLOEXEC)
    errors_in, errors_out = os.pipe2(os.O_CLOEXEC)
    go_in, go_out = os.pipe2(os.O_CLOEXEC) if request is None else (-1, -1)
    _check(_libc.unshare(CLONE_NEWPID), "unshare the PID namespace")
    pid = os.fork()
    if pid == 0:
        os.close(errors_in)
        os.close(output_in)
        if request is not None:
            raise SystemExit(_plugin(request, output_out, errors_out))
        os.close(go_out)
        os.close(taken)  # the launcher hears of the shim's end, not of this process's
        raise SystemExit(_spare_plugin(spare, go_in, output_out, errors_out))
    os.close(errors_out)
    os.close(output_out)
    if request is not None:
        return _Child(pid, output_in, errors_in, None)
    os.close(go_in)
    return _Child(pid, output_in, errors_in, go_out)


def _spare_plugin(groups: list[str], go: int, log: int, errors: int) -> int:
    """A spare plugin process: into its groups, a word to the shim, then wait for the request.

    Nothing of any plugin's runs here before that request, and the shim sends it only once
    the groups are the instance's with its limits written. The end of ``go`` (the shim is
    gone) ends it.
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    try:
        _join(groups)
    except OSError as e:
        os.write(errors, f"spare: {e}".encode(errors="replace")[:4000])
        return 1
    os.write(errors, b"p")
    try:
        size = struct.unpack("!I", _read_exactly(go, 4))[0]
        request = json.loads(_read_exactly(go, size))
    except EOFError:
        return 0
    os.close(go)
    _libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)  # a plugin outlives its shim, as any does
    return _plugin({**request, "placed": True}, log, errors)


class _Spare:
    """A spare plugin process parked in a spare group of its own (:func:`_park`)."""

    def __init__(self, child: _Child, dirs: list[str]) -> None:
        self.child, self.dirs = child, dirs

    def discard(self) -> None:
        """Kill the spare process and remove its groups (and their parents once empty)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.child.pid, 0)
        for fd in (self.child.output, self.child.errors, self.child.go):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        _remove_dirs(self.dirs)
        for directory in self.dirs:
            with contextlib.suppress(OSError):  # other instances' groups are in it
                os.rmdir(os.path.dirname(directory))


def _remove_dirs(dirs: list[str]) -> None:
    for directory in dirs:
        for _ in range(100):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    break
                time.sleep(0.01)  # the process is still being torn down


def _park(parents: list[str], prefix: str, taken: int) -> _Spare | None:
    """A spare: a plugin process forked now, moved into a new group ``<prefix><pid>`` in each
    hierarchy (``parents``), waiting. A start then only renames the groups and writes the
    limits: the move into a cgroup (which waits for the kernel's RCU grace period) is done
    before the start, not in it. None if it cannot be made (the start then does it all)."""
    name = f"{prefix}{os.getpid()}"
    dirs = [os.path.join(parent, name) for parent in parents]
    try:
        for directory in dirs:
            os.makedirs(directory, exist_ok=True)
        _session()
        child = _fork_plugin(None, dirs, taken)
    except OSError as e:
        print(f"launcher: no spare: {e}", file=sys.stderr)
        _remove_dirs(dirs)
        return None
    spare = _Spare(child, dirs)
    said = os.read(child.errors, 4096)
    if said != b"p":
        print(f"launcher: no spare: {said.decode(errors='replace')}", file=sys.stderr)
        spare.discard()
        return None
    return spare


def _place(request: dict[str, Any], spare: _Spare | None) -> None:
    """Make the instance's groups (the spare's renamed, else new ones) and write its limits."""
    targets = list(request["cgroups"])
    if spare is not None:
        if [os.path.dirname(d) for d in spare.dirs] != [os.path.dirname(t) for t in targets]:
            raise OSError(errno.EINVAL, f"the spare's groups {spare.dirs} are not beside {targets}")
        for index, (directory, target) in enumerate(zip(spare.dirs, targets, strict=True)):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(target)  # an empty one left by a start cut short
            os.rename(directory, target)  # within its parent: cgroup v1 allows it
            spare.dirs[index] = target
    else:
        for target in targets:
            os.makedirs(target, exist_ok=True)
    for path, value, optional in request["limits"]:
        try:
            with open(path, "w") as handle:
                handle.write(str(value))
        except OSError:
            if not optional:
                raise


def _shim(request: dict[str, Any], spare: _Spare | None) -> None:
    """Start the plugin (hand the spare its request, or fork one), answer the backend,
    record the plugin's state and then its exit. (The plugin process leaves through
    SystemExit, with the plugin's exit code.)
    """
    _session()
    if spare is None:
        child = _fork_plugin(request, [], -1)
    else:
        child = spare.child
        body = json.dumps(request).encode()
        assert child.go is not None
        with open(child.go, "wb") as go:  # closed after: the spare then sees its end
            go.write(struct.pack("!I", len(body)) + body)
        child.go = None
    pid = child.pid
    started = _starttime(pid)
    failure = b""
    while chunk := os.read(child.errors, 4096):
        failure += chunk
    os.close(child.errors)
    if failure:
        os.close(child.output)
        os.waitpid(pid, 0)
        _answer({"error": failure.decode(errors="replace")})
        return None
    record = {**request["record"], "pid": pid, "shim": os.getpid(), "starttime": started}
    record["shim_starttime"] = _starttime(os.getpid())
    record["started_at"] = time.time()
    _write_json(request["state"], record)
    _answer({"pid": pid, "starttime": started, "spare": spare is not None})
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    _copy_output(child.output, request["log"])  # until the plugin's namespace is gone
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = -1
            break
    if status == -1:
        code = 255
    elif os.WIFSIGNALED(status):
        code = 128 + os.WTERMSIG(status)
    else:
        code = os.waitstatus_to_exitcode(status)
    oom = code == 128 + signal.SIGKILL and _oom_kills(request["oom_file"]) > 0
    _write_json(
        request["exit"],
        {"exit_code": code, "oom_killed": oom, "finished_at": time.time()},
    )
    return None


# The launcher and its waiting copies.


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _answer(reply: dict[str, Any]) -> None:
    body = json.dumps(reply).encode()
    os.write(1, struct.pack("!I", len(body)) + body)  # one write: atomic below PIPE_BUF


def _waiting(taken: int, parents: list[str], prefix: str) -> None:
    """A warm copy: park a spare (``parents``: where its groups go, ``prefix``: the start of
    their name), take the next request,
    place the instance's groups, tell the launcher (which forks the next copy), become its
    shim."""
    spare = _park(parents, prefix, taken) if parents else None
    try:
        size = struct.unpack("!I", _read_exactly(0, 4))[0]
        request = json.loads(_read_exactly(0, size))
    except EOFError:
        if spare is not None:
            spare.discard()
        os.write(taken, b"q")
        return
    try:
        # Before the next copy is forked: its spare's move into its groups holds the
        # kernel's cgroup lock, which a rename waits for.
        _place(request, spare)
    except Exception as e:
        os.write(taken, b"t")
        if spare is not None:
            spare.discard()
        _answer({"error": f"the instance's cgroups: {type(e).__name__}: {e}"})
        return
    os.write(taken, b"t")
    os.close(taken)
    try:
        _shim(request, spare)
    except Exception as e:  # anything before the fork: the backend must hear of it
        traceback.print_exc()
        if spare is not None:
            spare.discard()
        _answer({"error": f"{type(e).__name__}: {e}"})


def interpreter_paths() -> list[str]:
    """Directories this interpreter reads code from: they must be in a warm plugin's root."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    for module in list(sys.modules.values()):
        for entry in getattr(module, "__path__", None) or []:
            if isinstance(entry, str) and os.path.isdir(entry):
                paths.add(os.path.dirname(os.path.realpath(entry)))
    return sorted(os.path.realpath(p) for p in paths)


def main() -> int:
    # Where spare groups go (one directory per cgroup v1 hierarchy) and their names' start.
    spares: dict[str, Any] = {"parents": [], "prefix": ""}
    if len(sys.argv) > 1:
        spares = json.loads(sys.argv[1])
    warm = True
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError as e:
            print(f"launcher: cannot preload {name}: {e}", file=sys.stderr)
            warm = False
    # What is preloaded stays shared with every plugin forked from here: frozen, the
    # collector of a plugin never writes into those objects' pages (which would copy them).
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # shims are reaped by the kernel
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "pdeathsig")
    _answer(
        {"pid": os.getpid(), "warm": warm, "paths": interpreter_paths(), "python": sys.executable}
    )
    while True:
        taken_in, taken_out = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(taken_in)
            _check(_libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0), "pdeathsig")
            _waiting(taken_out, spares["parents"], spares["prefix"])  # a plugin: SystemExit
            os._exit(0)
        os.close(taken_out)
        said = os.read(taken_in, 1)
        os.close(taken_in)
        if said != b"t":
            return 0  # the backend closed our stdin: nothing more to launch


if __name__ == "__main__":
    sys.exit(main())
