"""Memory per plugin: USS and PSS of 10 plugins on each runtime, and what the controller grows.

For each runtime, one controller (``bhctl run --runtime R``) is given 10
copies of the echo example (``examples/plugins/echo.yaml``) at once; once all
are Ready and a few seconds have passed, every process in each plugin's
cgroup is read from ``/proc/PID/smaps_rollup``: USS (private clean + private
dirty) and PSS, summed per plugin. The controller's and the gateway's RSS and
USS are read before the plugins are applied and after, and the difference is
divided by the number of plugins; then as many again are applied, and the
growth from the first batch to the second gives the cost of each further
plugin (``*_per_further_plugin``: without the one-off costs of the first).
Prints JSON with p50 and max per plugin and the machine's load.

``--against PATH`` runs a second controller from another copy of the
``controller`` and ``sdk`` packages (e.g. ``git archive OLD controller sdk |
tar -x -C PATH``), side by side in the same run: on the process runtime the
plugins are forked from that copy's launcher and run its SDK; on Docker and
Podman the plugins run the SDK of their image either way.

    .venv/bin/python bench/memory.py [--plugins 10] [--runtime process ...] [--against PATH]

Needs root (the process runtime), Docker and Podman with the example images.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import support

from controller.cli import gateway as gateway_process
from controller.runtimes import container

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUNTIMES = ("process", "docker", "podman")
SETTLE_SECONDS = 3.0
"""Left alone after the last plugin is Ready, before reading (start-up garbage collected)."""
MIB = 1 << 20


def rollup(pid: int) -> dict[str, int]:
    """USS and PSS and RSS of process ``pid`` in bytes, from its smaps_rollup (empty if gone)."""
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    return {
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "pss": fields.get("Pss", 0),
        "rss": fields.get("Rss", 0),
    }


def group_pids(pid: int) -> list[int]:
    """Every process in the memory cgroup (or the unified one) that holds ``pid``."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") or [""]:
            paths[controller] = path
    root = Path("/sys/fs/cgroup")
    group = root / "memory" / paths["memory"].lstrip("/") if "memory" in paths else None
    if group is None or not group.is_dir():
        group = root / paths.get("", "/").lstrip("/")
    procs = (group / "cgroup.procs").read_text().split()
    return [int(p) for p in procs] or [pid]


def spec(index: int) -> str:
    text = (EXAMPLES / "plugins" / "echo.yaml").read_text()
    return text.replace("name: echo\n", f"name: echo-{index}\n")


def plugin_pids(runtime: str, running: support.Controller, client: Any) -> dict[str, int]:
    """Each plugin's main process."""
    found = {}
    if runtime == "process":
        for record in (running.data / "processes").glob("*.json"):
            body = json.loads(record.read_text())
            labels = (body.get("record") or {}).get("labels") or {}
            if "pid" in body:
                found[labels.get("blackhole.dev/plugin", record.stem)] = int(body["pid"])
        return found
    selector = {"label": f"blackhole.dev/controller={running.ident}"}
    for item in client.api.containers(filters=selector):
        attrs = client.api.inspect_container(item["Id"])
        found[attrs["Config"]["Labels"]["blackhole.dev/plugin"]] = int(attrs["State"]["Pid"])
    return found


def own(pid: int | None) -> dict[str, float]:
    if pid is None:
        return {}
    reading = rollup(pid)
    return {k: reading.get(k, 0) / MIB for k in ("rss", "uss")}


def mib(value: float) -> float:
    return round(value, 2)


async def measure(runtime: str, plugins: int, root: Path, against: Path | None) -> dict[str, Any]:
    options = ["--gateway-grpc-addr", "", "--metrics-addr", ""]
    if runtime == "process":
        options += ["--plugin-root", str(EXAMPLES)]
    env = None
    if against is not None:
        env = {"PYTHONPATH": os.pathsep.join([str(against), str(against / "sdk")])}
    client = None if runtime == "process" else container.connect(container.Engine(runtime))
    try:
        async with support.controller(root, {}, *options, runtime=runtime, env=env) as running:
            await running.until(lambda: (running.data / "admin.sock").exists())
            await running.until(lambda: gateway_process.running(running.data) is not None)
            await asyncio.sleep(SETTLE_SECONDS)
            gateway = gateway_process.running(running.data)
            before = {"controller": own(running.process.pid), "gateway": own(gateway)}
            for index in range(plugins):
                await asyncio.to_thread(running.admin.apply, spec(index), f"echo-{index}.yaml")
            names = [f"echo-{index}" for index in range(plugins)]
            await running.until(lambda: all(running.status(name) for name in names))
            await asyncio.sleep(SETTLE_SECONDS)
            after = {"controller": own(running.process.pid), "gateway": own(gateway)}
            # As many again: what each further plugin costs, past the first ones' one-off
            # costs (threads, connection pools, caches made on first use).
            for index in range(plugins, 2 * plugins):
                await asyncio.to_thread(running.admin.apply, spec(index), f"echo-{index}.yaml")
            names = [f"echo-{index}" for index in range(2 * plugins)]
            await running.until(lambda: all(running.status(name) for name in names))
            await asyncio.sleep(SETTLE_SECONDS)
            further = {"controller": own(running.process.pid), "gateway": own(gateway)}
            per_plugin: dict[str, dict[str, float]] = {}
            for name, pid in plugin_pids(runtime, running, client).items():
                readings = [rollup(p) for p in group_pids(pid)]
                per_plugin[name] = {
                    "uss": sum(r.get("uss", 0) for r in readings) / MIB,
                    "pss": sum(r.get("pss", 0) for r in readings) / MIB,
                    "processes": len(readings),
                }
    finally:
        if client is not None:
            client.close()
    uss = [row["uss"] for row in per_plugin.values()]
    pss = [row["pss"] for row in per_plugin.values()]
    growth = {
        f"{who}_{kind}_mib_per_plugin": mib((after[who][kind] - before[who][kind]) / plugins)
        for who in ("controller", "gateway")
        if before[who] and after[who]
        for kind in ("rss", "uss")
    }
    growth |= {
        f"{who}_{kind}_mib_per_further_plugin": mib(
            (further[who][kind] - after[who][kind]) / plugins
        )
        for who in ("controller", "gateway")
        if after[who] and further[who]
        for kind in ("rss", "uss")
    }
    return {
        "plugins": len(per_plugin),
        "uss_mib_p50": mib(statistics.median(uss)),
        "uss_mib_max": mib(max(uss)),
        "pss_mib_p50": mib(statistics.median(pss)),
        "pss_mib_max": mib(max(pss)),
        "processes_per_plugin": max(int(row["processes"]) for row in per_plugin.values()),
        **growth,
        "controller_rss_mib": {
            "before": mib(before["controller"]["rss"]),
            "after": mib(after["controller"]["rss"]),
        },
        "loadavg": os.getloadavg(),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for runtime in args.runtime:
        copies: list[tuple[str, Path | None]] = [("this", None)]
        if args.against is not None:
            copies.append(("against", args.against))
        rows = {}
        for label, code in copies:
            with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
                rows[label] = await measure(runtime, args.plugins, Path(temp), code)
        results[runtime] = rows
    return {
        "benchmark": "memory",
        "plugins": args.plugins,
        "against": None if args.against is None else str(args.against),
        "runtimes": results,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, default=10)
    parser.add_argument("--runtime", action="append", choices=RUNTIMES)
    parser.add_argument("--against", type=Path, metavar="PATH")
    args = parser.parse_args()
    args.runtime = args.runtime or list(RUNTIMES)
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
