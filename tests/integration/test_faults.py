"""The controller survives its own faults, on a real engine.

A data directory on a small tmpfs that fills up or is remounted read-only:
calls keep flowing through the gateway, the controller keeps running and
says so (condition, event, metric), and spec edits are taken in once the
disk works again. A damaged snapshot database is moved aside once, with one
event, and nothing is created and removed in a loop. A paused container
fails its health checks and is restarted (Docker and Podman).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import pytest

from controller.admin import client as admin_client
from controller.runtimes import base, container
from controller.spec import models

from .conftest import (
    BHCTL,
    ControllerProcess,
    EngineUnderTest,
    _remove,
    bhctl,
    get_engine,
    wait_for,
)
from .test_hotswap import Load

BODY = """\
  health: {{periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 2}}
  gateway: {{maxConcurrentCalls: 1000}}
  config: {{edit: {edit}}}
"""


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at ``path`` (private, as a data directory must be)."""
    path.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(directory: Path) -> Path:
    """Write a file until the disk is full; the file, to remove to free it."""
    path = directory / "filler"
    with path.open("wb") as handle, pytest.raises(OSError, match="space") as full:  # noqa: PT012
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    assert full.value.errno == errno.ENOSPC
    return path


@pytest.fixture
def docker_controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    engine = get_engine(container.Engine.DOCKER)
    root = tmp_path / "root"
    root.mkdir()
    with small_disk(root / "data"):
        process = ControllerProcess(engine, root)
        try:
            yield process
        finally:
            process.end()
            _remove(engine.client, f"{base.LABEL_CONTROLLER}={process.controller_id}")


def store_condition(controller: ControllerProcess, name: str) -> dict[str, Any]:
    return controller.condition(name, "StoreUnavailable")


def metric(controller: ControllerProcess, name: str) -> float:
    address = controller.gateway("metrics")
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def generation(controller: ControllerProcess, name: str) -> int:
    return int(controller.plugins()[name]["metadata"].get("generation") or 0)


def edit(controller: ControllerProcess, value: int) -> None:
    controller.write("kv", BODY.format(edit=value))


def alive(controller: ControllerProcess) -> bool:
    assert controller.process is not None
    return controller.process.poll() is None


def taken_in(controller: ControllerProcess, value: int) -> bool:
    kv = controller.plugins().get("kv")
    return (
        kv is not None
        and kv["spec"].get("config") == {"edit": value}
        and controller.ready("kv")
        and not store_condition(controller, "kv")
    )


def test_a_full_disk_leaves_calls_flowing_and_shows_a_condition(docker_controller):
    controller = docker_controller
    edit(controller, 1)
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    with Load.running(controller) as load:
        filler = fill_up(controller.data)
        big = "x" * 300_000  # more than the disk has left, whatever the journal holds
        with pytest.raises(admin_client.AdminError) as refused:
            controller.admin.apply(
                f"apiVersion: blackhole.dev/v1alpha1\nkind: Plugin\nmetadata: {{name: big}}\n"
                f"spec: {{image: x/y:1, version: 1.0.0, config: {{pad: {big}}}}}\n",
                "big.yaml",
            )
        assert refused.value.status == 503, "an apply the store cannot keep is refused, said so"
        edit(controller, 2)  # a new generation to record: it waits for the disk
        condition = wait_for(lambda: store_condition(controller, "kv"), what="StoreUnavailable")
        assert condition["reason"] == "DiskFull"
        assert "state.db" in condition["message"]
        assert metric(controller, "blackhole_store_errors_total") >= 1
        events = [e["reason"] for e in controller.admin.get("kv")["events"]]
        assert "StoreUnavailable" in events
        assert controller.plugins()["kv"]["spec"]["config"] == {"edit": 1}, "the edit waits"
        wait_for(lambda: len(load.written) > 200, what="calls through the full disk")
        assert alive(controller)
        filler.unlink()
        wait_for(lambda: taken_in(controller, 2), timeout=60, what="the edit, once there is room")
        events = [e["reason"] for e in controller.admin.get("kv")["events"]]
        assert "StoreRecovered" in events
    assert load.failures == [], "no call failed while the disk was full"
    assert alive(controller)


@contextlib.contextmanager
def ext4_disk(path: Path) -> Iterator[Path]:
    """A 32 MiB ext4 file system at ``path`` that turns read-only on its first error (as a
    disk that fails does); the data directory inside it."""
    image = path.with_suffix(".img")
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(path)], check=True)
    try:
        data = path / "blackhole"
        data.mkdir(mode=0o700)
        yield data
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def turn_read_only(path: Path) -> None:
    """An error of the file system, as the kernel sees one: it remounts itself read-only."""
    device = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("test\n")


