"""Plugin start-up: a spec applied until the plugin is Ready, on processes, Docker and Podman.

For each runtime, one controller (``bhctl run --runtime R``) is given the
example plugins' specs (``examples/plugins``: echo, kv-store, analytics) one
at a time through its admin API, ``--runs`` times each: the time from the
apply until the plugin's status says Ready (its instance started, its socket
accepting, its handshake and health check passed), then the plugin is deleted
and gone before the next run. analytics depends on kv-store, which is kept
running (not timed) while analytics is measured. Prints p50 and p99 per
plugin and runtime, and the ratio of each runtime's p50 to the process
runtime's; ``--plot FILE`` draws them.

On Docker and Podman the floor is measured in the same interleaved loop: a
bare create+start of the plugin's own image with its spec's isolation and
limits (no boost, no volumes), timed until a socket bound in it accepts
(``container_start.bare_start``), once per run beside each timed start; each
plugin's row carries the floor's p50/p99 and ``p50_over_floor``.

    .venv/bin/python bench/startup.py [--runs 20] [--runtime process ...] [--plot FILE]

Needs root (the process runtime), Docker and Podman with the example images
(``scripts/engines.sh docker podman``, ``images/build.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import container_start
import support
import yaml

from controller import inotify as linux_inotify
from controller.admin import client as admin_client
from controller.runtimes import base, container
from controller.spec import models

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PLUGINS = ("echo", "kv-store", "analytics")
RUNTIMES = ("process", "docker", "podman")
POLL_SECONDS = 0.002
"""How often ``--wait admin-poll`` asks the admin API."""
IN_MODIFY = 0x2
FALLBACK_SECONDS = 0.5
"""Longest wait on the data directory between two looks (a write may share one event)."""
SETTLE_SECONDS = 0.3
"""Untimed pause after a delete, for the controller to finish that pass."""


class Variant(NamedTuple):
    """One way of starting: how Ready is waited for, the repository images are taken from
    instead of the spec's (None: the spec's), the controller's ``--start-cpu`` (None: its
    default)."""

    wait: str
    images_from: str | None
    start_cpu: int | None


@dataclass
class Watched:
    """A controller under measurement, with what the bench watches it through."""

    running: support.Controller
    instances: Instances
    store: Store
    version: str = "0.1.0"
    """The version of echo it was last given (the event measurements change it)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def spec(name: str) -> str:
    return (EXAMPLES / "plugins" / f"{name}.yaml").read_text()


