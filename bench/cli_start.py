"""How long ``bhctl get`` and ``bhctl --help`` take to answer, for one or more checkouts.

A real admin API (the controller's aiohttp app, over a spec directory with
two plugins on the in-memory runtime) is served on a Unix socket in a
temporary data directory; each checkout's ``bhctl`` is run as a fresh
process (``python -c`` of its ``controller.cli.main``, the checkout first on
``PYTHONPATH``), the commands interleaved run by run so that the machine's
load falls on every checkout alike. Prints the median and the spread of the
wall time in seconds, as JSON.

    .venv/bin/python bench/cli_start.py [--runs 20] [--checkout NAME=DIR ...]

Without ``--checkout`` it measures this checkout. To compare with another
revision: ``git archive REV | tar -x -C /tmp/before`` and pass
``--checkout before=/tmp/before --checkout after=.``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from controller.admin import server
from controller.runtimes import memory
from controller.sources.directory import DirectorySource
from controller.sources.store import Store

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: {name}}}
spec:
  image: blackhole/{name}:0.1.0
  version: 0.1.0
"""

COMMANDS = {"get": ["get"], "help": ["--help"]}
LAUNCH = "import sys; sys.argv[0] = 'bhctl'; from controller.cli.main import main; main()"


def serve(data: Path, ready: threading.Event, stop: threading.Event) -> None:
    """The admin API over a spec directory of two plugins, until ``stop`` is set."""

    async def main() -> None:
        specs = data / "specs"
        specs.mkdir()
        for name in ("echo", "kv"):
            (specs / f"{name}.yaml").write_text(SPEC.format(name=name))
        source = DirectorySource(specs, Store(data / "state.db"), lambda key: None)
        source.rescan()
        api = server.AdminServer(source, memory.MemoryRuntime(), data / "admin.sock")
        await api.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await api.stop()

    asyncio.run(main())


def once(checkout: Path, args: list[str], data: Path) -> float:
    env = os.environ | {"PYTHONPATH": str(checkout), "BLACKHOLE_DATA_DIR": str(data)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], env=env, capture_output=True, check=False
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bhctl {' '.join(args)} in {checkout} failed: {done.stderr.decode()[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--checkout", action="append", default=[], help="NAME=DIR (repeat); default this one"
    )
    options = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    checkouts = {
        name: Path(path).resolve()
        for name, _, path in (c.partition("=") for c in options.checkout or [f"this={here}"])
    }
    with tempfile.TemporaryDirectory(prefix="bh-cli-") as scratch:
        data = Path(scratch)
        ready, stop = threading.Event(), threading.Event()
        thread = threading.Thread(target=serve, args=(data, ready, stop), daemon=True)
        thread.start()
        if not ready.wait(60):
            sys.exit("the admin API did not start")
        times: dict[str, dict[str, list[float]]] = {n: {c: [] for c in COMMANDS} for n in checkouts}
        try:
            for _ in range(options.runs):
                for name, checkout in checkouts.items():
                    for command, args in COMMANDS.items():
                        times[name][command].append(once(checkout, args, data))
        finally:
            stop.set()
            thread.join(10)
    result = {
        name: {
            command: {
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
            }
            for command, values in commands.items()
        }
        for name, commands in times.items()
    }
    print(json.dumps({"runs": options.runs, "seconds": result}, indent=2))


if __name__ == "__main__":
    main()
