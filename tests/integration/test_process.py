"""The process runtime through a real controller: isolation, OOM kills, no network, adoption.

``bhctl run --runtime process`` runs the test plugin (``tests/integration/plugin``)
as plain processes; what the tests check is seen from the host (``/proc``, the
cgroup files) and from inside the plugin (its ``connect`` method).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blackhole_sdk
import google.protobuf
import grpc
import grpc_health
import pytest
import typing_extensions

from controller import cgroups
from controller.runtimes import base, process
from controller.runtimes.process import cgroups as process_cgroups
from controller.spec import models

from . import tamper
from .conftest import PLUGIN_DIR, ControllerProcess, wait_for

BODY = """\
  process: {{path: {path}}}
  resources: {{memory: {memory}, cpu: 500m, pids: 64}}
  restart: {{backoffSeconds: 0.2}}
"""


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    """A controller on processes whose plugin root holds the test plugin."""
    running = ControllerProcess(
        None, tmp_path, extra_args=["--plugin-root", str(PLUGIN_DIR.parent)]
    )
    try:
        yield running
    finally:
        running.end()
        asyncio.run(_remove_all(running))


async def _remove_all(controller: ControllerProcess) -> None:
    runtime = process.ProcessRuntime(
        process.Settings(data_dir=controller.data, controller_id=controller.controller_id)
    )
    for instance in await runtime.list_owned():
        await runtime.remove(instance.name)


def write(controller: ControllerProcess, name: str, memory: str = "64Mi", env: str = "") -> None:
    body = BODY.format(path=PLUGIN_DIR.name, memory=memory) + env
    controller.write(name, body)


def state(controller: ControllerProcess, name: str) -> dict[str, Any]:
    """The instance's state file: its pid among others."""
    instance = base.instance_name(name, models.Color.BLUE, None, controller.controller_id)
    return dict(json.loads((controller.data / "processes" / f"{instance}.json").read_text()))


def instance(controller: ControllerProcess, name: str) -> dict[str, Any]:
    [record] = controller.status(name).get("instances") or [{}]
    return dict(record)


