"""Replacing a plugin's version under load: the controller's blue/green swap against compose.

Both sides serve the storage example under the same steady load of writes
(``--rate`` calls per second) and are moved between versions 1.1.0 and
1.2.0 repeatedly, in one run:

- controller: a real ``bhctl run`` on Docker; calls go through its gateway;
  each swap is a spec edit. Reported: the pause of each swap (from the
  plugin's status), failed calls, rollbacks, and keys not readable after.
- compose: Debian's docker-compose 1.29 runs the same image with the same
  socket mount; calls go straight to the plugin's socket (re-initializing it
  after each restart, as a client would have to); each replacement is
  ``docker-compose up -d`` with the other image. Reported: failed calls, the
  downtime of each replacement (first failure to first success after), and
  keys lost with the old container's memory.

Prints JSON; ``--plot FILE`` draws the pauses. Needs Docker, docker-compose
and the images (``scripts/engines.sh docker compose``, ``images/build.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import support
from blackhole_sdk.proto import plugin_pb2

VERSIONS = ("1.1.0", "1.2.0")
IMAGE = "blackhole/example-storage:{}"
SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: kv}}
spec:
  image: blackhole/example-storage:{version}
  version: {version}
  state: {{version: 2}}
  resources: {{cpu: "1", memory: 256Mi}}
  hotSwap: {{scaleDownDelaySeconds: 0}}
  gateway: {{maxConcurrentCalls: 1000}}
"""

Put = Callable[[str, int], Awaitable[bool]]


