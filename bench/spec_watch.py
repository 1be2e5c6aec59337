"""What an idle spec-directory watch costs, and how soon it sees an edit.

Runs the directory source's watch (inotify read by the event loop) on a
directory with one spec for ``--seconds``, and prints the process CPU
time it used per second idle and the time from a file write to its
enqueue, as JSON. With ``--vs-polling`` (needs the ``watchfiles`` package)
it also runs a watchfiles watch polling every 20 ms, the way the source
watched before, side by side.

    python bench/spec_watch.py --seconds 10 --edits 20 [--vs-polling]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from controller.sources.directory import DirectorySource
from controller.sources.store import Store

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: echo}}
spec: {{image: blackhole/example-echo:0.1.0, version: 0.1.{n}, resources: {{memory: 64Mi}}}}
"""


async def _inotify(directory: Path, seconds: float, edits: int) -> dict[str, float]:
    seen = asyncio.Event()
    source = DirectorySource(
        directory, Store(directory.parent / "data" / "state.db"), lambda key: seen.set(),
        resync_seconds=3600,
    )  # fmt: skip
    stop = asyncio.Event()
    runner = asyncio.create_task(source.run(stop))
    await asyncio.wait_for(seen.wait(), 10)
    return await _measure(directory, seconds, edits, seen, stop, runner)


async def _polling(directory: Path, seconds: float, edits: int) -> dict[str, float]:
    # Only for the side-by-side run, and not a dependency: found at run time.
    watchfiles = importlib.import_module("watchfiles")

    seen = asyncio.Event()
    stop = asyncio.Event()

    async def watch() -> None:
        async for _ in watchfiles.awatch(
            directory, stop_event=stop, recursive=False, debounce=50, step=20
        ):
            seen.set()

    runner = asyncio.create_task(watch())
    await asyncio.sleep(0.5)
    return await _measure(directory, seconds, edits, seen, stop, runner)


async def _measure(
    directory: Path,
    seconds: float,
    edits: int,
    seen: asyncio.Event,
    stop: asyncio.Event,
    runner: asyncio.Task[None],
) -> dict[str, float]:
    await asyncio.sleep(0.5)
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    idle = (time.process_time() - cpu) / (time.monotonic() - wall)
    delays = []
    for n in range(edits):
        seen.clear()
        started = time.monotonic()
        (directory / "echo.yaml").write_text(SPEC.format(n=n + 1))
        await asyncio.wait_for(seen.wait(), 10)
        delays.append((time.monotonic() - started) * 1000)
        await asyncio.sleep(0.2)
    stop.set()
    await runner
    return {
        "idle_cpu_ms_per_s": round(idle * 1000, 3),
        "edit_seen_ms_p50": round(statistics.median(delays), 1) if delays else 0.0,
        "edit_seen_ms_max": round(max(delays), 1) if delays else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--vs-polling", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    kinds = {"inotify": _inotify, **({"polling_20ms": _polling} if args.vs_polling else {})}
    for name, run in kinds.items():
        with tempfile.TemporaryDirectory() as tmp:
            specs = Path(tmp) / "specs"
            specs.mkdir()
            (specs / "echo.yaml").write_text(SPEC.format(n=0))
            results[name] = asyncio.run(run(specs, args.seconds, args.edits))
    if "polling_20ms" in results:
        old, new = results["polling_20ms"], results["inotify"]
        results["ratio_idle_cpu"] = {
            "inotify_over_polling": round(
                new["idle_cpu_ms_per_s"] / max(old["idle_cpu_ms_per_s"], 1e-6), 3
            )
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
