"""``bhctl down`` through the real admin API: a controller in a process of its own (the
real manager, reconciler and admin app over a spec directory and the in-memory runtime)
removes every instance it runs, its volumes when asked, and exits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.admin import client as admin_client
from controller.cli import main

CONTROLLER = """
import asyncio, json, sys
from pathlib import Path

from controller.admin import server
from controller.cli import flags, run
from controller.protocol import memory as memory_protocol
from controller.reconcile import manager, queue
from controller.runtimes import memory
from controller.sources.directory import DirectorySource
from controller.sources.store import Store


async def serve(root: Path) -> None:
    stop = asyncio.Event()
    work = queue.WorkQueue()
    source = DirectorySource(root / "specs", Store(root / "state.db"), work.add)
    runtime = memory.MemoryRuntime()
    control = manager.Manager(source, runtime, work, memory_protocol.MemoryPlugins(runtime))
    down = run.Down(stop)
    admin = server.AdminServer(
        source, runtime, root / "admin.sock", control=control, down=down
    )
    options = run.Options(
        specs=root / "specs", runtime=flags.RuntimeChoice.PROCESS, data_dir=root, workers=1,
        resync_seconds=300, host_path_root=None, controller_id="default",
        gateway_address="127.0.0.1:0", gateway_grpc_address=None, gateway_tokens=None,
        gateway_mode=flags.GatewayMode.IN_PROCESS,
    )
    await admin.start()
    try:
        await control.run(stop)
    finally:
        await down.carry_out(control, options)
        await admin.stop()
    left = {"instances": sorted(runtime.instances), "volumes": sorted(runtime.volumes)}
    print(json.dumps(left), flush=True)


asyncio.run(serve(Path(sys.argv[1])))
"""

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: {name}}}
spec:
  image: blackhole/{name}:0.1.0
  version: 0.1.0
{extra}"""


def start(root: Path, names: dict[str, str]) -> subprocess.Popen[str]:
    (root / "specs").mkdir()
    for name, extra in names.items():
        (root / "specs" / f"{name}.yaml").write_text(SPEC.format(name=name, extra=extra))
    process = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(root)], stdout=subprocess.PIPE, text=True
    )
    admin = admin_client.AdminClient(root / "admin.sock", timeout=10)
    deadline = time.monotonic() + 120
    while True:  # until every plugin has its instance running
        assert process.poll() is None, "the controller exited"
        try:
            items = admin.list()["items"]
            if len(items) == len(names) and all(
                (i.get("status") or {}).get("activeColor") for i in items
            ):
                return process
        except admin_client.ControllerNotRunningError:
            pass
        assert time.monotonic() < deadline, "the plugins did not start"
        time.sleep(0.05)


def bhctl(root: Path, *args: str) -> Any:
    return CliRunner().invoke(main.app, [*args, "--data-dir", str(root)], env={"COLUMNS": "200"})


@pytest.fixture
def controller(tmp_path: Path):
    started: list[subprocess.Popen[str]] = []

    def run(names: dict[str, str]) -> subprocess.Popen[str]:
        started.append(start(tmp_path, names))
        return started[-1]

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


VOLUME = "  volumes: [{name: data, mountPath: /data, size: 1Gi}]\n"


def test_down_removes_every_instance_keeps_volumes_and_stops_the_controller(
    controller, tmp_path: Path
) -> None:
    process = controller({"alpha": VOLUME, "beta": ""})
    result = bhctl(tmp_path, "down")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "instance/bh-alpha-blue removed",
        "instance/bh-beta-blue removed",
        "volumes kept (remove them with bhctl down --volumes)",
        f"controller stopped (pid {process.pid})",
    ]
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    left = json.loads(out)
    assert left == {"instances": [], "volumes": ["bh-alpha-data"]}
    assert not (tmp_path / "admin.sock").exists()


def test_down_volumes_removes_the_named_volumes(controller, tmp_path: Path) -> None:
    process = controller({"alpha": VOLUME})
    result = bhctl(tmp_path, "down", "--volumes")
    assert result.exit_code == 0, result.output
    assert "volume/bh-alpha-data removed" in result.stdout.splitlines()
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    left = json.loads(out)
    assert left == {"instances": [], "volumes": []}


def test_down_without_a_controller_says_how_to_reach_one(tmp_path: Path) -> None:
    result = bhctl(tmp_path, "down")
    assert result.exit_code == 1
    assert "no controller answers" in result.stderr
