"""The process runtime's seccomp filter: Docker's default one, for processes without capabilities.

Built once by the backend with libseccomp (the ``pyseccomp`` binding) and
handed to the shim (:mod:`.shim`) as a compiled BPF program, which each plugin
process loads as the last step of its isolation, after ``no_new_privs``.
Like Docker's profile for a container without ``CAP_SYS_ADMIN``: an allow
list, every other system call failing with EPERM; ``clone`` only without
namespace flags and ``clone3`` answering ENOSYS (so that the C library falls
back to ``clone``), so a plugin can never enter a new user (or any other)
namespace; ``socket`` only for the address families Docker allows;
``personality`` only for the values Docker allows. System calls of other
ABIs (32-bit calls on a 64-bit kernel) are refused too, as libseccomp does
by default. Names this libseccomp does not know are left out: the kernel
then refuses them with the default action.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import tempfile

from controller.errors import RuntimeBackendError

_ALLOWED = """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown
clock_adjtime clock_getres clock_gettime clock_nanosleep close close_range connect
copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
exit_group faccessat faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat
fchmodat2 fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr
fsetxattr fstat fstatfs fsync ftruncate futex futex_requeue futex_wait futex_waitv
futex_wake futimesat getcpu getcwd getdents getdents64 getegid geteuid getgid getgroups
getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid
getresuid getrlimit get_robust_list getrusage getsid getsockname getsockopt
get_thread_area gettid gettimeofday getuid getxattr inotify_add_watch inotify_init
inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents
ioprio_get ioprio_set io_setup io_submit kill landlock_add_rule landlock_create_ruleset
landlock_restrict_self lchown lgetxattr link linkat listen listxattr llistxattr
lremovexattr lseek lsetxattr lstat madvise map_shadow_stack membarrier memfd_create
memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect
mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap mseal msgctl
msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat
open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free
pkey_mprotect poll ppoll prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6
ptrace process_vm_readv process_vm_writev pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename
renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask
rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
sched_getaffinity sched_getattr sched_getparam sched_get_priority_max
sched_get_priority_min sched_getscheduler sched_rr_get_interval sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget
semop semtimedop sendfile sendmmsg sendmsg sendto setfsgid setfsuid setgid setgroups
setitimer setpgid setpriority setregid setresgid setresuid setreuid setrlimit
set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setxattr shmat
shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socketpair splice stat statfs
statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create timerfd_gettime
timerfd_settime times tkill truncate umask uname unlink unlinkat utime utimensat utimes
vfork vmsplice wait4 waitid write writev
arch_prctl modify_ldt
"""
ALLOWED = tuple(_ALLOWED.split())
"""Allowed whatever their arguments (Docker's unconditional list, less what this ABI lacks)."""

SOCKET_FAMILIES = (
    *range(12), 13, 14, 15, 16, 17, 18, 21, 22, 24, 26, 27, 28, 29, 30, 31, 32, 33, 35, 36,
    39, 41, 42, 43, 44, 45,
)  # fmt: skip
"""Address families ``socket`` may open: Docker's (no AF_VSOCK, 40, among others)."""

PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
"""``personality`` values Docker allows: Linux, with UNAME26, read-implies-exec, or a query."""

NAMESPACE_FLAGS = 0x7E020000
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET: ``clone`` without them only."""


@functools.cache
def program() -> bytes:
    """The compiled filter (a BPF program for this machine's architecture)."""
    import pyseccomp as seccomp  # only where plugins run as processes: it loads libseccomp

    syscalls = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))

    def allow(name: str, *args: seccomp.Arg) -> None:
        with contextlib.suppress(OSError):  # a name this libseccomp or architecture lacks
            syscalls.add_rule(seccomp.ALLOW, name, *args)

    for name in ALLOWED:
        allow(name)
    for family in SOCKET_FAMILIES:
        allow("socket", seccomp.Arg(0, seccomp.EQ, family))
    for persona in PERSONALITIES:
        allow("personality", seccomp.Arg(0, seccomp.EQ, persona))
    allow("clone", seccomp.Arg(0, seccomp.MASKED_EQ, NAMESPACE_FLAGS, 0))
    syscalls.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as compiled:
        syscalls.export_bpf(compiled)
        compiled.seek(0)
        return compiled.read()


def compiled() -> bytes:
    """:func:`program`, or :class:`RuntimeBackendError` saying what to install to build it."""
    try:
        return program()
    except (ImportError, RuntimeError, OSError) as e:
        raise RuntimeBackendError(
            f"process: cannot build the seccomp filter plugins run under ({e}); install "
            "libseccomp (Debian: apt-get install libseccomp2) and pyseccomp"
        ) from e
