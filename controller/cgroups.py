"""Cgroup files, read and written: the one place that knows their names and formats.

Below the runtimes and the metrics, which both use it: the metrics read an
instance's resource use here (:class:`Cgroups`, by the pid of its main process,
from its cgroup files and ``/proc/<pid>/net/dev``), and the process runtime
reads its instances' cgroups (:func:`read_group`) and writes their limits
(:func:`write`) through it. Works for cgroup v1 (one hierarchy per controller)
and v2 (one unified hierarchy), for any engine that puts each instance in a
cgroup of its own: Docker, Podman, and processes started in their own cgroup.
A reading is a handful of small file reads (about 0.1 ms), against one to two
seconds for a stats call to Docker's API. Files that are missing (a controller
that is not mounted, an instance that just died) read as absent, never as an
error. It imports nothing of the controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
"""The CFS period CPU quotas are expressed in (the kernel's default, 100 ms)."""


def cpu_quota(millis: int) -> int:
    """The CFS quota, in microseconds per :data:`CPU_PERIOD_US`, of ``millis`` millicores."""
    return millis * CPU_PERIOD_US // 1000


def is_unified(root: Path = ROOT) -> bool:
    """Whether ``root`` is a cgroup v2 (unified) hierarchy rather than v1's one per controller."""
    return (root / "cgroup.controllers").exists()


@dataclass(frozen=True)
class Reading:
    """One instance's resource use, cumulative counters since it started."""

    cpu_seconds: float
    cpu_periods: int
    cpu_throttled_periods: int
    cpu_throttled_seconds: float
    memory_working_set_bytes: int
    memory_usage_bytes: int
    memory_limit_bytes: int
    """0 when there is no limit."""
    cpu_limit_cores: float
    """The CFS quota over its period, in cores; 0 when there is no limit."""
    oom_events: int
    pids: int
    fs_read_bytes: int
    fs_write_bytes: int
    network_receive_bytes: int
    network_receive_packets: int
    network_transmit_bytes: int
    network_transmit_packets: int


_NETWORK_FIELDS = (
    "network_receive_bytes",
    "network_receive_packets",
    "network_transmit_bytes",
    "network_transmit_packets",
)
"""The Reading fields of /proc/<pid>/net/dev's columns 0, 1, 8 and 9."""
_NO_NETWORK = dict.fromkeys(_NETWORK_FIELDS, 0)


class Cgroups:
    """Reads instances' cgroups; remembers each process's cgroup paths."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.unified = is_unified(root)
        self._paths: dict[int, dict[str, str]] = {}

    def read(self, pid: int) -> Reading | None:
        """The reading for the cgroup of ``pid``; None when the process is gone."""
        paths = self._paths.get(pid)
        if paths is None:
            paths = cgroup_paths(pid)
            if paths is None:
                return None
            if len(self._paths) > 10_000:
                self._paths.clear()
            self._paths[pid] = paths
        network = _network(pid)
        if network is None:
            self._paths.pop(pid, None)
            return None
        return self.read_group(paths, network)

    def read_group(
        self, paths: Mapping[str, str], network: Mapping[str, int] = _NO_NETWORK
    ) -> Reading:
        """The reading of the cgroup at ``paths`` (controller to path, "" for the unified one).

        ``network`` gives the network counters, which no cgroup file holds.
        """
        if self.unified:
            return self._read_v2(self.root / paths.get("", "/").lstrip("/"), network)
        return self._read_v1(paths, network)

    def _v1(self, paths: Mapping[str, str], controller: str) -> Path:
        return self.root / controller / paths.get(controller, "/").lstrip("/")

    def _read_v1(self, paths: Mapping[str, str], network: Mapping[str, int]) -> Reading:
        cpu = self._v1(paths, "cpu")
        cpuacct = self._v1(paths, "cpuacct")
        memory = self._v1(paths, "memory")
        throttling = keyed(cpu / "cpu.stat")
        memory_stat = keyed(memory / "memory.stat")
        usage = number(memory / "memory.usage_in_bytes")
        inactive = memory_stat.get("total_inactive_file", memory_stat.get("inactive_file", 0))
        limit = number(memory / "memory.limit_in_bytes")
        read, write = _blkio(self._v1(paths, "blkio") / "blkio.throttle.io_service_bytes")
        return Reading(
            cpu_seconds=number(cpuacct / "cpuacct.usage") / 1e9,
            cpu_periods=throttling.get("nr_periods", 0),
            cpu_throttled_periods=throttling.get("nr_throttled", 0),
            cpu_throttled_seconds=throttling.get("throttled_time", 0) / 1e9,
            memory_working_set_bytes=max(0, usage - inactive),
            memory_usage_bytes=usage,
            memory_limit_bytes=0 if limit >= 1 << 62 else limit,
            cpu_limit_cores=_cores(text(cpu / "cpu.cfs_quota_us"), text(cpu / "cpu.cfs_period_us")),
            oom_events=keyed(memory / "memory.oom_control").get("oom_kill", 0),
            pids=number(self._v1(paths, "pids") / "pids.current"),
            fs_read_bytes=read,
            fs_write_bytes=write,
            **network,
        )

    def _read_v2(self, group: Path, network: Mapping[str, int]) -> Reading:
        cpu = keyed(group / "cpu.stat")
        memory_stat = keyed(group / "memory.stat")
        usage = number(group / "memory.current")
        read = write = 0
        for line in lines(group / "io.stat"):
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            read += int(fields.get("rbytes", 0))
            write += int(fields.get("wbytes", 0))
        return Reading(
            cpu_seconds=cpu.get("usage_usec", 0) / 1e6,
            cpu_periods=cpu.get("nr_periods", 0),
            cpu_throttled_periods=cpu.get("nr_throttled", 0),
            cpu_throttled_seconds=cpu.get("throttled_usec", 0) / 1e6,
            memory_working_set_bytes=max(0, usage - memory_stat.get("inactive_file", 0)),
            memory_usage_bytes=usage,
            memory_limit_bytes=number(group / "memory.max"),
            cpu_limit_cores=_cores(*[*text(group / "cpu.max").split(), "", ""][:2]),
            oom_events=keyed(group / "memory.events").get("oom_kill", 0),
            pids=number(group / "pids.current"),
            fs_read_bytes=read,
            fs_write_bytes=write,
            **network,
        )


def cgroup_paths(pid: int) -> dict[str, str] | None:
    """Controller name to cgroup path, from ``/proc/<pid>/cgroup`` ("" for the unified one)."""
    paths = {}
    for line in lines(Path(f"/proc/{pid}/cgroup")):
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths or None


def _network(pid: int) -> dict[str, int] | None:
    """The network counters of :class:`Reading`, summed over every interface but lo."""
    found = lines(Path(f"/proc/{pid}/net/dev"))
    if not found:
        return None
    totals = [0, 0, 0, 0]
    for line in found[2:]:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            continue
        values = counters.split()
        for index, column in enumerate((0, 1, 8, 9)):
            totals[index] += int(values[column])
    return dict(zip(_NETWORK_FIELDS, totals, strict=True))


def lines(path: Path) -> list[str]:
    """A file's lines, read unbuffered; none when it cannot be read."""
    try:
        with open(path, "rb", buffering=0) as handle:
            return handle.read().decode().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return []


def number(path: Path) -> int:
    """The number a one-value file holds; 0 for "max" (no limit), or when it is missing."""
    found = lines(path)
    value = found[0].strip() if found else ""
    return int(value) if value.isdigit() else 0


def text(path: Path) -> str:
    """A file's content, stripped; "" when it cannot be read."""
    return "\n".join(lines(path)).strip()


def write(path: Path, value: object) -> None:
    """Write one value to a cgroup file (a limit, a pid to move in); raises OSError."""
    with open(path, "w") as handle:
        handle.write(str(value))


def keyed(path: Path) -> dict[str, int]:
    """The ``key value`` lines of a file such as ``cpu.stat``, those whose value is a number."""
    values = {}
    for line in lines(path):
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def _blkio(path: Path) -> tuple[int, int]:
    read = write = 0
    for line in lines(path):
        fields = line.split()
        if len(fields) == 3 and fields[1] == "Read":
            read += int(fields[2])
        elif len(fields) == 3 and fields[1] == "Write":
            write += int(fields[2])
    return read, write


def _cores(quota: str, period: str) -> float:
    """A CFS quota over its period in cores; 0 for none ("max", -1) or one not readable."""
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return 0.0
    return int(quota) / int(period)
