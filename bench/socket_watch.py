"""How soon the container backend notices a plugin's socket, and what an idle controller costs.

Notice: the Docker (or Podman) backend follows its events while instances
start, one at a time, each running a command that binds its socket and
prints the moment it did (``--image`` gives the Python it runs on). The
notice is when the backend's ``events()`` yields the plugin's key after
that moment. Idle: a controller (``bhctl run``) with no
plugins, left alone, and the CPU its threads use per second of wall time.

``--against PATH`` compares with another copy of the ``controller`` package
(e.g. ``git archive OLD controller | tar -x -C PATH``), imported instead of
this one: notices alternate between the two in batches, and both idle
controllers run at once, so the machine's load is the same for both.

    .venv/bin/python bench/socket_watch.py [--against PATH] [--runs 20] [--image IMAGE]

Needs Docker or Podman and an image with python3; it builds the instances'
image from it (``blackhole-bench/socket-binder``) when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import support

from controller.runtimes import base, container
from controller.spec import models

BATCH = 5
"""Notices per worker process; workers of the two copies alternate."""
IDLE_SECONDS = 10.0
SETTLE_SECONDS = 3.0
"""An idle controller's first seconds, not counted: it is still starting."""


BINDER = """
import os, socket, time
s = socket.socket(socket.AF_UNIX)
binding = time.monotonic()
s.bind(os.environ["BLACKHOLE_SOCKET"])
s.listen()
print(binding, flush=True)
while True:
    s.accept()[0].close()
"""
"""The instance's command: it binds the socket, then prints when it began to (the host's
monotonic clock: containers share it). The socket appears during the bind, which a watcher can
see before the bind returns."""


def binder_image(engine: container.Engine, base_image: str) -> str:
    """An image of ``base_image`` (any with python3) running :data:`BINDER`, built if missing."""
    command = json.dumps(["python3", "-c", BINDER])
    dockerfile = f"FROM {base_image}\nUSER 65532:65532\nCMD {command}\n"
    tag = f"blackhole-bench/socket-binder:{hashlib.sha256(dockerfile.encode()).hexdigest()[:12]}"
    client = container.connect(engine)
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    finally:
        client.close()
    return tag


async def notices(engine: container.Engine, image: str, runs: int, data: Path) -> list[float]:
    """Milliseconds from socket bound to the backend's notice, for ``runs`` starts."""
    ident = f"bench-{uuid.uuid4().hex[:8]}"
    runtime = container.ContainerRuntime(
        container.Settings(engine=engine, data_dir=data, controller_id=ident)
    )
    events = runtime.events()
    seen: list[tuple[float, str]] = []
    arrived = asyncio.Event()

    async def follow() -> None:
        async for key in events:
            seen.append((time.monotonic(), key))
            arrived.set()

    follower = asyncio.create_task(follow())
    client = container.connect(engine)
    samples = []
    try:
        while not runtime._cache.following:  # its socket watch exists once it follows events
            await asyncio.sleep(0.01)
        for index in range(runs):
            plugin = f"p{index}"
            spec = models.PluginSpec.model_validate({"image": image, "version": "0.0.1"})
            labels = {
                base.LABEL_PLUGIN: plugin,
                base.LABEL_COLOR: "blue",
                base.LABEL_VERSION: "0.0.1",
                base.LABEL_SPEC_HASH: base.instance_hash(spec),
            }
            want = base.InstanceSpec(plugin, models.Color.BLUE, spec, labels, controller_id=ident)
            started = len(seen)
            await runtime.start(want)
            async with asyncio.timeout(60):
                # Its start event, then its socket; nothing else is asked of the engine meanwhile.
                while sum(k == plugin for _, k in seen[started:]) < 2:
                    arrived.clear()
                    await arrived.wait()
                while not (bound := await asyncio.to_thread(printed, client, want.name)):
                    await asyncio.sleep(0.05)
            noticed = min(t for t, k in seen[started:] if k == plugin and t >= bound)
            samples.append((noticed - bound) * 1000)
            await runtime.remove(want.name)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        for instance in await runtime.list_owned():
            await runtime.remove(instance.name)
        await runtime.close()
        client.close()
    return samples


def printed(client: docker.DockerClient, name: str) -> float | None:
    """When the instance's socket was bound, once it has said so."""
    text = client.api.logs(name).decode().strip()
    return float(text) if text else None


def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
        image = binder_image(args.engine, args.image)
        samples = asyncio.run(notices(args.engine, image, args.runs, Path(temp)))
    print(json.dumps(samples))


def run_worker(code: Path | None, engine: str, image: str, runs: int) -> list[float]:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    command = [sys.executable, __file__, "--worker", "--engine", engine, "--image", image]
    done = subprocess.run([*command, "--runs", str(runs)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the worker for {code or 'this copy'} failed:\n{done.stderr}")
    return list(json.loads(done.stdout))


def cpu_seconds(pid: int) -> float:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


async def idle(copies: dict[str, Path | None], engine: str) -> dict[str, float]:
    """CPU milliseconds per second of each copy's idle controller, all running at once."""
    async with contextlib.AsyncExitStack() as stack:
        running = {}
        for name, code in copies.items():
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bh-bench-")))
            env = None if code is None else {"PYTHONPATH": str(code)}
            running[name] = await stack.enter_async_context(
                support.controller(root, {}, "--metrics-addr", "", runtime=engine, env=env)
            )
        for each in running.values():
            await each.until((each.data / "admin.sock").exists)
        await asyncio.sleep(SETTLE_SECONDS)
        before = {n: cpu_seconds(c.process.pid) for n, c in running.items()}
        started = time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)
        wall = time.monotonic() - started
        return {
            n: round((cpu_seconds(c.process.pid) - before[n]) * 1000 / wall, 2)
            for n, c in running.items()
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, metavar="PATH")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--engine", default="docker")
    parser.add_argument("--image", default=os.environ.get("BASE_IMAGE", "blackhole/base:bookworm"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.engine = container.Engine(args.engine)
        worker(args)
        return
    copies: dict[str, Path | None] = {"this": None}
    if args.against is not None:
        copies["against"] = args.against.resolve()
    load = os.getloadavg()
    samples: dict[str, list[float]] = {name: [] for name in copies}
    for batch in range((args.runs + BATCH - 1) // BATCH):
        order = list(copies) if batch % 2 == 0 else list(copies)[::-1]
        for name in order:
            samples[name] += run_worker(copies[name], args.engine, args.image, BATCH)
    result: dict[str, Any] = {
        "benchmark": "socket_watch",
        "engine": args.engine,
        "image": args.image,
        "loadavg_before": load,
        "notice_ms": {
            name: {
                "p50": round(statistics.median(values), 2),
                "max": round(max(values), 2),
                "samples": [round(v, 2) for v in values],
            }
            for name, values in samples.items()
        },
        "idle_cpu_ms_per_second": asyncio.run(idle(copies, args.engine)),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
