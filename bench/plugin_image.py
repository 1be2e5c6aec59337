"""One plugin image against another, interleaved in one run: imports, start, CPU, memory.

For two builds of the same plugin (``--old`` and ``--new``, e.g. the same
example built on two plugin-runtime images), each run starts one container
of each, in alternating order, with the controller's isolation settings
(read-only root, no network, the spec's default limits) and:

- times ``import grpc`` and then ``import blackhole_sdk`` inside it;
- times create+start until the plugin's socket accepts a connection;
- reads, at that moment, the CPU the container used and the main process's
  unique (USS) and proportional (PSS) memory from ``/proc/PID/smaps_rollup``.

Prints p50 of each per image and the ratio new/old; plus both images' sizes.

    .venv/bin/python bench/plugin_image.py --old IMAGE --new IMAGE [--runs 20]

Needs root (it reads the plugin's ``/proc`` and cgroup) and Docker or Podman.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import support

from controller import cgroups
from controller.runtimes import base, container
from controller.runtimes.container import isolation
from controller.spec import models

IMPORTS = (
    "import time; t0 = time.perf_counter(); import grpc; t1 = time.perf_counter(); "
    "import blackhole_sdk; t2 = time.perf_counter(); "
    "print((t1 - t0) * 1000, (t2 - t1) * 1000)"
)
LABEL = "blackhole.dev/bench"


def memory_mib(pid: int) -> tuple[float, float]:
    """USS and PSS of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        fields[name] = int(value.split()[0])
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return uss / 1024, fields["Pss"] / 1024


class Runner:
    def __init__(self, engine: container.Engine) -> None:
        self.client = container.connect(engine)
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0
        self.cgroups = cgroups.Cgroups()

    def options(self, image: str) -> dict[str, Any]:
        self.count += 1
        spec = models.PluginSpec.model_validate({"image": image, "version": "0.0.1"})
        return isolation.container_options(
            spec, name=f"bh-bench-{self.run_id}-{self.count}", labels={LABEL: self.run_id}
        )

    def imports(self, image: str) -> tuple[float, float]:
        options = self.options(image)
        options["command"] = ["python3", "-c", IMPORTS]
        created = self.client.containers.create(**options)
        try:
            created.start()
            created.wait(timeout=60)
            grpc_ms, sdk_ms = created.logs().decode().split()
        finally:
            created.remove(force=True)
        return float(grpc_ms), float(sdk_ms)

    def start(self, image: str) -> dict[str, float]:
        socket_dir = Path(tempfile.mkdtemp(prefix="bh-bench-"))
        uid, gid = (int(x) for x in base.DEFAULT_USER.split(":"))
        os.chown(socket_dir, uid, gid)
        socket_dir.chmod(0o700)
        options = self.options(image)
        options["volumes"] = {str(socket_dir): {"bind": base.SOCKET_DIR_IN_INSTANCE, "mode": "rw"}}
        options["environment"] = {
            "BLACKHOLE_SOCKET": f"{base.SOCKET_DIR_IN_INSTANCE}/{base.SOCKET_NAME}",
            "BLACKHOLE_PLUGIN": "bench",
        }
        try:
            started = time.perf_counter()
            created = self.client.containers.create(**options)
            created.start()
            support.wait_for_socket(socket_dir / base.SOCKET_NAME, time.monotonic() + 60)
            elapsed = (time.perf_counter() - started) * 1000
            created.reload()
            pid = int(created.attrs["State"]["Pid"])
            reading = self.cgroups.read(pid)
            uss, pss = memory_mib(pid)
            created.remove(force=True)
        finally:
            shutil.rmtree(socket_dir, ignore_errors=True)
        return {
            "start_ms": elapsed,
            "cpu_ms": reading.cpu_seconds * 1000 if reading else float("nan"),
            "throttled_ms": reading.cpu_throttled_seconds * 1000 if reading else float("nan"),
            "uss_mib": uss,
            "pss_mib": pss,
        }

    def close(self) -> None:
        for leftover in self.client.containers.list(
            all=True, filters={"label": f"{LABEL}={self.run_id}"}
        ):
            leftover.remove(force=True)
        self.client.close()


def measure(engine: container.Engine, images: dict[str, str], runs: int) -> dict[str, Any]:
    runner = Runner(engine)
    sizes = {k: runner.client.images.get(image).attrs["Size"] / 1e6 for k, image in images.items()}
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in images}
    try:
        order = list(images)
        for key in order:  # once each, not counted: page caches
            runner.start(images[key])
        for run in range(runs):
            for key in order if run % 2 == 0 else reversed(order):
                grpc_ms, sdk_ms = runner.imports(images[key])
                row = {"import_grpc_ms": grpc_ms, "import_sdk_ms": sdk_ms}
                row.update(runner.start(images[key]))
                for name, value in row.items():
                    samples[key].setdefault(name, []).append(value)
    finally:
        runner.close()
    result: dict[str, Any] = {
        key: {
            "image": images[key],
            "size_mb": round(sizes[key], 1),
            **{f"{n}_p50": round(statistics.median(v), 1) for n, v in rows.items()},
        }
        for key, rows in samples.items()
    }
    old, new = ({n: statistics.median(v) for n, v in samples[k].items()} for k in ("old", "new"))
    result["new_over_old"] = {name: round(new[name] / old[name], 2) for name in new if old[name]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the image measured against")
    parser.add_argument("--new", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--engine", type=container.Engine, default=container.Engine.DOCKER)
    args = parser.parse_args()
    load = os.getloadavg()
    result = measure(args.engine, {"old": args.old, "new": args.new}, args.runs)
    print(json.dumps({"benchmark": "plugin_image", "engine": str(args.engine), "runs": args.runs,
                      "loadavg_before": load, **result}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