def test_a_read_only_disk_leaves_calls_flowing_and_shows_a_condition(tmp_path):
    engine = get_engine(container.Engine.DOCKER)
    with ext4_disk(tmp_path / "disk") as data:
        controller = ControllerProcess(engine, tmp_path / "root")
        controller.data = data
        controller.admin = admin_client.AdminClient(data / "admin.sock", timeout=30)
        try:
            edit(controller, 1)
            controller.start()
            wait_for(lambda: controller.ready("kv"), what="kv Ready")
            before = generation(controller, "kv")
            with Load.running(controller) as load:
                turn_read_only(data.parent)
                edit(controller, 2)
                condition = wait_for(
                    lambda: store_condition(controller, "kv"), what="StoreUnavailable"
                )
                assert condition["reason"] in ("IOError", "ReadOnly")
                assert "state.db" in condition["message"]
                assert generation(controller, "kv") == before, "the edit waits for the store"
                listed = bhctl(controller, "get")
                assert listed.returncode == 0, listed.stderr
                assert "StoreUnavailable" in listed.stderr
                assert metric(controller, "blackhole_store_errors_total") >= 1
                count = len(load.written)
                wait_for(lambda: len(load.written) > count + 200, what="calls on a read-only disk")
            assert load.failures == [], "no call failed while the disk was read-only"
            assert alive(controller)
        finally:
            controller.end()
            _remove(engine.client, f"{base.LABEL_CONTROLLER}={controller.controller_id}")


STATEFUL = """\
  state: {version: 1, checkpointSeconds: 1}
  env: {STATEFUL: '1'}
"""


def checkpointed_after(controller: ControllerProcess, name: str, moment: float) -> bool:
    return any(
        s["reason"] == "checkpoint" and datetime.fromisoformat(s["takenAt"]).timestamp() > moment
        for s in controller.admin.state_history(name)["snapshots"]
    )


def test_a_damaged_snapshot_database_is_moved_aside_once_with_no_loop(controller):
    controller.write("st", STATEFUL)
    controller.start()
    wait_for(lambda: controller.ready("st"), what="st Ready")
    for i in range(300):
        assert controller.call("st", "put", {"key": f"k{i}", "value": "v" * 2000})[0] == 200
    wait_for(lambda: checkpointed_after(controller, "st", 0), what="a checkpoint")
    name = base.instance_name("st", models.Color.BLUE, None, controller.controller_id)
    assert controller.engine is not None
    ident = controller.engine.client.api.inspect_container(name)["Id"]
    assert controller.terminate() == 0
    path = controller.data / "snapshots.db"
    size = path.stat().st_size
    with path.open("r+b") as handle:  # garbage over every page but the header
        handle.seek(4096)
        handle.write(b"\xa5" * max(0, size - 4096))
    started = datetime.now().timestamp()
    controller.start()
    wait_for(lambda: controller.ready("st"), what="st Ready again")
    wait_for(
        lambda: checkpointed_after(controller, "st", started),
        timeout=60,
        what="a checkpoint into the fresh store",
    )
    described = controller.admin.get("st")
    damaged = [e for e in described["events"] if e["reason"] == "StoreDamaged"]
    assert len(damaged) == 1, described["events"]
    assert str(path) in damaged[0]["message"]
    assert list(controller.data.glob("snapshots.db.damaged-*"))
    assert controller.condition("st", "StoreDamaged").get("status") == "True"
    churn = [e for e in described["events"] if e["reason"] in ("Created", "Restarted")]
    assert len(churn) == 1, "created once, before the damage; adopted after it, not re-created"
    assert controller.engine.client.api.inspect_container(name)["Id"] == ident
    assert list(controller.containers()) == [name]


def test_a_paused_instance_fails_its_health_check_and_is_restarted(
    engine: EngineUnderTest, controller: ControllerProcess
) -> None:
    controller.write("kv", BODY.format(edit=1))
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    name = base.instance_name("kv", models.Color.BLUE, None, controller.controller_id)
    paused = engine.client.api.inspect_container(name)["Id"]
    engine.client.api.pause(name)

    def restarted() -> bool:
        try:
            attrs = engine.client.api.inspect_container(name)
        except docker.errors.APIError:  # between the old one and the new (Podman: 500)
            return False
        return bool(attrs["Id"] != paused and attrs["State"]["Status"] == "running")

    wait_for(restarted, timeout=90, what="the paused instance replaced by a running one")
    wait_for(lambda: controller.ready("kv"), timeout=60, what="kv Ready again")
    assert controller.call("kv", "echo", {"x": 1})[0] == 200
    reasons = [e["reason"] for e in controller.admin.get("kv")["events"]]
    assert "Unhealthy" in reasons
    assert "Restarted" in reasons


def test_a_read_only_data_directory_at_start_up_is_one_line_not_a_traceback(tmp_path):
    with small_disk(tmp_path / "data") as data:
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        ran = subprocess.run(
            [str(BHCTL), "run", "--runtime", "docker", "--data-dir", str(data),
             "--gateway-addr", "127.0.0.1:0", "--gateway-grpc-addr", "127.0.0.1:0",
             "--metrics-addr", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert ran.returncode == 1
    assert "Traceback" not in ran.stderr + ran.stdout
    assert f"cannot open {data / 'controller.lock'}" in ran.stderr
