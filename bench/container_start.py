"""Bare container start-up on Docker and Podman: the floor the controller is measured against.

For each engine, creates and starts N containers from the base image with the
controller's isolation settings (no network, read-only root, no capabilities,
limits) and times create+start until the plugin's Unix socket, in a directory
mounted from the host, accepts a connection. Prints JSON; ``--plot FILE``
draws the distributions (needs matplotlib).

    .venv/bin/python bench/container_start.py --runs 20 [--plot start.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import support

from controller import inotify as linux_inotify
from controller.runtimes import base, container
from controller.runtimes.container import isolation
from controller.spec import models

SERVER = (
    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); "
    "[c.close() for c in iter(lambda: s.accept()[0], None)]"
)
LABEL = "blackhole.dev/bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def bare_start(client: Any, spec: models.PluginSpec, name: str, labels: dict[str, str]) -> float:
    """Seconds to create and start one container of ``spec``'s image with the controller's
    isolation settings until a socket bound in it accepts; it is removed after."""
    uid, gid = (int(x) for x in base.DEFAULT_USER.split(":"))
    socket_dir = Path(tempfile.mkdtemp(prefix="bh-bench-"))
    try:
        os.chown(socket_dir, uid, gid)
        socket_dir.chmod(0o700)
        options = isolation.container_options(spec, name=name, labels=labels)
        options["command"] = ["python3", "-c", SERVER, "/run/plugin/plugin.sock"]
        options["volumes"] = {str(socket_dir): {"bind": "/run/plugin", "mode": "rw"}}
        with contextlib.closing(linux_inotify.Inotify()) as notify:
            notify.add(socket_dir, linux_inotify.IN_CREATE)
            start = time.perf_counter()
            created = client.containers.create(**options)
            created.start()
            # Woken when the socket appears (as the controller is), not by polling.
            if not select.select([notify.fd], [], [], 30)[0]:
                raise TimeoutError(f"no socket in {socket_dir} within 30 s")
            support.wait_for_socket(socket_dir / "plugin.sock", time.monotonic() + 30)
            elapsed = time.perf_counter() - start
        created.remove(force=True)
        return elapsed
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def remove_labelled(client: Any, run_id: str) -> None:
    """Remove what :func:`bare_start` left behind under ``run_id`` (after an error)."""
    for leftover in client.containers.list(all=True, filters={"label": f"{LABEL}={run_id}"}):
        leftover.remove(force=True)


def measure(engine: container.Engine, image: str, runs: int) -> dict[str, Any]:
    client = container.connect(engine)
    spec = models.PluginSpec.model_validate({"image": image, "version": "0.0.1"})
    run_id = uuid.uuid4().hex[:8]
    samples = []
    try:
        for i in range(runs):
            name = f"bh-bench-{run_id}-{i}"
            samples.append(bare_start(client, spec, name, {LABEL: run_id}) * 1000)
    finally:
        remove_labelled(client, run_id)
        client.close()
    return {
        "runs": runs,
        "p50_ms": round(statistics.median(samples), 1),
        "p99_ms": round(percentile(samples, 0.99), 1),
        "min_ms": round(min(samples), 1),
        "samples_ms": [round(s, 1) for s in samples],
    }


def plot(results: dict[str, Any], path: str) -> None:
    plt = support.pyplot()
    engines = list(results["engines"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot([results["engines"][e]["samples_ms"] for e in engines], tick_labels=engines)
    ax.set_ylabel("create + start until the socket accepts (ms)")
    ax.set_title(f"Bare container start-up, {results['image']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--image", default=os.environ.get("BASE_IMAGE", "blackhole/base:bookworm"))
    parser.add_argument("--engine", action="append", type=container.Engine)
    parser.add_argument("--plot", metavar="FILE")
    args = parser.parse_args()
    engines = args.engine or list(container.Engine)
    results = {
        "benchmark": "container_start",
        "image": args.image,
        "engines": {str(e): measure(e, args.image, args.runs) for e in engines},
    }
    if len(engines) == 2:
        a, b = (results["engines"][str(e)]["p50_ms"] for e in engines)
        results[f"p50_ratio_{engines[1]}_over_{engines[0]}"] = round(b / a, 2)
    print(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
