"""What the gateway costs a call: through it (HTTP and gRPC) against a direct gRPC call.

A real controller (``bhctl run``, its own process) runs the echo example on
Docker; this process calls the plugin three ways, in interleaved rounds so
that the machine's noise falls on all three alike:

- direct: gRPC ``Handle`` on the instance's Unix socket (the floor);
- http: ``POST /v1/plugins/echo/call/echo`` to the gateway, keep-alive;
- grpc: ``Handle`` to the gateway's gRPC port, the plugin in the metadata.

At concurrency 1 it reports p50 and p99 latency and the gateway's overhead
over direct; at concurrency 32, calls per second and their ratio to direct.
Prints JSON; ``--plot FILE`` draws the latencies. Needs Docker and the
example images (``scripts/engines.sh docker``, ``images/build.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import support
from blackhole_sdk.proto import plugin_pb2

from controller.runtimes import base
from controller.spec import models

IMAGE = "blackhole/example-echo:0.1.0"
PAYLOAD = json.dumps({"user": 42, "items": ["a", "b", "c"], "note": "x" * 64}).encode()
SPEC = f"""\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: echo}}
spec:
  image: {IMAGE}
  version: 0.1.0
  resources: {{cpu: "1", memory: 128Mi}}
  gateway: {{maxConcurrentCalls: 1000}}
"""

Call = Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def controller(root: Path) -> AsyncIterator[tuple[str, str, str]]:
    """``bhctl run`` on Docker with the echo plugin; yields (direct, http, grpc) addresses."""
    options = ("--gateway-grpc-addr", "127.0.0.1:0", "--metrics-addr", "")
    async with support.controller(root, {"echo.yaml": SPEC}, *options) as running:
        await running.until(lambda: running.status("echo"))
        addresses = running.addresses()
        instance = base.instance_name("echo", models.Color.BLUE, None, running.ident)
        direct = f"unix:{running.data / 'instances' / instance / base.SOCKET_NAME}"
        yield direct, addresses["http"], addresses["grpc"]


def grpc_call(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> Call:
    handle = channel.unary_unary(
        "/blackhole.plugin.v1.Plugin/Handle",
        request_serializer=plugin_pb2.HandleRequest.SerializeToString,
        response_deserializer=plugin_pb2.HandleResponse.FromString,
    )
    request = plugin_pb2.HandleRequest(method="echo", payload=PAYLOAD)

    async def call() -> None:
        answer = await handle(request, metadata=metadata or None, timeout=10)
        if not answer.payload:
            raise RuntimeError("empty answer")

    return call


def http_call(session: aiohttp.ClientSession, address: str) -> Call:
    url = f"http://{address}/v1/plugins/echo/call/echo"
    headers = {"Content-Type": "application/json"}

    async def call() -> None:
        async with session.post(url, data=PAYLOAD, headers=headers) as response:
            body = await response.read()
            if response.status != 200 or not body:
                raise RuntimeError(f"{response.status}: {body[:200]!r}")

    return call


async def latencies(call: Call, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return times


async def throughput(call: Call, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
        async with controller(Path(temp)) as (direct, http_address, grpc_address):
            direct_channel = grpc.aio.insecure_channel(direct)
            gateway_channel = grpc.aio.insecure_channel(grpc_address)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                calls = {
                    "direct": grpc_call(direct_channel, ()),
                    "http": http_call(session, http_address),
                    "grpc": grpc_call(gateway_channel, (("x-blackhole-plugin", "echo"),)),
                }
                for call in calls.values():  # warm every path up
                    await latencies(call, 200)
                serial: dict[str, list[float]] = {name: [] for name in calls}
                rate: dict[str, list[float]] = {name: [] for name in calls}
                for _ in range(args.rounds):
                    for name, call in calls.items():
                        serial[name] += await latencies(call, args.calls)
                    for name, call in calls.items():
                        rate[name].append(await throughput(call, 32, args.seconds))
            await direct_channel.close()
            await gateway_channel.close()
    result: dict[str, Any] = {"benchmark": "gateway", "image": IMAGE, "rounds": args.rounds}
    floor = serial["direct"]
    for name in calls:
        times = serial[name]
        entry = {
            "c1_p50_ms": round(quantile(times, 0.5) * 1000, 3),
            "c1_p99_ms": round(quantile(times, 0.99) * 1000, 3),
            "c32_calls_per_second": round(statistics.median(rate[name])),
        }
        if name != "direct":
            entry["c1_overhead_p50_ms"] = round(
                (quantile(times, 0.5) - quantile(floor, 0.5)) * 1000, 3
            )
            entry["c1_overhead_p99_ms"] = round(
                (quantile(times, 0.99) - quantile(floor, 0.99)) * 1000, 3
            )
            entry["c32_ratio_to_direct"] = round(
                statistics.median(rate[name]) / statistics.median(rate["direct"]), 2
            )
        result[name] = entry
    result["samples"] = {name: serial[name] for name in calls} if args.plot else None
    return result


def plot(results: dict[str, Any], path: str) -> None:
    plt = support.pyplot()
    samples = results["samples"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot(
        [[t * 1000 for t in samples[n]] for n in samples],
        tick_labels=list(samples),
        showfliers=False,
    )
    ax.set_ylabel("milliseconds per call (concurrency 1)")
    ax.set_title("A call direct to the plugin, and through the gateway")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500, help="calls per path per round, c=1")
    parser.add_argument("--seconds", type=float, default=2.0, help="per path per round, c=32")
    parser.add_argument("--plot", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the plugin's socket directory belongs to the plugin's user")
    results = asyncio.run(measure(args))
    if args.plot:
        plot(results, args.plot)
    results.pop("samples")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
