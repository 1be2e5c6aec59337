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

    .venv/bin/python bench/startup.py [--runs 20] [--runtime process ...] [--plot FILE]

Needs root (the process runtime), Docker and Podman with the example images
(``scripts/engines.sh docker podman``, ``images/build.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import support

from controller.admin import client as admin_client
from controller.runtimes import base, container

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PLUGINS = ("echo", "kv-store", "analytics")
RUNTIMES = ("process", "docker", "podman")
POLL_SECONDS = 0.002
SETTLE_SECONDS = 0.3
"""Untimed pause after a delete, for the controller to finish that pass."""


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


async def until(running: support.Controller, check: Any, *args: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check(*args):
        if running.process.poll() is not None or time.monotonic() > deadline:
            log = running.data.parent / "controller.log"
            raise SystemExit(
                f"gave up waiting for {check.__name__}{args[1:]} (controller exit status "
                f"{running.process.poll()}):\n{log.read_text()}"
            )
        await asyncio.sleep(POLL_SECONDS)


async def start_once(running: support.Controller, instances: Instances, name: str) -> float:
    """Seconds from the apply of ``name``'s spec until it is Ready; it is deleted after."""
    admin = running.admin
    text = spec(name)
    started = time.perf_counter()
    await asyncio.to_thread(admin.apply, text, f"{name}.yaml")
    await until(running, ready, admin, name)
    elapsed = time.perf_counter() - started
    await asyncio.to_thread(admin.delete, name)
    await until(running, instances.gone, admin, name)
    # The delete's pass forgets the plugin's status after its instance is gone; an apply
    # landing in between loses its status to that (a race of the source, not of runtimes).
    await asyncio.sleep(SETTLE_SECONDS)
    return elapsed


async def measure(runtime: str, runs: int, root: Path) -> dict[str, Any]:
    options = ["--gateway-grpc-addr", "", "--metrics-addr", ""]
    if runtime == "process":
        options += ["--plugin-root", str(EXAMPLES)]
    results: dict[str, Any] = {}
    async with support.controller(root, {}, *options, runtime=runtime) as running:
        await until(running, lambda: (running.data / "admin.sock").exists())
        instances = Instances(runtime, running.data, running.ident)
        try:
            for name in PLUGINS:
                if name == "analytics":  # its dependency runs meanwhile
                    await asyncio.to_thread(running.admin.apply, spec("kv-store"), "kv-store.yaml")
                    await until(running, ready, running.admin, "kv-store")
                await start_once(running, instances, name)  # warms caches; not counted
                samples = [await start_once(running, instances, name) for _ in range(runs)]
                results[name] = {
                    "p50_ms": round(percentile(samples, 0.5) * 1000, 1),
                    "p99_ms": round(percentile(samples, 0.99) * 1000, 1),
                    "min_ms": round(min(samples) * 1000, 1),
                    "max_ms": round(max(samples) * 1000, 1),
                    "samples_ms": [round(s * 1000, 1) for s in samples],
                }
        finally:
            instances.close()
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
    measured = {}
    for runtime in args.runtime:
        with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
            measured[runtime] = await measure(runtime, args.runs, Path(temp))
    ratios = {}
    if "process" in measured:
        for runtime in set(measured) - {"process"}:
            ratios[f"{runtime}_p50_over_process"] = {
                name: round(
                    measured[runtime][name]["p50_ms"] / measured["process"][name]["p50_ms"], 2
                )
                for name in PLUGINS
            }
    return {"benchmark": "startup", "runs": args.runs, "runtimes": measured, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--runtime", action="append", choices=RUNTIMES)
    parser.add_argument("--plot", metavar="FILE")
    args = parser.parse_args()
    args.runtime = args.runtime or list(RUNTIMES)
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