def test_a_plugin_runs_isolated(controller: ControllerProcess):
    controller.start()
    write(controller, "alpha")
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    status, answer, _ = controller.call("alpha", "echo", {"x": 1})
    assert (status, answer) == (200, {"x": 1})
    pid = state(controller, "alpha")["pid"]
    proc = {
        key: value.split()
        for key, _, value in (
            line.partition(":") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    }
    assert proc["Uid"] == ["65532"] * 4
    assert proc["Gid"] == ["65532"] * 4
    assert proc["CapEff"] == proc["CapPrm"] == proc["CapBnd"] == ["0000000000000000"]
    assert proc["NoNewPrivs"] == ["1"]
    assert proc["NSpid"][-1] == "1", "the plugin is PID 1 of a PID namespace of its own"
    for namespace in ("mnt", "net", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(
            f"/proc/self/ns/{namespace}"
        ), namespace
    mounts = {
        fields[4]: fields[5].split(",")
        for fields in (
            line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        )
    }
    assert "ro" in mounts["/"]
    assert "ro" in mounts["/usr"]
    assert "rw" in mounts["/tmp"]
    assert "rw" in mounts["/run/blackhole"]
    assert not any(path.startswith(str(controller.data)) for path in mounts), "data is hidden"
    paths = {
        line.split(":", 2)[1]: line.split(":", 2)[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    }
    if cgroups.is_unified():
        group = Path("/sys/fs/cgroup") / paths[""].lstrip("/")
        assert (group / "memory.max").read_text().strip() == str(64 << 20)
        assert (group / "cpu.max").read_text().split() == ["50000", "100000"]
        assert (group / "pids.max").read_text().strip() == "64"
    else:
        memory = Path("/sys/fs/cgroup/memory") / paths["memory"].lstrip("/")
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        cpu = Path("/sys/fs/cgroup/cpu") / paths["cpu"].lstrip("/")
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        pids = Path("/sys/fs/cgroup/pids") / paths["pids"].lstrip("/")
        assert (pids / "pids.max").read_text().strip() == "64"
    assert paths.get("memory", paths[""]).endswith(
        base.instance_name("alpha", models.Color.BLUE, None, controller.controller_id)
    )


def test_a_plugin_past_its_memory_limit_is_killed_and_restarted_alone(
    controller: ControllerProcess,
):
    controller.start()
    write(controller, "hog", memory="64Mi")
    write(controller, "calm", memory="64Mi")
    wait_for(lambda: controller.ready("hog", "calm"), what="both Ready")
    calm_pid = state(controller, "calm")["pid"]
    hog_pid = state(controller, "hog")["pid"]
    status, _, _ = controller.call("hog", "allocate", {"mib": 200})
    assert status == 502, "the instance died during the call"
    wait_for(
        lambda: instance(controller, "hog").get("restarts") == 1 and controller.ready("hog"),
        what="hog restarted and Ready",
    )
    record = instance(controller, "hog")
    assert record["lastExitCode"] == 137
    assert record["oomKilled"] is True
    assert state(controller, "hog")["pid"] != hog_pid
    assert controller.call("hog", "echo", {"again": True})[:2] == (200, {"again": True})
    assert state(controller, "calm")["pid"] == calm_pid, "the other plugin was not touched"
    assert instance(controller, "calm").get("restarts", 0) == 0
    assert controller.call("calm", "echo", {"still": "here"})[:2] == (200, {"still": "here"})
    assert controller.process is not None
    assert controller.process.poll() is None


def test_with_network_none_only_its_own_socket_can_be_reached(controller: ControllerProcess):
    controller.start()
    write(controller, "closed")
    write(controller, "other")
    wait_for(lambda: controller.ready("closed", "other"), what="both Ready")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the host itself reaches it

        def connect(target: dict[str, Any]) -> str:
            status, answer, _ = controller.call("closed", "connect", target)
            assert status == 200, answer
            return str(answer["result"])

        assert connect({"host": "127.0.0.1", "port": port}).startswith("refused")
        assert connect({"host": "1.1.1.1", "port": 53}).startswith("refused")
        assert connect({"host": "1.1.1.1", "port": 443}).startswith("refused")
    other = controller.data / "instances"
    other /= base.instance_name("other", models.Color.BLUE, None, controller.controller_id)
    assert (other / "plugin.sock").exists()
    assert connect({"path": str(other / "plugin.sock")}).startswith("refused")
    assert connect({"path": "/run/blackhole/plugin.sock"}) == "connected"


@pytest.fixture
def root_in_tmp(tmp_path: Path) -> Iterator[Path]:
    """A plugin root under /tmp holding a copy of the test plugin (its private /tmp covers it)."""
    root = Path(tempfile.mkdtemp(prefix="bh-root-", dir="/tmp"))
    try:
        shutil.copytree(PLUGIN_DIR, root / "plugin")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _virtualenv(directory: Path) -> None:
    """A virtual environment with the SDK and what it imports, copied in (no index needed)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True, timeout=60
    )
    [site] = directory.glob("lib/python*/site-packages")
    for module in (blackhole_sdk, grpc, grpc_health, google.protobuf):
        source = Path(module.__file__ or "").parent
        target = site / source.relative_to(source.parents[module.__name__.count(".")])
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(typing_extensions.__file__ or "", site)


@pytest.mark.parametrize("virtualenv", [False, True], ids=["warm", "virtualenv"])
def test_a_plugin_root_and_virtualenv_under_tmp_work(
    tmp_path: Path, root_in_tmp: Path, virtualenv: bool
):
    if virtualenv:
        _virtualenv(root_in_tmp / "plugin" / "venv")
    running = ControllerProcess(None, tmp_path, extra_args=["--plugin-root", str(root_in_tmp)])
    try:
        running.start()
        body = BODY.format(path="plugin", memory="64Mi")
        if virtualenv:
            body = body.replace("{path: plugin}", "{path: plugin, virtualenv: venv}")
        running.write("intmp", body)
        wait_for(lambda: running.ready("intmp"), what=f"intmp Ready (log: {running.log})")
        assert running.call("intmp", "echo", {"x": 1})[:2] == (200, {"x": 1})
        status, answer, _ = running.call("intmp", "run", {"argv": ["ls", "/tmp"]})
        assert status == 200, answer
        assert root_in_tmp.name in answer["output"].split(), "its code is bound into its /tmp"
    finally:
        running.end()
        asyncio.run(_remove_all(running))


def test_a_plugin_cannot_enter_a_user_namespace(controller: ControllerProcess):
    controller.start()
    write(controller, "boxed")
    wait_for(lambda: controller.ready("boxed"), what="boxed Ready")

    def run(*argv: str) -> dict[str, Any]:
        status, answer, _ = controller.call("boxed", "run", {"argv": list(argv)})
        assert status == 200, answer
        return dict(answer)

    assert run("true")["code"] == 0, "commands run"
    refused = run("unshare", "-U", "-r", "true")
    assert refused["code"] != 0, "no user namespace with every capability inside it"
    assert "Operation not permitted" in refused["output"]


def test_a_plugin_linking_its_socket_to_another_plugins_is_refused(controller: ControllerProcess):
    tamper.check_a_linked_socket_is_refused(
        controller, lambda name, env: write(controller, name, env=f"  env: {env}\n" if env else "")
    )


def test_a_restarted_controller_adopts_running_processes(controller: ControllerProcess):
    controller.start()
    write(controller, "kept")
    wait_for(lambda: controller.ready("kept"), what="kept Ready")
    controller.call("kept", "put", {"key": "a", "value": 1})
    before = state(controller, "kept")
    controller.kill()
    controller.start()

    def answered() -> Any:
        got = controller.call("kept", "get", {"key": "a"})
        return got[1] if got[0] == 200 else None

    answer = wait_for(answered, what="kept to answer through the new controller's gateway")
    assert answer == {"value": 1}, "the same process, with what it held"
    assert state(controller, "kept") == before, "the same process, not a new one"
    assert instance(controller, "kept").get("restarts", 0) == 0


def test_a_plugin_starts_boosted_is_shown_so_and_has_its_specs_cpu_once_ready(
    controller: ControllerProcess,
):
    controller.start()
    write(controller, "alpha")
    body = BODY.format(path=PLUGIN_DIR.name, memory="64Mi")
    controller.write("beta", body.replace("pids: 64}", "pids: 64, startCpu: '0'}"))
    wait_for(lambda: controller.ready("alpha", "beta"), what="alpha and beta Ready")
    assert instance(controller, "alpha")["startCpu"] == "2", "the controller's default"
    assert "startCpu" not in instance(controller, "beta"), "turned off in its spec"
    address = controller.gateway("metrics")
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    limits = {
        line.split('plugin="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("blackhole_container_spec_cpu_limit_cores{")
    }
    assert limits == {"alpha": 0.5, "beta": 0.5}


# The launcher's spare: a plugin process moved into cgroups of its own before any start.

V1_ONLY = pytest.mark.skipif(
    cgroups.is_unified(), reason="spares are cgroup v1's (v2 cannot rename a cgroup)"
)
V1_ROOT = Path("/sys/fs/cgroup")


def spare_dirs(controller: ControllerProcess) -> list[Path]:
    """The spare groups of the controller's launcher, in every hierarchy."""
    parent = Path("blackhole") / controller.controller_id
    return sorted(
        directory
        for hierarchy in process_cgroups.V1_CONTROLLERS
        for directory in (V1_ROOT / hierarchy / parent).glob(f"{process_cgroups.SPARE}*")
    )


def parked(controller: ControllerProcess) -> int | None:
    """The pid of the spare, once it is alone in one spare group in each hierarchy."""
    dirs = spare_dirs(controller)
    if len(dirs) != len(process_cgroups.V1_CONTROLLERS) or len({d.name for d in dirs}) != 1:
        return None
    pids = set()
    for directory in dirs:
        with contextlib.suppress(OSError):
            pids.update((directory / "cgroup.procs").read_text().split())
    return int(pids.pop()) if len(pids) == 1 else None


def assert_in_its_cgroups_with_its_limits(controller: ControllerProcess, pid: int) -> None:
    name = base.instance_name("alpha", models.Color.BLUE, None, controller.controller_id)
    paths = {
        line.split(":", 2)[1]: line.split(":", 2)[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    }
    for hierarchy in process_cgroups.V1_CONTROLLERS:
        assert paths[hierarchy] == f"/blackhole/{controller.controller_id}/{name}", hierarchy
    group = f"blackhole/{controller.controller_id}/{name}"
    assert (V1_ROOT / "memory" / group / "memory.limit_in_bytes").read_text().strip() == str(
        64 << 20
    )
    assert (V1_ROOT / "cpu" / group / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (V1_ROOT / "pids" / group / "pids.max").read_text().strip() == "64"


def owned(controller: ControllerProcess) -> list[base.Instance]:
    runtime = process.ProcessRuntime(
        process.Settings(data_dir=controller.data, controller_id=controller.controller_id)
    )
    return asyncio.run(runtime.list_owned())


@V1_ONLY
def test_a_plugin_starts_as_the_spare_already_in_cgroups_and_gets_its_own_with_its_limits(
    controller: ControllerProcess,
):
    controller.start()
    spare = wait_for(lambda: parked(controller), what=lambda: f"a spare: {spare_dirs(controller)}")
    status = Path(f"/proc/{spare}/status").read_text()
    assert "Seccomp:\t0" in status, "a spare is not isolated yet: it runs nothing of a plugin"
    write(controller, "alpha")
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    pid = state(controller, "alpha")["pid"]
    assert pid == spare, "the spare became the plugin: it was in cgroups before the start"
    assert_in_its_cgroups_with_its_limits(controller, pid)
    assert "Seccomp:\t2" in Path(f"/proc/{pid}/status").read_text(), "filtered now"
    following = wait_for(
        lambda: (found := parked(controller)) != spare and found, what="the next spare"
    )
    assert following != pid
    assert [i.name for i in owned(controller)] == [
        base.instance_name("alpha", models.Color.BLUE, None, controller.controller_id)
    ], "a spare is no instance"
    assert len(controller.status("alpha").get("instances") or []) == 1


@V1_ONLY
def test_a_crashed_plugin_is_restarted_from_the_next_spare_in_its_cgroups(
    controller: ControllerProcess,
):
    controller.start()
    write(controller, "alpha")
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    crashed = state(controller, "alpha")["pid"]
    spare = wait_for(
        lambda: (found := parked(controller)) != crashed and found, what="the next spare"
    )
    os.kill(crashed, signal.SIGKILL)
    wait_for(
        lambda: instance(controller, "alpha").get("restarts") == 1 and controller.ready("alpha"),
        what="alpha restarted and Ready",
    )
    pid = state(controller, "alpha")["pid"]
    assert pid == spare
    assert_in_its_cgroups_with_its_limits(controller, pid)
    assert controller.call("alpha", "echo", {"again": True})[:2] == (200, {"again": True})


@V1_ONLY
def test_the_spare_is_removed_at_stop_and_an_orphaned_one_at_start(
    controller: ControllerProcess,
):
    controller.start()
    spare = wait_for(lambda: parked(controller), what=lambda: f"a spare: {spare_dirs(controller)}")
    controller.terminate()
    parents = [
        V1_ROOT / hierarchy / "blackhole" / controller.controller_id
        for hierarchy in process_cgroups.V1_CONTROLLERS
    ]
    wait_for(
        lambda: not any(p.exists() for p in parents) and not Path(f"/proc/{spare}").exists(),
        what=lambda: f"the spare and its parent groups gone: {spare_dirs(controller)}",
    )
    # What a launcher killed with its waiting copy leaves: a spare group, a process in it.
    orphan = [
        V1_ROOT / hierarchy / "blackhole" / controller.controller_id / f"{process_cgroups.SPARE}1"
        for hierarchy in process_cgroups.V1_CONTROLLERS
    ]
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        for directory in orphan:
            directory.mkdir(parents=True)
            (directory / "cgroup.procs").write_text(str(sleeper.pid))
        controller.start()
        wait_for(
            lambda: sleeper.poll() is not None and not any(d.exists() for d in orphan),
            what=lambda: f"the orphan removed: {spare_dirs(controller)}",
        )
        fresh = wait_for(lambda: parked(controller), what="a new spare")
        assert fresh not in (spare, sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
        for directory in orphan:
            with contextlib.suppress(OSError):
                directory.rmdir()
