"""Swapping a stateful plugin under load: pre-copy against a whole copy under the hold, and compose.

The storage example serves a steady load of writes (``--rate`` calls per
second) through a real ``bhctl run`` on Docker (``--runtime``: or Podman,
or processes) and is swapped between
versions 1.1.0 and 1.2.0 (``--swaps`` times) at each state size of
``--sizes`` (MB, filled with 64 KiB values before the swaps), once per
state transfer strategy, each on a fresh controller, in one run:

- PreCopy (``hotSwap.stateTransfer: PreCopy``, the default): the state is
  copied while the old color serves; calls are held only for the last delta.
- FullCopy: the whole state moves while calls are held (the old way).

Reported per strategy and size: the pause (``lastSwap.pauseMilliseconds``)
p50 / p99 / max, the longest call seen by a client during the swaps, failed
calls, lost writes (acknowledged, not readable after), the swap's whole
duration (spec written to promoted), bytes moved while held, and the
controller's resident memory before the swaps and at its peak during them
(``VmHWM`` after resetting it). ``maxPauseMilliseconds`` is set to 60000 so
that every swap promotes and is measured.

With ``--compose``, Debian's docker-compose 1.29 runs the same image with
the same socket mount; calls go straight to the plugin's socket; each
replacement is ``docker-compose up -d`` with the other image. Reported:
failed calls, the downtime of each replacement and the keys lost with the
old container's memory.

``--gateway in-process`` runs the gateway inside the controller instead of
in its own process (the default), to compare failed calls by kind.

Prints JSON; ``--plot FILE`` draws the pause against the state size for
both strategies. Needs Docker and the images (``scripts/engines.sh docker``,
``images/build.sh``; ``compose`` too for ``--compose``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
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
  process: {{path: storage}}
  state: {{version: 2, checkpointSeconds: 0}}
  resources: {{cpu: "1", memory: 2Gi}}
  hotSwap: {{scaleDownDelaySeconds: 0, maxPauseMilliseconds: 60000, stateTransfer: {transfer}}}
  gateway: {{maxConcurrentCalls: 1000, timeoutSeconds: 120}}
"""
VALUE_BYTES = 64 << 10

Put = Callable[[str, int], Awaitable[bool]]


@dataclass
class Load:
    """Puts keys at a steady rate; remembers what was acknowledged and when calls failed."""

    put: Put
    rate: float
    acknowledged: dict[str, int] = field(default_factory=dict)
    failures: list[float] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    """(when it started, how long it took) of every call."""
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
        started = time.perf_counter()
        ok = await self.put(key, value)
        now = time.perf_counter()
        self.latencies.append((started, now - started))
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


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def memory_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


# The controller.


