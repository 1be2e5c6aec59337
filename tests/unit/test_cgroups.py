"""Cgroup v1 and v2 readings, and the violations they lead to, on fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller import cgroups
from controller.metrics import telemetry, violations

PID = os.getpid()
"""This process: its /proc/<pid>/net/dev is real; its cgroup files are the fake ones below."""


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def v1_tree(root: Path, usage: int = 100 << 20, periods: int = 100, throttled: int = 0) -> None:
    group = "docker/abc"
    write(
        root,
        {
            f"cpuacct/{group}/cpuacct.usage": "2500000000\n",
            f"cpu/{group}/cpu.stat": f"nr_periods {periods}\nnr_throttled {throttled}\n"
            "throttled_time 750000000\n",
            f"cpu/{group}/cpu.cfs_quota_us": "50000\n",
            f"cpu/{group}/cpu.cfs_period_us": "100000\n",
            f"memory/{group}/memory.usage_in_bytes": f"{usage}\n",
            f"memory/{group}/memory.stat": "cache 0\ntotal_inactive_file 10485760\n",
            f"memory/{group}/memory.limit_in_bytes": f"{128 << 20}\n",
            f"memory/{group}/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            f"pids/{group}/pids.current": "7\n",
            f"blkio/{group}/blkio.throttle.io_service_bytes": "8:0 Read 4096\n8:0 Write 8192\n"
            "8:16 Read 1\nTotal 12289\n",
        },
    )


def reader(root: Path, paths: dict[str, str]) -> cgroups.Cgroups:
    reading = cgroups.Cgroups(root)
    reading._paths[PID] = paths
    return reading


@pytest.fixture
def v1(tmp_path: Path) -> cgroups.Cgroups:
    v1_tree(tmp_path)
    controllers = ["cpu", "cpuacct", "memory", "pids", "blkio"]
    return reader(tmp_path, {c: "/docker/abc" for c in controllers})


def test_v1_reading(v1: cgroups.Cgroups) -> None:
    reading = v1.read(PID)
    assert reading is not None
    assert reading.cpu_seconds == 2.5
    assert (reading.cpu_periods, reading.cpu_throttled_periods) == (100, 0)
    assert reading.cpu_throttled_seconds == 0.75
    assert reading.memory_usage_bytes == 100 << 20
    assert reading.memory_working_set_bytes == 90 << 20, "inactive file pages are not counted"
    assert reading.memory_limit_bytes == 128 << 20
    assert reading.cpu_limit_cores == 0.5
    assert reading.oom_events == 2
    assert reading.pids == 7
    assert (reading.fs_read_bytes, reading.fs_write_bytes) == (4097, 8192)


def test_v2_reading(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory pids io\n",
            "system.slice/x/cpu.stat": "usage_usec 1500000\nnr_periods 40\nnr_throttled 10\n"
            "throttled_usec 250000\n",
            "system.slice/x/memory.current": f"{64 << 20}\n",
            "system.slice/x/memory.stat": "anon 1\ninactive_file 4194304\n",
            "system.slice/x/memory.max": "max\n",
            "system.slice/x/cpu.max": "200000 100000\n",
            "system.slice/x/memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
            "system.slice/x/pids.current": "3\n",
            "system.slice/x/io.stat": "8:0 rbytes=100 wbytes=200 rios=1 wios=2\n"
            "8:16 rbytes=1 wbytes=2\n",
        },
    )
    reading = reader(tmp_path, {"": "/system.slice/x"}).read(PID)
    assert reading is not None
    assert reading.cpu_seconds == 1.5
    assert (reading.cpu_periods, reading.cpu_throttled_periods) == (40, 10)
    assert reading.memory_working_set_bytes == 60 << 20
    assert reading.memory_limit_bytes == 0, "max means no limit"
    assert reading.cpu_limit_cores == 2.0
    assert reading.oom_events == 1
    assert reading.pids == 3
    assert (reading.fs_read_bytes, reading.fs_write_bytes) == (101, 202)


def test_a_gone_process_reads_as_nothing(tmp_path: Path) -> None:
    assert cgroups.Cgroups(tmp_path).read(2**22 + 12345) is None


def test_violations_begin_and_end_with_the_readings(tmp_path: Path) -> None:
    controllers = ["cpu", "cpuacct", "memory", "pids", "blkio"]
    metrics = telemetry.Metrics()
    metrics.cgroups = reader(tmp_path, {c: "/docker/abc" for c in controllers})
    metrics.track("bh-kv-blue", telemetry.Tracked(PID, "kv", "1.0.0", "blue", namespace=""))
    now = [1000.0]
    watch = violations.Violations(
        metrics, violations.Thresholds(memory_share=0.9, memory_seconds=30), clock=lambda: now[0]
    )
    v1_tree(tmp_path, usage=126 << 20, periods=100, throttled=0)  # 116 MiB of 128: 91%
    assert watch.evaluate() == set()
    now[0] += 31
    v1_tree(tmp_path, usage=126 << 20, periods=200, throttled=60)  # 60 of the last 100 periods
    assert watch.evaluate() == {"kv"}
    assert set(watch.current("kv")) == {"MemoryNearLimit", "CPUThrottled"}
    assert "91% of its memory limit (128 MiB) for 31s" in watch.current("kv")["MemoryNearLimit"]
    now[0] += 5
    v1_tree(tmp_path, usage=20 << 20, periods=300, throttled=60)
    assert watch.evaluate() == {"kv"}
    assert watch.current("kv") == {}
    exported = metrics.registry.get_sample_value(
        "blackhole_resource_violations_total", {"plugin": "kv", "kind": "MemoryNearLimit"}
    )
    assert exported == 1.0


def test_oom_kills_and_restart_bursts_last_their_window(tmp_path: Path) -> None:
    now = [0.0]
    watch = violations.Violations(
        telemetry.Metrics(), violations.Thresholds(restart_burst=3), clock=lambda: now[0]
    )
    watch.oom_killed("kv", "killed for memory")
    for _ in range(3):
        watch.restarted("kv")
    assert set(watch.current("kv")) == {"OOMKilled", "RestartBurst"}
    now[0] += 301
    assert watch.current("kv") == {}


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cgroup.controllers": "cpu\n", "g/cpu.max": "max 100000\n"}, 0.0),
        ({"cgroup.controllers": "cpu\n"}, 0.0),
        ({"cpu/g/cpu.cfs_quota_us": "-1\n", "cpu/g/cpu.cfs_period_us": "100000\n"}, 0.0),
        ({"cpu/g/cpu.cfs_quota_us": "25000\n", "cpu/g/cpu.cfs_period_us": "50000\n"}, 0.5),
    ],
)
def test_cpu_limit_without_a_quota_reads_zero(
    tmp_path: Path, files: dict[str, str], cores: float
) -> None:
    write(tmp_path, files)
    paths = {"": "/g"} if "cgroup.controllers" in files else {"cpu": "/g"}
    reading = reader(tmp_path, paths).read(PID)
    assert reading is not None
    assert reading.cpu_limit_cores == cores
