"""Reconcile N plugins on Docker, side by side with ``docker-compose up -d`` of the same N services.

For each N: the controller (in this process, on the real engine) is given N
spec files at once, and the time until every plugin is Ready is taken, with
the growth of the process's resident memory per plugin; then every key is
resynced unchanged and the runtime calls it makes are counted (writes must
be zero). The same N services, with the same image and isolation settings,
are brought up by Debian's docker-compose 1.29, timed until ``up -d``
returns and until every service's socket accepts. For both, the CPU spent per
plugin started: the starter's own (the controller in this process, which the
benchmark watches for Ready by the status writes it makes, without polling;
docker-compose as a child process), the engine's
(dockerd, containerd and the containers' shims, runc included) and the
plugins' own start-up (their cgroups), and the ratio of the totals. The
controller's own CPU is split by where it is spent: its event loop (the
passes, the plugin protocol, status computing), the runtime's engine API
threads (docker-py), the threads its file and store work runs on (SQLite,
spec files), other threads (the engine's event stream, gRPC's own) and what
is left (threads that ended, rounding to clock ticks). A resync of 1,000
unchanged specs on the in-memory runtime shows the write count at scale.

Prints JSON; ``--plot FILE`` draws the times. Needs Docker, docker-compose
(``scripts/engines.sh docker compose``) and the example images
(``images/build.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import support

from controller.protocol import client
from controller.protocol import memory as memory_protocol
from controller.reconcile import manager, queue
from controller.runtimes import base, container, memory
from controller.sources import directory, store

IMAGE = "blackhole/example-echo:0.1.0"
SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: {name}}}
spec:
  image: {image}
  version: 1.0.0
  resources: {{cpu: 100m, memory: 64Mi, pids: 32}}
"""


class CountingRuntime:
    """A runtime that counts the calls made to the one it wraps."""

    def __init__(self, inner: base.Runtime) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


ENGINE_PROCESSES = ("dockerd", "containerd")
"""The engine's daemons; each container's ``containerd-shim*`` is counted too."""


