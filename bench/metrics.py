"""What a scrape of ``/metrics`` costs with 10, 100 and 500 instances, beside ``docker stats``.

For each N, N small containers run on Docker with the plugins' isolation
and limits; the controller's metrics (the same :class:`Metrics` object
``bhctl run`` serves) track them, and the time to render ``/metrics`` is
taken (median and max of several scrapes), with the CPU spent per scrape and
per minute at a 15 s scrape interval. In the same run, ``docker stats
--no-stream`` reads the same containers: the way a user would otherwise get
these numbers.

Prints JSON; ``--plot FILE`` draws the times (log scale). Needs Docker and
the base image (``scripts/engines.sh docker``, ``images/build.sh``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import time
import uuid
from typing import Any

import docker
import support
from prometheus_client import generate_latest

from controller.metrics import telemetry
from controller.runtimes import container

IMAGE = "blackhole/base:bookworm"
SCRAPE_INTERVAL = 15.0
"""Prometheus' default scrape interval, for the CPU spent per minute."""


def start(client: docker.DockerClient, n: int, label: str) -> list[tuple[str, int]]:
    """Start ``n`` sleeping containers; their names and main process ids."""

    def one(index: int) -> tuple[str, int]:
        name = f"bh-bench-{label}-{index:03d}"
        created = client.containers.run(
            IMAGE,
            ["sleep", "3600"],
            name=name,
            detach=True,
            labels={"blackhole.dev/bench": label},
            network_mode="none",
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            user="65532:65532",
            mem_limit="16m",
            memswap_limit="16m",
            cpu_quota=10_000,
            cpu_period=100_000,
            pids_limit=8,
        )
        created.reload()
        return name, int(created.attrs["State"]["Pid"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def measure(names: list[tuple[str, int]], scrapes: int) -> dict[str, Any]:
    metrics = telemetry.Metrics()
    for name, pid in names:
        metrics.track(
            name,
            telemetry.Tracked(pid=pid, plugin=name, version="1.0.0", color="blue", namespace=""),
        )
    generate_latest(metrics.registry)  # warm: cgroup paths are found once per process
    times, cpu = [], []
    for _ in range(scrapes):
        wall, used = time.perf_counter(), time.process_time()
        body = generate_latest(metrics.registry)
        times.append(time.perf_counter() - wall)
        cpu.append(time.process_time() - used)
    series = sum(1 for line in body.decode().splitlines() if line.startswith("blackhole_container"))
    return {
        "scrape_ms_median": round(statistics.median(times) * 1000, 2),
        "scrape_ms_max": round(max(times) * 1000, 2),
        "cpu_ms_per_scrape": round(statistics.median(cpu) * 1000, 2),
        "cpu_seconds_per_minute": round(statistics.median(cpu) * 60 / SCRAPE_INTERVAL, 3),
        "instance_series": series,
    }


def docker_stats(names: list[tuple[str, int]], timeout: float) -> dict[str, Any]:
    command = ["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.CPUPerc}} {{.MemUsage}}"]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, *(n for n, _ in names)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "timed_out_after": timeout}
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 2), "rows": len(done.stdout.splitlines())}


def plot(results: dict[str, Any], path: str) -> None:
    plt = support.pyplot()
    runs = results["runs"]
    sizes = [r["n"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["metrics"]["scrape_ms_median"] for r in runs], "o-",
            label="/metrics from cgroup files (median)")  # fmt: skip
    stats = [(r["n"], r["docker_stats"]["seconds"]) for r in runs if r["docker_stats"]["seconds"]]
    ax.plot([n for n, _ in stats], [s * 1000 for _, s in stats], "s-",
            label="docker stats --no-stream")  # fmt: skip
    ax.axhline(250, color="grey", linestyle="--", label="goal at 500: 250 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("instances")
    ax.set_ylabel("milliseconds")
    ax.set_title("Reading every instance's resource use")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="instances (default 10, 100, 500)")
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--stats-timeout", type=float, default=300.0)
    parser.add_argument("--plot", metavar="FILE")
    args = parser.parse_args()
    sizes = args.n or [10, 100, 500]
    client = container.connect(container.Engine.DOCKER)
    label = uuid.uuid4().hex[:8]
    runs = []
    try:
        names: list[tuple[str, int]] = []
        for n in sorted(sizes):
            names += start(client, n - len(names), f"{label}-{len(names)}")
            runs.append(
                {
                    "n": n,
                    "metrics": measure(names, args.scrapes),
                    "docker_stats": docker_stats(names, args.stats_timeout),
                }
            )
    finally:
        for found in client.containers.list(all=True, filters={"label": "blackhole.dev/bench"}):
            if found.labels.get("blackhole.dev/bench", "").startswith(label):
                found.remove(force=True)
        client.close()
    for run in runs:
        seconds = run["docker_stats"]["seconds"]
        if seconds:
            run["ratio_docker_stats_over_metrics"] = round(
                seconds * 1000 / run["metrics"]["scrape_ms_median"], 1
            )
    results = {"benchmark": "metrics", "scrape_interval_seconds": SCRAPE_INTERVAL, "runs": runs}
    print(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