async def measure_controller(
    args: argparse.Namespace, root: Path, transfer: str, megabytes: float
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    spec = SPEC.format(version=VERSIONS[0], transfer=transfer)
    options = ["--gateway-grpc-addr", "", "--metrics-addr", "", "--gateway", args.gateway]
    if args.runtime == "process":
        options += ["--plugin-root", str(Path(__file__).resolve().parent.parent / "examples")]
    async with (
        support.controller(root, {"kv.yaml": spec}, *options, runtime=args.runtime) as ours,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        await ours.until(lambda: ours.status("kv").get("activeVersion") == VERSIONS[0])
        gateway, specs = ours.addresses()["http"], ours.specs
        url = f"http://{gateway}/v1/plugins/kv/call/put"

        why: collections.Counter[str] = collections.Counter()

        async def put(key: str, value: Any) -> bool:
            try:
                async with session.post(url, json={"key": key, "value": value}) as answer:
                    body = await answer.read()
                    if answer.status != 200:
                        reason = json.loads(body).get("reason", "") if body else ""
                        why[f"{answer.status} {reason}".strip()] += 1
                    return answer.status == 200
            except aiohttp.ClientError as e:
                why[type(e).__name__] += 1
                return False

        filled = await fill(put, megabytes)
        load = Load(put, args.rate)
        stop = asyncio.Event()
        loading = asyncio.create_task(load.run(stop))
        await asyncio.sleep(1)
        pid = ours.process.pid
        rss_before = memory_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on
        pauses, held, durations, windows = [], [], [], []
        breakdowns: list[str] = []
        for i in range(args.swaps):
            version = VERSIONS[(i + 1) % 2]
            began = time.perf_counter()
            (specs / "kv.yaml").write_text(SPEC.format(version=version, transfer=transfer))

            def done(version: str = version) -> bool:
                status = ours.status("kv")
                last = status.get("lastSwap") or {}
                return (
                    status.get("swap") is None
                    and last.get("to") == version
                    and last.get("result") in ("Promoted", "RolledBack")
                )

            await ours.until(done, timeout=600)
            durations.append(time.perf_counter() - began)
            windows.append((began, time.perf_counter()))
            last = ours.status("kv")["lastSwap"]
            if last["result"] != "Promoted":
                sys.exit(f"a swap rolled back: {last}")
            pauses.append(float(last["pauseMilliseconds"]))
            held.append(int(last.get("heldStateBytes") or 0))
            events = await asyncio.to_thread(ours.admin.get, "kv")
            promoted = [e for e in events["events"] if e["reason"] == "SwapPromoted"]
            where = re.search(
                r"held [\d.]+ ms \(([^)]*)\)", promoted[-1]["message"] if promoted else ""
            )
            breakdowns.append(where.group(1) if where else "")
            await asyncio.sleep(0.5)
        rss_peak = memory_kib(pid, "VmHWM")
        stop.set()
        await loading
        lost = [
            key
            for key, value in {**filled, **load.acknowledged}.items()
            if not await _readable_through(session, gateway, key, value)
        ]
    during = [d for at, d in load.latencies if any(a <= at <= b for a, b in windows)]
    return {
        "transfer": transfer,
        "state_mb": megabytes,
        "swaps": args.swaps,
        "pause_ms_p50": quantile(pauses, 0.5),
        "pause_ms_p99": quantile(pauses, 0.99),
        "pause_ms_max": round(max(pauses), 2) if pauses else None,
        "pauses_ms": pauses,
        "slowest_pause_spent_ms": breakdowns[pauses.index(max(pauses))] if pauses else None,
        "longest_call_ms": round(max(during) * 1000, 2) if during else None,
        "held_state_bytes_max": max(held) if held else None,
        "swap_seconds_p50": quantile(durations, 0.5),
        "swap_seconds_max": round(max(durations), 2) if durations else None,
        "calls": load.calls,
        "failed_calls": len(load.failures),
        "failed_by_kind": dict(why),
        "lost_writes": len(lost),
        "controller_rss_mib_before": round(rss_before / 1024, 1),
        "controller_rss_mib_peak": round(rss_peak / 1024, 1),
        "controller_rss_growth_share_of_state": round(
            max(0, rss_peak - rss_before) / 1024 / megabytes, 4
        )
        if megabytes
        else None,
    }


async def fill(put: Callable[[str, Any], Awaitable[bool]], megabytes: float) -> dict[str, Any]:
    """About ``megabytes`` of state in 64 KiB values, eight calls at a time."""
    keys = int(megabytes * (1 << 20) / VALUE_BYTES)
    filled: dict[str, Any] = {}
    queue = list(range(keys))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            key, value = f"fill-{i:06d}", {"n": i, "pad": "x" * (VALUE_BYTES - 32)}
            if not await put(key, value):
                sys.exit(f"filling the state failed at {key}")
            filled[key] = value

    await asyncio.gather(*(worker() for _ in range(8)))
    return filled


async def _readable_through(
    session: aiohttp.ClientSession, gateway: str, key: str, value: Any
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
    fig, ax = plt.subplots(figsize=(6, 4))
    for transfer in ("PreCopy", "FullCopy"):
        rows = [r for r in results["controller"] if r["transfer"] == transfer]
        sizes = [r["state_mb"] for r in rows]
        ax.plot(sizes, [r["pause_ms_p99"] for r in rows], "o-", label=f"{transfer}: pause p99")
        ax.plot(sizes, [r["pause_ms_p50"] for r in rows], "x--", label=f"{transfer}: pause p50")
    ax.axhline(50, color="grey", linestyle=":", label="50 ms")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_yscale("log")
    ax.set_xlabel("state (MB)")
    ax.set_ylabel("calls held (ms)")
    ax.set_title(f"Swap pause against state size under {results['rate']:.0f} writes/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "hotswap",
        "rate": args.rate,
        "runtime": args.runtime,
        "gateway": args.gateway,
        "controller": [],
    }
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
        for megabytes in args.sizes:
            for transfer in args.transfers:
                root = Path(temp) / f"{transfer}-{megabytes}"
                row = await measure_controller(args, root, transfer, megabytes)
                print(json.dumps(row), file=sys.stderr, flush=True)
                results["controller"].append(row)
        if args.compose:
            results["compose"] = await measure_compose(args, Path(temp) / "compose")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10, help="swaps per strategy and size")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0, 1, 10, 100], help="MB")
    parser.add_argument("--transfers", nargs="+", default=["PreCopy", "FullCopy"])
    parser.add_argument("--rate", type=float, default=200.0, help="writes per second")
    parser.add_argument("--runtime", default="docker", choices=["docker", "podman", "process"])
    parser.add_argument("--gateway", default="process", choices=["process", "in-process"])
    parser.add_argument("--compose", action="store_true", help="also measure docker-compose")
    parser.add_argument("--compose-replacements", type=int, default=3)
    parser.add_argument("--plot", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the plugins' socket directories belong to the plugins' user")
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2), flush=True)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
