"""Calls through the gateway while the controller is SIGKILLed (or replaced) and restarted.

Under ``--rate`` calls a second (open loop: a call is sent every 1/rate s,
whatever the others do) to one plugin through the gateway's HTTP address,
the controller is killed with SIGKILL (``--mode kill``) or replaced by a new
process of itself after SIGTERM (``--mode upgrade``: what an upgrade does)
``--rounds`` times, each time started again and waited for until its admin
API answers and the plugin is Ready. Prints JSON: calls sent, failed calls
by kind (goal: 0), and how long each controller took to answer again.

``--gateway in-process`` measures the old way, where the gateway lives in
the controller and dies with it; ``--gateway process`` (the default) the
gateway as its own process, which keeps routing meanwhile.

    .venv/bin/python bench/controller_restarts.py --mode kill --rounds 20
    .venv/bin/python bench/controller_restarts.py --mode upgrade --gateway in-process
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import support

from controller.admin import client as admin_client
from controller.cli import gateway as gateway_process

SPEC = """apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: echo
spec:
  image: blackhole/example-echo:0.1.0
  version: 0.1.0
"""


def free_port() -> int:
    """A port below the kernel's ephemeral range, so no outgoing connection takes it."""
    while True:
        port = random.randint(20000, 30000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Load:
    """``rate`` calls a second to the gateway, each on its own; failures counted by kind."""

    def __init__(self, url: str, rate: float) -> None:
        self.url = url
        self.rate = rate
        self.sent = 0
        self.ok = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.stop = asyncio.Event()
        self.calls: set[asyncio.Task[None]] = set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            self.sent += 1
            task = asyncio.create_task(self._call(session, self.sent))
            self.calls.add(task)
            task.add_done_callback(self.calls.discard)
            wait = started + self.sent / self.rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        if self.calls:
            await asyncio.wait(self.calls)

    async def _call(self, session: aiohttp.ClientSession, n: int) -> None:
        try:
            async with session.post(self.url, json={"n": n}) as answer:
                body = await answer.read()
                if answer.status == 200 and json.loads(body)["payload"] == {"n": n}:
                    self.ok += 1
                else:
                    reason = json.loads(body).get("reason", "") if body else ""
                    self.failed[f"{answer.status} {reason}".strip()] += 1
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.failed[type(e).__name__] += 1


async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    specs, data = root / "specs", root / "data"
    specs.mkdir(parents=True)
    (specs / "echo.yaml").write_text(SPEC)
    ident = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "bhctl"), "run", "--specs", str(specs),
        "--data-dir", str(data), "--controller-id", ident,
        "--gateway-addr", f"127.0.0.1:{port}", "--gateway-grpc-addr", "",
        "--metrics-addr", "", "--log-level", "warning", "--gateway", args.gateway,
        "--runtime", args.runtime,
    ]  # fmt: skip
    log = (root / "controller.log").open("ab")
    admin = admin_client.AdminClient(data / "admin.sock", timeout=10)
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> support.Controller:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        return support.Controller(specs, data, ident, admin, process)

    def answers() -> bool:
        try:
            admin.list()
        except admin_client.ControllerNotRunningError:
            return False
        return True

    running = start()
    await running.until(lambda: running.status("echo"))
    load = Load(f"http://127.0.0.1:{port}/v1/plugins/echo/call/echo", args.rate)
    restarts: list[float] = []
    gateway_pids: set[int | None] = set()
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as session:
            sending = asyncio.create_task(load.run(session))
            await asyncio.sleep(1.0)
            for _ in range(args.rounds):
                gateway_pids.add(gateway_process.running(data))
                stopped = time.monotonic()
                if args.mode == "kill":
                    running.process.send_signal(signal.SIGKILL)
                else:
                    running.process.send_signal(signal.SIGTERM)
                await asyncio.to_thread(running.process.wait, 60)
                running = start()
                await running.until(answers)
                await running.until(functools.partial(running.status, "echo"))
                restarts.append(time.monotonic() - stopped)
                await asyncio.sleep(args.between)
            load.stop.set()
            await sending
    finally:
        running.process.terminate()
        await asyncio.to_thread(running.process.wait, 60)
        await asyncio.to_thread(gateway_process.stop_running, data)
        await support._remove_instances(args.runtime, data, ident)
        log.close()
    return {
        "mode": args.mode,
        "gateway": args.gateway,
        "runtime": args.runtime,
        "rounds": args.rounds,
        "rate": args.rate,
        "calls": load.sent,
        "answered": load.ok,
        "failed": sum(load.failed.values()),
        "failedByKind": dict(load.failed),
        "controllerBackSeconds": {
            "p50": round(statistics.median(restarts), 3),
            "max": round(max(restarts), 3),
        },
        "gatewayProcesses": len(gateway_pids - {None}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["kill", "upgrade"], default="kill")
    parser.add_argument("--gateway", choices=["process", "in-process"], default="process")
    parser.add_argument("--runtime", choices=["docker", "podman", "process"], default="docker")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument(
        "--between", type=float, default=0.5, help="seconds of calls after each restart"
    )
    parser.add_argument("--plot", type=Path, help="draw the answered and failed calls here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bh-restarts-") as root:
        result = asyncio.run(measure(args, Path(root)))
    print(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = support.pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    kinds = {"answered": result["answered"], **result["failedByKind"]}
    axes.bar(
        list(kinds), list(kinds.values()), color=["tab:green"] + ["tab:red"] * (len(kinds) - 1)
    )
    axes.set_ylabel("calls")
    axes.set_title(
        f"{result['rounds']} controller {result['mode']}s at {result['rate']:g} calls/s, "
        f"gateway {result['gateway']}"
    )
    axes.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
