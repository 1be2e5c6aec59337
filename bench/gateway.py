"""What the gateway costs a call: through it (HTTP and gRPC) against a direct gRPC call.

A real controller (``bhctl run``, its own process) runs the echo example on
Docker; this process calls the plugin three ways, in interleaved rounds so
that the machine's noise falls on all three alike:

- direct: gRPC ``Handle`` on the instance's Unix socket (the floor);
- http: ``POST /v1/plugins/echo/call/echo`` to the gateway, keep-alive (aiohttp's
  client), and ``http_bare_client``: the same on bare connections, without an HTTP
  library's own cost per call;
- grpc: ``Handle`` to the gateway's gRPC port, the plugin in the metadata.

At concurrency 1 it reports p50 and p99 latency and the gateway's overhead
over direct; at concurrency 32, calls per second, their ratio to direct, and the
CPU the gateway's process spent per call (less moved by other load on the
machine than the rates are).

``--dashboard`` runs the controller with its web dashboard and measures each
round twice, interleaved: with no one looking, and with viewers in another
process (``--viewers`` live streams of the plugin's page open, and its page and
the plugin list loaded again every half second); it reports both and the
difference, with how many pages and stream messages the viewers got.
``--baseline DIR`` also runs a controller (and its gateway) from another
checkout, e.g. the last release, and measures its ``baseline_*`` paths in the
same rounds: old and new side by side. ``--tls`` also runs a controller whose
gateway serves HTTPS and gRPC over TLS (a certificate made for the run) and
reports ``https``, ``https_bare_client``, ``grpc_tls`` and what TLS adds
(``tls_minus_plaintext``). Each of these controllers runs its own echo
instance; ``direct`` is the first one's.
``--weighted`` measures instead what a canary's weighted route and its
analysis add to a call (``bench/gateway_weighted.py``).
Prints JSON; ``--plot FILE`` draws the latencies. Needs Docker and the
example images (``scripts/engines.sh docker``, ``images/build.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import subprocess
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

from controller import pki
from controller.cli import gateway as gateway_process
from controller.runtimes import base
from controller.spec import models

IMAGE = "blackhole/example-echo:0.1.0"


def payload(size: int) -> bytes:
    """A JSON call body of about ``size`` bytes (at least the default's ~100)."""
    return json.dumps(
        {"user": 42, "items": ["a", "b", "c"], "note": "x" * max(64, size - 40)}
    ).encode()


SPEC = f"""\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: echo}}
spec:
  image: {IMAGE}
  version: 0.1.0
  resources: {{cpu: "1", memory: 128Mi}}
  gateway: {{maxConcurrentCalls: 1000, maxRequestBytes: 16Mi}}
"""

Call = Callable[[], Awaitable[None]]
PLUGIN_METADATA = (("x-blackhole-plugin", "echo"),)


@contextlib.asynccontextmanager
async def controller(
    root: Path, dashboard: bool, *extra: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, str, str, str | None, int, int]]:
    """``bhctl run`` on Docker with the echo plugin (``extra`` options, ``env`` added to its
    environment); yields the (direct, http, grpc, dashboard) addresses, the controller's pid
    and its gateway process's."""
    options = ["--gateway-grpc-addr", "127.0.0.1:0", "--metrics-addr", "", *extra]
    if dashboard:
        options += ["--dashboard-addr", "127.0.0.1:0"]
    async with support.controller(root, {"echo.yaml": SPEC}, *options, env=env) as running:
        await running.until(lambda: running.status("echo"))
        addresses = running.addresses()
        if dashboard:
            await running.until(lambda: "dashboard" in running.addresses())
            addresses = running.addresses()
        instance = base.instance_name("echo", models.Color.BLUE, None, running.ident)
        direct = f"unix:{running.data / 'instances' / instance / base.SOCKET_NAME}"
        yield (
            direct,
            addresses["http"],
            addresses["grpc"],
            addresses.get("dashboard"),
            running.process.pid,
            gateway_process.running(running.data) or 0,
        )


