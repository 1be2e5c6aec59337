"""``bench/gateway.py --weighted``: what a canary's weighted routing and its analysis cost a
call, against a plain route, in one run.

A real controller on Docker runs the echo example twice: ``echo`` with a plain route, and
``echo-canary`` in a canary swap held at weight 50 while a builtin analysis measures the
new color every second (the controller asks the gateway process for its counts over the
control socket). This process calls both through the gateway's HTTP port at concurrency
1, in interleaved rounds (each mode first in turn) so that the machine's noise falls on
all alike, and calls the canary also with a sticky header (a hash of its value picks the
color). It reports the p50 and p99 of each, the difference of the p50s (pooled, and the
median of each round's), and, in this process, what the
router's own choice costs (``admit`` with a plain route, by weight, by header, and one
call's count).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import support

from controller.gateway import counts, router
from controller.spec import models

IMAGE = "blackhole/example-echo:0.1.0"
PAYLOAD = json.dumps({"user": 42, "items": ["a", "b", "c"], "note": "x" * 64}).encode()
SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: {name}}}
spec:
  image: {image}
  version: 0.1.0
  resources: {{cpu: "1", memory: 128Mi}}
  gateway: {{maxConcurrentCalls: 1000}}
  env: {{ROUND: "{round}"}}
  hotSwap:
    strategy: Canary
    analysis:
      - {{name: success, builtin: SuccessRate, min: 0.9, intervalSeconds: 1, count: 1000}}
    canary:
      steps:
        - setWeight: 50
        - analysis: {{metrics: [success]}}
"""


def spec(name: str, round: int) -> str:
    return SPEC.format(name=name, image=IMAGE, round=round)


async def _latencies(
    session: aiohttp.ClientSession, url: str, n: int, sticky: bool = False
) -> list[float]:
    times = []
    for _ in range(n):
        headers = {"Content-Type": "application/json"}
        if sticky:
            headers["X-User"] = uuid.uuid4().hex
        start = time.perf_counter()
        async with session.post(url, data=PAYLOAD, headers=headers) as response:
            body = await response.read()
            if response.status != 200 or not body:
                raise RuntimeError(f"{response.status}: {body[:200]!r}")
        times.append(time.perf_counter() - start)
    return times


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 4)


async def in_process(calls: int = 100_000) -> dict[str, float]:
    """Microseconds per call of the router's admit: plain, weighted, sticky; and one count."""
    declared = router.Declared.of(
        models.PluginSpec.model_validate({"image": IMAGE, "version": "0.1.0"})
    )
    limits = declared.gateway
    headers = {"x-user": "caller-42"}
    gates = {}
    for mode in ("plain", "weighted", "sticky"):
        routes = router.Router()
        routes.route_to("echo", "unix:/blue", "blue", declared)
        if mode != "plain":
            routes.set_canary("echo", "unix:/green", 50, "X-User" if mode == "sticky" else None)
        gates[mode] = routes
    best = dict.fromkeys(gates, float("inf"))
    for _ in range(7):  # interleaved: the machine's noise falls on every mode alike
        for mode, routes in gates.items():
            start = time.perf_counter()
            for _ in range(calls):
                async with routes.admit("echo", limits, 1.0, headers=headers):
                    pass
            best[mode] = min(best[mode], (time.perf_counter() - start) / calls)
    results = {f"admit_{mode}_us": round(b * 1e6, 3) for mode, b in best.items()}
    stats = counts.Stats()
    start = time.perf_counter()
    for _ in range(calls):
        stats.record(False, 0.0012)
    results["count_one_call_us"] = round((time.perf_counter() - start) / calls * 1e6, 3)
    return results


async def measure(rounds: int, calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bh-bench-w-") as name:
        specs = {"echo.yaml": spec("echo", 0), "echo-canary.yaml": spec("echo-canary", 0)}
        async with support.controller(Path(name), specs, "--metrics-addr", "") as running:
            await running.until(lambda: running.status("echo") and running.status("echo-canary"))
            (running.specs / "echo-canary.yaml").write_text(spec("echo-canary", 1))

            def canary_analyzing() -> bool:
                swap = running.status("echo-canary").get("swap") or {}
                return swap.get("weight") == 50 and swap.get("analysis") is not None

            await running.until(canary_analyzing)
            http = running.addresses()["http"]
            plain_url = f"http://{http}/v1/plugins/echo/call/echo"
            canary_url = f"http://{http}/v1/plugins/echo-canary/call/echo"
            samples: dict[str, list[float]] = {"plain": [], "weighted": [], "sticky": []}
            deltas: dict[str, list[float]] = {"weighted": [], "sticky": []}
            paths = {"plain": (plain_url, False), "weighted": (canary_url, False)}
            paths["sticky"] = (canary_url, True)
            modes = list(paths)
            async with aiohttp.ClientSession() as session:
                await _latencies(session, plain_url, 100)  # warm both paths
                await _latencies(session, canary_url, 100)
                for n in range(rounds):
                    p50: dict[str, float] = {}
                    for mode in modes[n % 3 :] + modes[: n % 3]:  # each goes first
                        url, sticky = paths[mode]
                        times = await _latencies(session, url, calls, sticky)
                        samples[mode] += times
                        p50[mode] = _ms(times, 0.5)
                    for mode in deltas:
                        deltas[mode].append(p50[mode] - p50["plain"])
            swap = running.status("echo-canary").get("swap") or {}
            analysis = swap.get("analysis") or {}
    p50 = {mode: _ms(values, 0.5) for mode, values in samples.items()}
    return {
        "calls_per_mode": len(samples["plain"]),
        "p50_ms": p50,
        "p99_ms": {mode: _ms(values, 0.99) for mode, values in samples.items()},
        "mean_ms": {m: round(statistics.fmean(v) * 1000, 4) for m, v in samples.items()},
        "weighted_minus_plain_p50_ms": round(p50["weighted"] - p50["plain"], 4),
        "sticky_minus_plain_p50_ms": round(p50["sticky"] - p50["plain"], 4),
        "per_round_p50_difference_ms": {
            mode: {
                "median": round(statistics.median(values), 4),
                "min": round(min(values), 4),
                "max": round(max(values), 4),
            }
            for mode, values in deltas.items()
        },
        "analysis_during_the_run": [
            {k: m.get(k) for k in ("name", "phase", "measured", "failures", "value")}
            for m in analysis.get("measurements", [])
        ],
        "in_process": await in_process(),
    }


def run(rounds: int, calls: int) -> dict[str, Any]:
    return asyncio.run(measure(rounds, calls))