def ready(admin: admin_client.AdminClient, name: str) -> bool:
    items = {i["metadata"]["name"]: i for i in admin.list()["items"]}
    conditions = ((items.get(name) or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


class Store:
    """The controller's status records, read from its SQLite file; woken when it is written."""

    def __init__(self, data: Path) -> None:
        self.path = data / "state.db"
        self.notify = linux_inotify.Inotify()
        self.notify.add(data, IN_MODIFY)
        self.written = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.notify.fd, self._woken)
        self._db: sqlite3.Connection | None = None

    def _woken(self) -> None:
        self.notify.read()
        self.written.set()

    def status(self, name: str) -> dict[str, Any] | None:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        row = self._db.execute("SELECT status FROM plugins WHERE key = ?", (name,)).fetchone()
        return None if row is None else dict(json.loads(row[0] or "{}"))

    def ready(self, name: str) -> bool:
        conditions = (self.status(name) or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def forgotten(self, name: str) -> bool:
        return self.status(name) is None

    async def until(self, running: support.Controller, check: Any, *args: Any) -> None:
        deadline = time.monotonic() + 60
        while True:
            self.written.clear()
            if check(*args):
                return
            if running.process.poll() is not None or time.monotonic() > deadline:
                log = running.data.parent / "controller.log"
                raise SystemExit(
                    f"gave up waiting for {check.__name__}{args} (status of echo: "
                    f"{self.status('echo')}):\n{log.read_text()}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.written.wait(), FALLBACK_SECONDS)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.notify.fd)
        self.notify.close()
        if self._db is not None:
            self._db.close()


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``'s threads so far, in nanoseconds' resolution (the
    scheduler's accounting; ``/proc/PID/stat`` counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


class Instances:
    """Whether a plugin still has an instance on the runtime (so that no start adopts one)."""

    def __init__(self, runtime: str, data: Path, ident: str) -> None:
        self.runtime, self.data, self.ident = runtime, data, ident
        self.client = None if runtime == "process" else container.connect(container.Engine(runtime))

    def gone(self, admin: admin_client.AdminClient, name: str) -> bool:
        if any(i["metadata"]["name"] == name for i in admin.list()["items"]):
            return False
        if self.client is None:
            return not any((self.data / "processes").glob(f"bh-{self.ident}-{name}-*.json"))
        labels = [f"{base.LABEL_CONTROLLER}={self.ident}", f"{base.LABEL_PLUGIN}={name}"]
        return not self.client.api.containers(all=True, filters={"label": labels})

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


async def until(
    running: support.Controller,
    check: Any,
    *args: Any,
    timeout: float = 120,
    poll: float = POLL_SECONDS,
) -> None:
    deadline = time.monotonic() + timeout
    while not check(*args):
        if running.process.poll() is not None or time.monotonic() > deadline:
            log = running.data.parent / "controller.log"
            raise SystemExit(
                f"gave up waiting for {check.__name__}{args[1:]} (controller exit status "
                f"{running.process.poll()}):\n{log.read_text()}"
            )
        await asyncio.sleep(poll)


async def start_once(watched: Watched, name: str, variant: Variant) -> tuple[float, float]:
    """Seconds from the apply of ``name``'s spec until it is Ready, and the controller's CPU
    seconds meanwhile; it is deleted after."""
    running, instances, store = watched.running, watched.instances, watched.store
    admin = running.admin
    text = spec(name)
    if variant.images_from is not None:
        text = text.replace("image: blackhole/", f"image: {variant.images_from}/")
    cpu = cpu_seconds(running.process.pid)
    started = time.perf_counter()
    await asyncio.to_thread(admin.apply, text, f"{name}.yaml")
    if variant.wait == "admin-poll":
        await until(running, ready, admin, name)
    else:
        await store.until(running, store.ready, name)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(running.process.pid) - cpu
    await asyncio.to_thread(admin.delete, name)
    await store.until(running, store.forgotten, name)
    await until(running, instances.gone, admin, name, poll=SETTLE_SECONDS / 10)
    # The delete's pass forgets the plugin's status after its instance is gone; an apply
    # landing in between loses its status to that (a race of the source, not of runtimes).
    await asyncio.sleep(SETTLE_SECONDS)
    return elapsed, cpu


class Floor:
    """The bare create+start of a plugin's image on an engine (see the module's notes)."""

    def __init__(self, runtime: str) -> None:
        self.client = container.connect(container.Engine(runtime))
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0

    async def once(self, name: str, images_from: str | None) -> float:
        document = yaml.safe_load(spec(name))
        # Its volumes are left out: the floor is the container alone.
        plugin = models.PluginSpec.model_validate({**document["spec"], "volumes": []})
        if images_from is not None and plugin.image is not None:
            image = plugin.image.replace("blackhole/", f"{images_from}/", 1)
            plugin = plugin.model_copy(update={"image": image})
        self.count += 1
        labels = {container_start.LABEL: self.run_id}
        return await asyncio.to_thread(
            container_start.bare_start,
            self.client,
            plugin,
            f"bh-floor-{self.run_id}-{self.count}",
            labels,
        )

    def close(self) -> None:
        container_start.remove_labelled(self.client, self.run_id)
        self.client.close()


def summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    times = [elapsed for elapsed, _ in samples]
    return {
        "p50_ms": round(percentile(times, 0.5) * 1000, 1),
        "p99_ms": round(percentile(times, 0.99) * 1000, 1),
        "min_ms": round(min(times) * 1000, 1),
        "max_ms": round(max(times) * 1000, 1),
        "controller_cpu_ms_p50": round(percentile([c for _, c in samples], 0.5) * 1000, 1),
        "samples_ms": [round(s * 1000, 1) for s in times],
    }


def label(variant: Variant) -> str:
    parts = [variant.wait]
    if variant.images_from is not None:
        parts.append(f"images from {variant.images_from}")
    if variant.start_cpu is not None:
        parts.append(f"--start-cpu {variant.start_cpu}")
    return ", ".join(parts)


async def measure(
    runtime: str, runs: int, root: Path, variants: list[Variant], with_floor: bool = True
) -> dict[str, Any]:
    options = ["--gateway-grpc-addr", "", "--metrics-addr", ""]
    if runtime == "process":
        options += ["--plugin-root", str(EXAMPLES)]
    results: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        floor = None
        if runtime != "process" and with_floor:
            floor = Floor(runtime)
            stack.callback(floor.close)
        controllers: dict[int | None, Watched] = {}
        for start_cpu in dict.fromkeys(v.start_cpu for v in variants):
            extra = [] if start_cpu is None else ["--start-cpu", str(start_cpu)]
            folder = root / f"start-cpu-{start_cpu}"
            running = await stack.enter_async_context(
                support.controller(folder, {}, *options, *extra, runtime=runtime)
            )
            await until(
                running,
                lambda running=running: all(
                    (running.data / f).exists() for f in ("state.db", "admin.sock")
                ),
                poll=0.05,
            )
            instances = Instances(runtime, running.data, running.ident)
            stack.callback(instances.close)
            store = Store(running.data)
            stack.callback(store.close)
            controllers[start_cpu] = Watched(running, instances, store)
        for name in PLUGINS:
            if name == "analytics":  # its dependency runs meanwhile
                for watched in controllers.values():
                    kv = spec("kv-store")
                    await asyncio.to_thread(watched.running.admin.apply, kv, "kv-store.yaml")
                    await watched.store.until(watched.running, watched.store.ready, "kv-store")
            samples: dict[Variant, list[tuple[float, float]]] = {}
            floors: list[tuple[float, float]] = []
            steps: list[Variant | None] = [*variants, None] if floor else list(variants)
            for variant in variants:  # warms caches; not counted
                await start_once(controllers[variant.start_cpu], name, variant)
            for run in range(runs):
                for step in steps if run % 2 == 0 else steps[::-1]:
                    if step is None and floor is not None:
                        floors.append((await floor.once(name, variants[0].images_from), 0.0))
                    elif step is not None:
                        sample = await start_once(controllers[step.start_cpu], name, step)
                        samples.setdefault(step, []).append(sample)
            first = summary(samples[variants[0]])
            results[name] = first
            if floors:
                bare = summary(floors)
                del bare["controller_cpu_ms_p50"]
                first["floor"] = bare
                first["p50_over_floor"] = round(first["p50_ms"] / bare["p50_ms"], 2)
                first["p99_over_floor"] = round(first["p99_ms"] / bare["p99_ms"], 2)
            if len(variants) > 1:
                rows = {label(v): summary(samples[v]) for v in variants}
                results[name]["variants"] = rows
                results[name]["p50_over_first"] = {
                    key: round(row["p50_ms"] / first["p50_ms"], 2) for key, row in rows.items()
                }
    return results


RESTART = (
    "  restart: {{backoffSeconds: 0.001, maxBackoffSeconds: 0.001, maxRestarts: 1000, "
    "standby: {standby}}}\n  hotSwap: {{scaleDownDelaySeconds: 0}}\n"
)
"""Restarted at once (the backoff out of the measurement), old colors removed at once."""


def events_spec(version: str, standby: bool) -> str:
    text = spec("echo").replace("version: 0.1.0", f"version: {version}")
    return text.rstrip("\n") + "\n" + RESTART.format(standby="true" if standby else "false")


def restarts(store: Store) -> int:
    return sum(int(i.get("restarts", 0)) for i in (store.status("echo") or {}).get("instances", []))


def standby_state(store: Store) -> str | None:
    standby = (store.status("echo") or {}).get("standby") or {}
    return standby.get("state")


def main_pid(watched: Watched) -> int:
    """The host pid of echo's active instance's main process."""
    status = watched.store.status("echo") or {}
    color = models.Color(status.get("activeColor") or "blue")
    name = base.instance_name("echo", color, None, watched.running.ident)
    client = watched.instances.client
    if client is None:
        record = json.loads((watched.running.data / "processes" / f"{name}.json").read_text())
        return int(record["pid"])
    return int(client.api.inspect_container(name)["State"]["Pid"])


async def crash_once(watched: Watched, standby: bool) -> tuple[float, float]:
    """Seconds from a SIGKILL of echo's active instance until it is Ready again (restarted
    from its frozen standby, or cold), and the controller's CPU seconds meanwhile."""
    running, store = watched.running, watched.store
    text = events_spec(watched.version, standby)
    await asyncio.to_thread(running.admin.apply, text, "echo.yaml")
    if standby:
        await store.until(running, lambda: standby_state(store) == "Frozen")
    else:
        await store.until(running, lambda: standby_state(store) is None)
    await store.until(running, store.ready, "echo")
    before = restarts(store)
    pid = main_pid(watched)
    cpu = cpu_seconds(running.process.pid)
    started = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    await store.until(running, lambda: restarts(store) > before and store.ready("echo"))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(running.process.pid) - cpu
    if standby:
        events = running.admin.get("echo")["events"]
        said = [e["message"] for e in events if e["reason"] == "Restarted"][-1]
        if "from its standby" not in said:
            raise SystemExit(f"the standby was not used: {said}")
    return elapsed, cpu


async def swap_once(watched: Watched, version: str) -> tuple[float, float]:
    """Seconds from the apply of a new version of echo until its new color is Ready (the
    old one serving meanwhile), and the controller's CPU seconds meanwhile; the swap is then
    let finish."""
    running, store = watched.running, watched.store

    def new_color_ready() -> bool:
        return any(
            i.get("version") == version and i.get("ready")
            for i in (store.status("echo") or {}).get("instances", [])
        )

    def swapped() -> bool:
        status = store.status("echo") or {}
        return status.get("swap") is None and len(status.get("instances", [])) == 1

    cpu = cpu_seconds(running.process.pid)
    started = time.perf_counter()
    await asyncio.to_thread(running.admin.apply, events_spec(version, False), "echo.yaml")
    await store.until(running, new_color_ready)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(running.process.pid) - cpu
    await store.until(running, lambda: store.ready("echo") and swapped())
    watched.version = version
    return elapsed, cpu


async def measure_events(
    runtime: str, runs: int, root: Path, with_floor: bool = True
) -> dict[str, Any]:
    """echo's swap to a new color, and its crash restarts with and without a standby,
    interleaved with the floor; one controller."""
    options = ["--gateway-grpc-addr", "", "--metrics-addr", ""]
    if runtime == "process":
        options += ["--plugin-root", str(EXAMPLES)]
    async with contextlib.AsyncExitStack() as stack:
        floor = None
        if runtime != "process" and with_floor:
            floor = Floor(runtime)
            stack.callback(floor.close)
        running = await stack.enter_async_context(
            support.controller(root, {}, *options, runtime=runtime)
        )
        await until(
            running,
            lambda: all((running.data / f).exists() for f in ("state.db", "admin.sock")),
            poll=0.05,
        )
        instances = Instances(runtime, running.data, running.ident)
        stack.callback(instances.close)
        store = Store(running.data)
        stack.callback(store.close)
        watched = Watched(running, instances, store)
        await asyncio.to_thread(running.admin.apply, events_spec("0.1.0", False), "echo.yaml")
        await store.until(running, store.ready, "echo")
        steps = ["swap", "crash", "crash-standby"]
        if runtime == "process":
            steps.remove("crash-standby")  # no standby on this runtime
        samples: dict[str, list[tuple[float, float]]] = {step: [] for step in steps}
        floors: list[tuple[float, float]] = []
        versions = iter(f"0.1.{n}" for n in range(1, 2 * runs + 2))
        await swap_once(watched, next(versions))  # warms caches; not counted
        for run in range(runs):
            for step in steps if run % 2 == 0 else steps[::-1]:
                if step == "swap":
                    samples[step].append(await swap_once(watched, next(versions)))
                else:
                    samples[step].append(await crash_once(watched, step == "crash-standby"))
            if floor is not None:
                floors.append((await floor.once("echo", None), 0.0))
    results: dict[str, Any] = {step: summary(rows) for step, rows in samples.items()}
    if floors:
        bare = summary(floors)
        del bare["controller_cpu_ms_p50"]
        results["floor"] = bare
        for step in steps:
            results[step]["p50_over_floor"] = round(results[step]["p50_ms"] / bare["p50_ms"], 2)
    return results


def plot(results: dict[str, Any], path: str) -> None:
    plt = support.pyplot()
    runtimes = list(results["runtimes"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runtimes)
    for index, runtime in enumerate(runtimes):
        rows = results["runtimes"][runtime]
        xs = [p + (index - (len(runtimes) - 1) / 2) * width for p in range(len(PLUGINS))]
        p50 = [rows[name]["p50_ms"] for name in PLUGINS]
        p99 = [rows[name]["p99_ms"] for name in PLUGINS]
        ax.bar(xs, p50, width, label=f"{runtime} p50")
        ax.scatter(xs, p99, marker="_", s=200, color="black")
    ax.axhline(100, linestyle="--", color="grey", linewidth=1)
    ax.set_xticks(range(len(PLUGINS)), list(PLUGINS))
    ax.set_ylabel("ms, spec applied to Ready (bars p50, marks p99)")
    ax.set_yscale("log")
    ax.set_title(f"Plugin start-up, {results['runs']} starts each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    images = [None] if args.images_from is None else [None, args.images_from]
    variants = [
        Variant(wait, image, start_cpu)
        for start_cpu in args.start_cpu
        for image in images
        for wait in args.wait
    ]
    load = os.getloadavg()
    measured: dict[str, Any] = {runtime: {} for runtime in args.runtime}
    for runtime in args.runtime if not args.only_events else []:
        with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
            measured[runtime] = await measure(
                runtime, args.runs, Path(temp), variants, not args.no_floor
            )
    events = {}
    for runtime in args.runtime if args.events or args.only_events else []:
        with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
            events[runtime] = await measure_events(
                runtime, args.runs, Path(temp), not args.no_floor
            )
    if args.only_events:
        return {
            "benchmark": "startup",
            "runs": args.runs,
            "loadavg_before": load,
            "echo_events": events,
            "loadavg_after": os.getloadavg(),
        }
    ratios = {}
    if "process" in measured:
        for runtime in set(measured) - {"process"}:
            ratios[f"{runtime}_p50_over_process"] = {
                name: round(
                    measured[runtime][name]["p50_ms"] / measured["process"][name]["p50_ms"], 2
                )
                for name in PLUGINS
            }
    return {
        "benchmark": "startup",
        "runs": args.runs,
        "variants": [label(v) for v in variants],
        "loadavg_before": load,
        "runtimes": measured,
        "ratios": ratios,
        "p50_over_floor": {
            runtime: {name: rows[name]["p50_over_floor"] for name in PLUGINS}
            for runtime, rows in measured.items()
            if "p50_over_floor" in rows[PLUGINS[0]]
        },
        "echo_events": events,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--runtime", action="append", choices=RUNTIMES)
    parser.add_argument("--wait", action="append", choices=("store", "admin-poll"))
    parser.add_argument("--images-from", metavar="PREFIX")
    parser.add_argument("--start-cpu", action="append", type=int, metavar="MILLIS")
    parser.add_argument("--plot", metavar="FILE")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare create+start")
    parser.add_argument(
        "--events",
        action="store_true",
        help="also echo's swap to a new color and its crash restarts, cold and from a standby",
    )
    parser.add_argument("--only-events", action="store_true", help="only those (implies --events)")
    args = parser.parse_args()
    args.runtime = args.runtime or list(RUNTIMES)
    args.wait = args.wait or ["store"]
    args.start_cpu = args.start_cpu or [None]
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