@dataclass
class Load:
    """Puts keys at a steady rate; remembers what was acknowledged and when calls failed."""

    put: Put
    rate: float
    acknowledged: dict[str, int] = field(default_factory=dict)
    failures: list[float] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    calls: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        interval = 1 / self.rate
        pending: set[asyncio.Task[None]] = set()
        next_at = time.perf_counter()
        n = 0
        while not stop.is_set():
            n += 1
            task = asyncio.create_task(self._one(f"key-{n:07d}", n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.gather(*pending)

    async def _one(self, key: str, value: int) -> None:
        self.calls += 1
        ok = await self.put(key, value)
        now = time.perf_counter()
        if ok:
            self.acknowledged[key] = value
            self.successes.append(now)
        else:
            self.failures.append(now)


def downtimes(load: Load, moments: list[float]) -> list[float]:
    """For each replacement: first failure after it until the first success after that."""
    spans = []
    for start in moments:
        failed = [t for t in load.failures if t >= start]
        if not failed:
            spans.append(0.0)
            continue
        back = [t for t in load.successes if t > failed[0]]
        spans.append(round((back[0] if back else failed[-1]) - failed[0], 3))
    return spans


# The controller.


async def measure_controller(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        support.controller(
            root,
            {"kv.yaml": SPEC.format(version=VERSIONS[0])},
            "--gateway-grpc-addr",
            "",
            "--metrics-addr",
            "",
        ) as ours,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        await ours.until(lambda: ours.status("kv").get("activeVersion") == VERSIONS[0])
        gateway, specs = ours.addresses()["http"], ours.specs

        async def put(key: str, value: int) -> bool:
            url = f"http://{gateway}/v1/plugins/kv/call/put"
            try:
                async with session.post(url, json={"key": key, "value": value}) as answer:
                    await answer.read()
                    return answer.status == 200
            except aiohttp.ClientError:
                return False

        load = Load(put, args.rate)
        stop = asyncio.Event()
        loading = asyncio.create_task(load.run(stop))
        pauses, results = [], []
        await asyncio.sleep(1)
        for i in range(args.swaps):
            version = VERSIONS[(i + 1) % 2]
            (specs / "kv.yaml").write_text(SPEC.format(version=version))

            def done(version: str = version) -> bool:
                status = ours.status("kv")
                last = status.get("lastSwap") or {}
                return (
                    status.get("swap") is None
                    and last.get("to") == version
                    and last.get("result") in ("Promoted", "RolledBack")
                )

            await ours.until(done)
            last = ours.status("kv")["lastSwap"]
            results.append(last["result"])
            if last["result"] == "Promoted":
                pauses.append(float(last["pauseMilliseconds"]))
            else:  # rolled back: put it back to where the next swap expects it
                (specs / "kv.yaml").write_text(SPEC.format(version=VERSIONS[i % 2]))
                await asyncio.sleep(1)
            await asyncio.sleep(0.2)
        stop.set()
        await loading
        lost = [
            key
            for key, value in load.acknowledged.items()
            if not await _readable_through(session, gateway, key, value)
        ]
    return {
        "swaps": args.swaps,
        "promoted": results.count("Promoted"),
        "rolled_back": results.count("RolledBack"),
        "pause_ms_p50": round(statistics.median(pauses), 2) if pauses else None,
        "pause_ms_p99": round(sorted(pauses)[min(len(pauses) - 1, int(0.99 * len(pauses)))], 2)
        if pauses
        else None,
        "pause_ms_max": round(max(pauses), 2) if pauses else None,
        "pauses_ms": pauses,
        "calls": load.calls,
        "failed_calls": len(load.failures),
        "lost_writes": len(lost),
    }


async def _readable_through(
    session: aiohttp.ClientSession, gateway: str, key: str, value: int
) -> bool:
    url = f"http://{gateway}/v1/plugins/kv/call/get"
    async with session.post(url, json={"key": key}) as answer:
        body = await answer.json()
        return answer.status == 200 and body.get("value") == value


# Compose.


def compose_file(version: str, sockets: Path) -> str:
    service = {
        "image": IMAGE.format(version),
        "network_mode": "none",
        "read_only": True,
        "tmpfs": ["/tmp"],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "user": "65532:65532",
        "mem_limit": "256m",
        "environment": {"BLACKHOLE_SOCKET": "/run/blackhole/plugin.sock"},
        "volumes": [f"{sockets}:/run/blackhole"],
    }
    return json.dumps({"version": "2.4", "services": {"kv": service}}, indent=1)


async def measure_compose(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        sys.exit("docker-compose is missing: run scripts/engines.sh docker compose")
    sockets = root / "sockets"
    sockets.mkdir(parents=True)
    os.chown(sockets, 65532, 65532)
    path = root / "docker-compose.yml"
    project = f"bhbench{uuid.uuid4().hex[:8]}"
    command = ["docker-compose", "-p", project, "-f", str(path)]

    def up(version: str) -> None:
        path.write_text(compose_file(version, sockets))
        subprocess.run([*command, "up", "-d"], check=True, capture_output=True)

    channel = grpc.aio.insecure_channel(f"unix:{sockets / 'plugin.sock'}")
    handle = channel.unary_unary(
        "/blackhole.plugin.v1.Plugin/Handle",
        request_serializer=plugin_pb2.HandleRequest.SerializeToString,
        response_deserializer=plugin_pb2.HandleResponse.FromString,
    )
    initialize = channel.unary_unary(
        "/blackhole.plugin.v1.Plugin/Initialize",
        request_serializer=plugin_pb2.InitializeRequest.SerializeToString,
        response_deserializer=plugin_pb2.InitializeResponse.FromString,
    )

    async def call(method: str, payload: dict[str, Any]) -> bytes | None:
        request = plugin_pb2.HandleRequest(method=method, payload=json.dumps(payload).encode())
        for _ in range(2):
            try:
                return bytes((await handle(request, timeout=5)).payload)
            except grpc.aio.AioRpcError as e:
                if e.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                    return None
                # A new container answers nothing before its handshake: do it, as a client must.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await initialize(plugin_pb2.InitializeRequest(protocol_version=1), timeout=5)
        return None

    async def put(key: str, value: int) -> bool:
        return await call("put", {"key": key, "value": value}) is not None

    try:
        await asyncio.to_thread(up, VERSIONS[0])
        deadline = time.monotonic() + 60
        while await call("list", {}) is None:
            if time.monotonic() > deadline:
                sys.exit("the compose service never answered")
            await asyncio.sleep(0.05)
        load = Load(put, args.rate)
        stop = asyncio.Event()
        running = asyncio.create_task(load.run(stop))
        moments = []
        await asyncio.sleep(1)
        for i in range(args.compose_replacements):
            moments.append(time.perf_counter())
            await asyncio.to_thread(up, VERSIONS[(i + 1) % 2])
            await asyncio.sleep(2)
        stop.set()
        await running
        lost = 0
        for key, value in load.acknowledged.items():
            answer = await call("get", {"key": key})
            if answer is None or json.loads(answer).get("value") != value:
                lost += 1
    finally:
        await channel.close()
        subprocess.run([*command, "down", "-t", "0"], check=False, capture_output=True)
    spans = downtimes(load, moments)
    return {
        "replacements": args.compose_replacements,
        "calls": load.calls,
        "failed_calls": len(load.failures),
        "downtime_seconds": spans,
        "downtime_seconds_median": statistics.median(spans) if spans else None,
        "lost_writes": lost,
    }


def plot(results: dict[str, Any], path: str) -> None:
    plt = support.pyplot()
    pauses = results["controller"]["pauses_ms"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(pauses) + 1), pauses, "o-", label="controller: calls held (ms)")
    downtime = results["compose"]["downtime_seconds_median"]
    if downtime is not None:
        ax.axhline(downtime * 1000, color="red", label="compose: median downtime (ms)")
    ax.set_yscale("log")
    ax.set_xlabel("swap")
    ax.set_ylabel("milliseconds")
    ax.set_title(f"Replacing a version under {results['rate']:.0f} calls/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
        ours = await measure_controller(args, Path(temp) / "controller")
        theirs = await measure_compose(args, Path(temp) / "compose")
    return {"benchmark": "hotswap", "rate": args.rate, "controller": ours, "compose": theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--compose-replacements", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    parser.add_argument("--plot", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the plugins' socket directories belong to the plugins' user")
    results = asyncio.run(main_async(args))
    if args.plot:
        plot(results, args.plot)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