async def view(address: str, streams: int) -> None:
    """A viewer of the dashboard until SIGTERM: ``streams`` live streams of echo's page,
    and its page and the list loaded every half second; prints what it got, as JSON."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    counts = {"pages": 0, "messages": 0}

    async def stream(session: aiohttp.ClientSession) -> None:
        async with session.get(f"http://{address}/plugins/echo/live") as response:
            async for line in response.content:
                if line.startswith(b"event: sections"):
                    counts["messages"] += 1

    async def pages(session: aiohttp.ClientSession) -> None:
        while True:
            for path in ("/plugins/echo", "/"):
                async with session.get(f"http://{address}{path}") as response:
                    await response.read()
                    counts["pages"] += 1
            await asyncio.sleep(0.5)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.create_task(stream(session)) for _ in range(streams)]
        tasks.append(asyncio.create_task(pages(session)))
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(counts))


@contextlib.contextmanager
def viewers(address: str, streams: int, seen: dict[str, int]) -> Any:
    """The viewer (:func:`view`) in its own process while the block runs; adds its counts
    to ``seen``."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--view", address, "--viewers", str(streams)],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)  # its streams are open before the calls start
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
        for key, value in json.loads(out).items():
            seen[key] = seen.get(key, 0) + value


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` used so far (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grpc_call(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], body: bytes
) -> Call:
    handle = channel.unary_unary(
        "/blackhole.plugin.v1.Plugin/Handle",
        request_serializer=plugin_pb2.HandleRequest.SerializeToString,
        response_deserializer=plugin_pb2.HandleResponse.FromString,
    )
    request = plugin_pb2.HandleRequest(method="echo", payload=body)

    async def call() -> None:
        answer = await handle(request, metadata=metadata or None, timeout=10)
        if not answer.payload:
            raise RuntimeError("empty answer")

    return call


def http_call(
    session: aiohttp.ClientSession,
    address: str,
    body: bytes,
    trusted: ssl.SSLContext | None = None,
) -> Call:
    """``POST`` echo's call to the gateway at ``address``; over HTTPS when ``trusted``."""
    url = f"{'https' if trusted else 'http'}://{address}/v1/plugins/echo/call/echo"
    headers = {"Content-Type": "application/json"}
    secure: dict[str, Any] = {"ssl": trusted} if trusted else {}

    async def call() -> None:
        async with session.post(url, data=body, headers=headers, **secure) as response:
            answer = await response.read()
            if response.status != 200 or not answer:
                raise RuntimeError(f"{response.status}: {answer[:200]!r}")

    return call


def raw_http_call(address: str, body: bytes, trusted: ssl.SSLContext | None = None) -> Call:
    """The same ``POST`` on bare keep-alive connections (asyncio streams, one per caller at
    a time): what the gateway costs without an HTTP client library's own cost on top."""
    host, port = address.rsplit(":", 1)
    request = (
        f"POST /v1/plugins/echo/call/echo HTTP/1.1\r\nHost: {address}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def call() -> None:
        reader, writer = (
            free.pop() if free else await asyncio.open_connection(host, int(port), ssl=trusted)
        )
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        answer = await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200 ") or not answer:
            raise RuntimeError(f"{head[:100]!r}: {answer[:200]!r}")
        free.append((reader, writer))

    return call


async def latencies(call: Call, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return times


async def throughput(call: Call, concurrency: int, seconds: float) -> tuple[float, int]:
    """Calls per second with ``concurrency`` callers for ``seconds``, and how many were made."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start), done


def certificates(directory: Path) -> Path:
    """A CA, and a server certificate for 127.0.0.1 it issued, as files in ``directory``."""
    directory.mkdir(parents=True)
    authority = pki.Authority.create("bench")
    issued = authority.issue(pki.Identity.plugin("bench", None, "gateway"), hosts=["127.0.0.1"])
    (directory / "ca.crt").write_bytes(authority.cert_pem)
    (directory / "tls.crt").write_bytes(issued.cert_pem)
    key = directory / "tls.key"
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    return directory


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    seen: dict[str, int] = {}
    body = payload(args.payload_bytes)
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as temp:
        async with contextlib.AsyncExitStack() as stack:
            this = await stack.enter_async_context(controller(Path(temp) / "this", args.dashboard))
            direct, http_address, grpc_address, dashboard, pid, gateway_pid = this
            direct_channel = grpc.aio.insecure_channel(direct)
            gateway_channel = grpc.aio.insecure_channel(grpc_address)
            channels = [direct_channel, gateway_channel]
            connector = aiohttp.TCPConnector(limit=0)
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            calls = {
                "direct": grpc_call(direct_channel, (), body),
                "http": http_call(session, http_address, body),
                "http_bare_client": raw_http_call(http_address, body),
                "grpc": grpc_call(gateway_channel, PLUGIN_METADATA, body),
            }
            if args.baseline:
                # The same benchmark through another checkout's controller and gateway.
                env = {"PYTHONPATH": str(Path(args.baseline).resolve())}
                _, base_http, base_grpc, _, _, base_gateway = await stack.enter_async_context(
                    controller(Path(temp) / "baseline", False, env=env)
                )
                base_channel = grpc.aio.insecure_channel(base_grpc)
                channels.append(base_channel)
                calls["baseline_http"] = http_call(session, base_http, body)
                calls["baseline_http_bare_client"] = raw_http_call(base_http, body)
                calls["baseline_grpc"] = grpc_call(base_channel, PLUGIN_METADATA, body)
            if args.tls:
                # The same gateway code with TLS on its listeners, beside the plaintext one.
                server_tls = certificates(Path(temp) / "tls")
                _, tls_http, tls_grpc, _, _, tls_gateway = await stack.enter_async_context(
                    controller(
                        Path(temp) / "tls",
                        False,
                        "--gateway-tls-cert", str(server_tls / "tls.crt"),
                        "--gateway-tls-key", str(server_tls / "tls.key"),
                    )
                )  # fmt: skip
                trusted = ssl.create_default_context(cafile=str(server_tls / "ca.crt"))
                tls_channel = grpc.aio.secure_channel(
                    tls_grpc, grpc.ssl_channel_credentials((server_tls / "ca.crt").read_bytes())
                )
                channels.append(tls_channel)
                calls["https"] = http_call(session, tls_http, body, trusted)
                calls["https_bare_client"] = raw_http_call(tls_http, body, trusted)
                calls["grpc_tls"] = grpc_call(tls_channel, PLUGIN_METADATA, body)
            gateways = {name: gateway_pid for name in calls if name != "direct"}
            """The gateway process each path goes through, whose CPU per call is measured."""
            if args.baseline:
                gateways.update({n: base_gateway for n in calls if n.startswith("baseline_")})
            if args.tls:
                gateways.update(
                    {n: tls_gateway for n in ("https", "https_bare_client", "grpc_tls")}
                )
            cpu = {name: [0.0, 0] for name in gateways}
            """Per path at concurrency 32: its gateway's CPU seconds, and the calls made."""
            for call in calls.values():  # warm every path up
                await latencies(call, 200)
            settings = ["idle", "viewed"] if dashboard else ["idle"]
            serial = {(s, n): [] for s in settings for n in calls}  # type: ignore[var-annotated]
            rate = {(s, n): [] for s in settings for n in calls}  # type: ignore[var-annotated]
            spent = {s: [0.0, 0.0] for s in settings}
            """Per setting: seconds measured, and the controller's CPU seconds in them."""
            for _ in range(args.rounds):
                for setting in settings:
                    with (
                        viewers(str(dashboard), args.viewers, seen)
                        if setting == "viewed"
                        else contextlib.nullcontext()
                    ):
                        began = time.perf_counter(), cpu_seconds(pid)
                        for name, call in calls.items():
                            serial[setting, name] += await latencies(call, args.calls)
                        for name, call in calls.items():
                            before = cpu_seconds(gateways[name]) if name in gateways else 0.0
                            per_second, done = await throughput(call, 32, args.seconds)
                            rate[setting, name].append(per_second)
                            if name in gateways and setting == "idle":
                                cpu[name][0] += cpu_seconds(gateways[name]) - before
                                cpu[name][1] += done
                        spent[setting][0] += time.perf_counter() - began[0]
                        spent[setting][1] += cpu_seconds(pid) - began[1]
            for channel in channels:
                await channel.close()
    result: dict[str, Any] = {
        "benchmark": "gateway",
        "image": IMAGE,
        "rounds": args.rounds,
        "payload_bytes": len(body),
    }
    for setting in settings:
        into = result if setting == "idle" else result.setdefault("dashboard_viewed", {})
        into["controller_cpu_cores"] = round(spent[setting][1] / spent[setting][0], 4)
        floor = serial[setting, "direct"]
        for name in calls:
            times = serial[setting, name]
            entry = {
                "c1_p50_ms": round(quantile(times, 0.5) * 1000, 3),
                "c1_p99_ms": round(quantile(times, 0.99) * 1000, 3),
                "c32_calls_per_second": round(statistics.median(rate[setting, name])),
            }
            if name != "direct":
                entry["c1_overhead_p50_ms"] = round(
                    (quantile(times, 0.5) - quantile(floor, 0.5)) * 1000, 3
                )
                entry["c1_overhead_p99_ms"] = round(
                    (quantile(times, 0.99) - quantile(floor, 0.99)) * 1000, 3
                )
                if setting == "idle":
                    entry["c32_gateway_cpu_us_per_call"] = round(cpu[name][0] / cpu[name][1] * 1e6)
                entry["c32_ratio_to_direct"] = round(
                    statistics.median(rate[setting, name])
                    / statistics.median(rate[setting, "direct"]),
                    2,
                )
            into[name] = entry
    if args.tls:
        result["tls_minus_plaintext"] = {
            plain: {
                "c1_p50_ms": round(result[secure]["c1_p50_ms"] - result[plain]["c1_p50_ms"], 3),
                "c1_p99_ms": round(result[secure]["c1_p99_ms"] - result[plain]["c1_p99_ms"], 3),
                "c32_calls_per_second_ratio": round(
                    result[secure]["c32_calls_per_second"] / result[plain]["c32_calls_per_second"],
                    3,
                ),
            }
            for plain, secure in (
                ("http", "https"),
                ("http_bare_client", "https_bare_client"),
                ("grpc", "grpc_tls"),
            )
        }
    if dashboard:
        viewed = result["dashboard_viewed"]
        viewed["viewers"] = {"streams": args.viewers, **seen}
        viewed["difference_viewed_minus_idle"] = {
            name: {
                "c1_p50_ms": round(viewed[name]["c1_p50_ms"] - result[name]["c1_p50_ms"], 3),
                "c1_p99_ms": round(viewed[name]["c1_p99_ms"] - result[name]["c1_p99_ms"], 3),
                "c32_calls_per_second_ratio": round(
                    viewed[name]["c32_calls_per_second"] / result[name]["c32_calls_per_second"], 3
                ),
            }
            for name in calls
        }
    result["samples"] = {name: serial["idle", name] for name in calls} if args.plot else None
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
    parser.add_argument(
        "--payload-bytes", type=int, default=0, help="the size of each call's body (default ~100)"
    )
    parser.add_argument("--plot", metavar="FILE")
    parser.add_argument(
        "--dashboard", action="store_true", help="also measure with the dashboard viewed"
    )
    parser.add_argument("--viewers", type=int, default=4, help="live streams open, --dashboard")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure, interleaved, a controller and gateway run from the checkout DIR",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also measure, interleaved, a gateway serving HTTPS and gRPC over TLS",
    )
    parser.add_argument("--view", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument(
        "--weighted",
        action="store_true",
        help="instead: a canary's weighted route and analysis against a plain route "
        "(bench/gateway_weighted.py)",
    )
    args = parser.parse_args()
    if args.view:
        asyncio.run(view(args.view, args.viewers))
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the plugin's socket directory belongs to the plugin's user")
    if args.weighted:
        import gateway_weighted

        print(json.dumps(gateway_weighted.run(args.rounds, args.calls), indent=2))
        return
    results = asyncio.run(measure(args))
    if args.plot:
        plot(results, args.plot)
    results.pop("samples")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