def _process_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and of its children it waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def engine_cpu(since: dict[int, float] | None = None) -> dict[int, float]:
    """CPU seconds so far of the engine's daemons and the containers' shims (runc runs as
    their children), by pid; with ``since``, what each spent after it (processes gone in
    between are left out, new ones count whole)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm in ENGINE_PROCESSES or comm.startswith("containerd-shim"):
                found[int(entry.name)] = _process_cpu(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    if since is None:
        return found
    return {pid: cpu - since.get(pid, 0.0) for pid, cpu in found.items()}


def containers_cpu(client: Any, label: str) -> float:
    """CPU seconds so far of the running containers carrying ``label`` (their cgroups)."""
    total = 0.0
    for row in client.api.containers(filters={"label": label}):
        for path in (
            Path(f"/sys/fs/cgroup/cpuacct/docker/{row['Id']}/cpuacct.usage"),
            Path(f"/sys/fs/cgroup/cpu,cpuacct/docker/{row['Id']}/cpuacct.usage"),
        ):
            if path.exists():
                total += int(path.read_text()) / 1e9
                break
        else:
            found = list(Path("/sys/fs/cgroup").glob(f"**/*{row['Id']}*/cpu.stat"))
            for line in found[0].read_text().splitlines() if found else []:
                if line.startswith("usage_usec"):
                    total += int(line.split()[1]) / 1e6
    return total


def cpu_row(n: int, own: float, engine: float, plugins: float) -> dict[str, float]:
    """CPU per plugin started, in milliseconds: the starter's own (the controller or
    docker-compose), the engine's, the plugins' own start-up, and their sum."""
    return {
        "own_cpu_ms_per_plugin": round(own / n * 1000, 1),
        "engine_cpu_ms_per_plugin": round(engine / n * 1000, 1),
        "plugin_cpu_ms_per_plugin": round(plugins / n * 1000, 1),
        "total_cpu_ms_per_plugin": round((own + engine + plugins) / n * 1000, 1),
    }


def threads_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed by what they do."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    found: collections.defaultdict[str, float] = collections.defaultdict(float)
    for entry in Path("/proc/self/task").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        name = names.get(int(entry.name), "")
        if name == "MainThread":
            part = "event_loop"
        elif "-api_" in name:
            part = "engine_api_threads"
        elif name.startswith("asyncio_"):
            part = "store_and_file_threads"
        else:
            part = "other_threads"
        found[part] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return dict(found)


def split_row(
    n: int, before: dict[str, float], after: dict[str, float], total: float
) -> dict[str, float]:
    """The controller's own CPU per plugin started, in milliseconds, by where it was spent
    (``unattributed``: the rest of ``total``, threads that ended meanwhile and each thread's
    reading being in whole clock ticks)."""
    parts = ("event_loop", "engine_api_threads", "store_and_file_threads", "other_threads")
    spent = {part: after.get(part, 0.0) - before.get(part, 0.0) for part in parts}
    spent["unattributed"] = max(0.0, total - sum(spent.values()))
    return {f"{part}_ms": round(cpu / n * 1000, 1) for part, cpu in spent.items()}


class ReadyWatch:
    """Notes when the last of ``keys`` is written Ready, from the store's own writes: the
    benchmark reads nothing while the controller works (no polling charged to it)."""

    def __init__(self, records: store.Store, keys: list[str]) -> None:
        self.pending = set(keys)
        self.done = asyncio.Event()
        self.at = 0.0
        self._loop = asyncio.get_running_loop()
        self._put = records.put_status
        records.put_status = self.put_status  # type: ignore[method-assign]

    def put_status(self, key: str, status: Any) -> None:
        self._put(key, status)
        if key in self.pending and _ready(status):
            self.pending.discard(key)
            if not self.pending:
                self.at = time.perf_counter()
                self._loop.call_soon_threadsafe(self.done.set)


async def until_idle(work: queue.WorkQueue) -> None:
    while len(work) or work.processing:
        await asyncio.sleep(0.01)


async def measure_controller(n: int, workers: int, root: Path) -> dict[str, Any]:
    ident = f"bench-{uuid.uuid4().hex[:8]}"
    specs, data = root / "specs", root / "data"
    specs.mkdir(parents=True)
    records = store.Store(data / "state.db")
    work = queue.WorkQueue()
    source = directory.DirectorySource(specs, records, work.add, resync_seconds=3600)
    real = container.ContainerRuntime(
        container.Settings(
            engine=container.Engine.DOCKER, data_dir=data, controller_id=ident, threads=workers
        )
    )
    runtime = CountingRuntime(real)
    plugins = client.Clients()
    control = manager.Manager(source, runtime, work, plugins, workers=workers)
    stop = asyncio.Event()
    task = asyncio.create_task(control.run(stop))
    try:
        await control.started.wait()
        gc.collect()
        baseline = rss_bytes()
        keys = [f"p{i:03d}" for i in range(n)]
        watch = ReadyWatch(records, keys)
        engine_before = engine_cpu()
        threads_before = threads_cpu()
        cpu = time.process_time()
        start = time.perf_counter()
        for key in keys:
            (specs / f"{key}.yaml").write_text(SPEC.format(name=key, image=IMAGE))
        await watch.done.wait()
        cpu = time.process_time() - cpu
        split = split_row(n, threads_before, threads_cpu(), cpu)
        elapsed = watch.at - start
        engine = sum(engine_cpu(engine_before).values())
        plugins_cpu = await asyncio.to_thread(
            containers_cpu, real.client, f"{base.LABEL_CONTROLLER}={ident}"
        )
        gc.collect()
        growth = rss_bytes() - baseline
        await until_idle(work)
        runtime.calls.clear()
        for key in keys:
            work.add(key)
        await until_idle(work)
        resync = dict(runtime.calls)
        return {
            "ready_seconds": round(elapsed, 2),
            "controller_cpu_seconds": round(cpu, 2),
            **cpu_row(n, cpu, engine, plugins_cpu),
            "own_cpu_ms_per_plugin_by_part": split,
            "rss_growth_bytes_per_plugin": round(growth / n),
            "resync_calls": resync,
            "resync_writes": sum(resync.get(c, 0) for c in memory.WRITES),
        }
    finally:
        stop.set()
        await task
        for instance in await real.list_owned():
            await real.remove(instance.name)
        await real.close()
        await plugins.close()
        records.close()


def _ready(status: Any) -> bool:
    return status is not None and any(
        c.type == "Ready" and c.status == "True" for c in status.conditions
    )


def compose_file(n: int, sockets: Path) -> str:
    services = {}
    for i in range(n):
        name = f"p{i:03d}"
        directory = sockets / name
        directory.mkdir(parents=True)
        os.chown(directory, 65532, 65532)
        directory.chmod(0o700)
        services[name] = {
            "image": IMAGE,
            "network_mode": "none",
            "read_only": True,
            "tmpfs": ["/tmp:rw,nosuid,nodev,noexec,size=64m"],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "user": "65532:65532",
            "mem_limit": "64m",
            "memswap_limit": "64m",
            "cpu_quota": 10000,
            "cpu_period": 100000,
            "pids_limit": 32,
            "environment": {"BLACKHOLE_SOCKET": "/run/blackhole/plugin.sock"},
            "volumes": [f"{directory}:/run/blackhole"],
        }
    return json.dumps({"version": "2.4", "services": services}, indent=1)


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def measure_compose(n: int, root: Path) -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        sys.exit("docker-compose is missing: run scripts/engines.sh docker compose")
    sockets = root / "sockets"
    path = root / "docker-compose.yml"
    path.write_text(compose_file(n, sockets))
    project = f"bhbench{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "COMPOSE_PARALLEL_LIMIT": str(n + 10)}
    command = ["docker-compose", "-p", project, "-f", str(path)]
    client = container.connect(container.Engine.DOCKER)
    try:
        engine_before = engine_cpu()
        own = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([*command, "up", "-d", "--quiet-pull"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        up = time.perf_counter() - start
        done = resource.getrusage(resource.RUSAGE_CHILDREN)
        pending = sorted(sockets / f"p{i:03d}" / "plugin.sock" for i in range(n))
        while pending:  # as for the controller: the last first
            if accepts(pending[-1]):
                pending = [p for p in pending if not accepts(p)]
            if pending:
                time.sleep(0.05)
        ready = time.perf_counter() - start
        engine = sum(engine_cpu(engine_before).values())
        plugins = containers_cpu(client, f"com.docker.compose.project={project}")
    finally:
        subprocess.run([*command, "down", "-t", "0"], env=env, check=False, capture_output=True)
        client.close()
    spent = done.ru_utime + done.ru_stime - own.ru_utime - own.ru_stime
    return {
        "up_seconds": round(up, 2),
        "ready_seconds": round(ready, 2),
        **cpu_row(n, spent, engine, plugins),
    }


async def resync_on_memory(n: int, root: Path) -> dict[str, Any]:
    specs = root / "specs"
    specs.mkdir(parents=True)
    for i in range(n):
        (specs / f"m{i:04d}.yaml").write_text(SPEC.format(name=f"m{i:04d}", image=IMAGE))
    records = store.Store(root / "data" / "state.db")
    work = queue.WorkQueue()
    source = directory.DirectorySource(specs, records, work.add, resync_seconds=3600)
    runtime = memory.MemoryRuntime()
    control = manager.Manager(
        source, runtime, work, memory_protocol.MemoryPlugins(runtime), workers=8
    )
    stop = asyncio.Event()
    task = asyncio.create_task(control.run(stop))
    await control.started.wait()
    while not all(_ready(records.status(k)) for k in source.declared_keys()):
        await asyncio.sleep(0.05)
    await until_idle(work)
    runtime.calls.clear()
    start = time.perf_counter()
    for key in source.declared_keys():
        work.add(key)
    await until_idle(work)
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    records.close()
    return {
        "specs": n,
        "resync_seconds": round(elapsed, 2),
        "calls": dict(runtime.calls),
        "writes": runtime.writes(),
    }


def plot(results: dict[str, Any], path: str) -> None:
    plt = support.pyplot()
    sizes = [r["n"] for r in results["runs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.27
    xs = range(len(sizes))
    ax.bar([x - width for x in xs], [r["controller"]["ready_seconds"] for r in results["runs"]],
           width, label="controller: all Ready")  # fmt: skip
    ax.bar(list(xs), [r["compose"]["up_seconds"] for r in results["runs"]], width,
           label="compose: up -d returned")  # fmt: skip
    ax.bar([x + width for x in xs], [r["compose"]["ready_seconds"] for r in results["runs"]],
           width, label="compose: all sockets accept")  # fmt: skip
    ax.set_xticks(list(xs), [str(s) for s in sizes])
    ax.set_xlabel("plugins")
    ax.set_ylabel("seconds")
    ax.set_title("Bringing up N isolated plugins on Docker")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    load = os.getloadavg()
    runs = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
            root = Path(temp)
            controller = await measure_controller(n, args.workers, root / "controller")
            compose = await asyncio.to_thread(measure_compose, n, root / "compose")
        runs.append(
            {
                "n": n,
                "controller": controller,
                "compose": compose,
                "ratio_controller_over_compose_up": round(
                    controller["ready_seconds"] / compose["up_seconds"], 2
                ),
                "ratio_controller_over_compose_ready": round(
                    controller["ready_seconds"] / compose["ready_seconds"], 2
                ),
                "ratio_controller_over_compose_total_cpu": round(
                    controller["total_cpu_ms_per_plugin"] / compose["total_cpu_ms_per_plugin"], 2
                ),
            }
        )
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
        at_scale = await resync_on_memory(args.resync_specs, Path(temp))
    return {
        "benchmark": "reconcile",
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "image": IMAGE,
        "workers": args.workers,
        "runs": runs,
        "resync_in_memory": at_scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="plugins (default 10, 50, 200)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--resync-specs", type=int, default=1000)
    parser.add_argument("--plot", metavar="FILE")
    args = parser.parse_args()
    args.n = args.n or [10, 50, 200]
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
