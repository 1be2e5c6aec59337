"""A container made from a spec is isolated as promised, on Docker and on Podman.

Each setting is checked twice: in the engine's own inspect output, and from
inside the container, where the kernel shows what really took effect.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from controller.runtimes import base
from controller.runtimes.container import isolation
from controller.spec import models

from . import tamper
from .conftest import BASE_IMAGE, SESSION_LABEL, ControllerProcess, EngineUnderTest, wait_for

# Runs inside the container and reports what the kernel enforces.
PROBE = r"""
import json, os

def read(*paths):
    for path in paths:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return None

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split()[1]

def writable(path):
    try:
        with open(os.path.join(path, ".probe"), "w") as f:
            f.write("x")
        os.unlink(os.path.join(path, ".probe"))
        return True
    except OSError:
        return False

interfaces = [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]]
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "cap_eff": status("CapEff"), "cap_bnd": status("CapBnd"),
    "no_new_privs": status("NoNewPrivs"),
    "interfaces": interfaces,
    "root_writable": writable("/"), "tmp_writable": writable("/tmp"),
    "memory_max": read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "memsw_max": read("/sys/fs/cgroup/memory.swap.max",
                      "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
    "cpu_max": read("/sys/fs/cgroup/cpu.max"),
    "cfs_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    "cfs_period": read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    "pids_max": read("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
}))
"""

MEMORY = 96 * 2**20
PODMAN_DEFAULT_CAPS = {
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip


def spec() -> models.PluginSpec:
    return models.PluginSpec.model_validate(
        {
            "image": BASE_IMAGE,
            "version": "1.0.0",
            "resources": {"cpu": "250m", "memory": "96Mi", "pids": 32},
            "env": {"GREETING": "hello"},
        }
    )


def run_probe(engine: EngineUnderTest, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    options = isolation.container_options(spec(), name=engine.name(name), labels=engine.labels)
    options["command"] = ["python3", "-c", PROBE]
    created = engine.client.containers.create(**options)
    created.start()
    result = created.wait(timeout=60)
    logs = created.logs(stdout=True, stderr=True).decode()
    assert result["StatusCode"] == 0, logs
    inspected = engine.client.api.inspect_container(engine.name(name))
    return inspected, json.loads(logs.strip().splitlines()[-1])


def test_engine_reports_every_isolation_setting(engine: EngineUnderTest) -> None:
    inspected, _ = run_probe(engine, "inspect")
    host = inspected["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["Memory"] == MEMORY
    assert host["MemorySwap"] == MEMORY
    assert host["CpuQuota"] == 25_000
    assert host["CpuPeriod"] == 100_000
    assert host["PidsLimit"] == 32
    dropped = {c.upper().removeprefix("CAP_") for c in host["CapDrop"]}
    # Docker reports ALL; Podman expands ALL into the capabilities it would have granted.
    assert dropped == {"ALL"} or dropped >= PODMAN_DEFAULT_CAPS, host["CapDrop"]
    assert not host.get("CapAdd")
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"])
    assert host["Privileged"] is False
    assert "/tmp" in host["Tmpfs"]
    assert inspected["Config"]["User"] == base.DEFAULT_USER
    assert inspected["Config"]["Labels"][SESSION_LABEL] == engine.labels[SESSION_LABEL]
    assert "GREETING=hello" in inspected["Config"]["Env"]


def test_kernel_enforces_every_isolation_setting(engine: EngineUnderTest) -> None:
    _, seen = run_probe(engine, "probe")
    assert (seen["uid"], seen["gid"]) == (65532, 65532)
    assert int(str(seen["cap_eff"]), 16) == 0
    assert int(str(seen["cap_bnd"]), 16) == 0
    assert seen["no_new_privs"] == "1"
    assert seen["interfaces"] == ["lo"]
    assert seen["root_writable"] is False
    assert seen["tmp_writable"] is True
    assert int(str(seen["memory_max"])) == MEMORY
    if seen["memsw_max"] is not None:  # absent when the kernel does not account swap
        assert seen["memsw_max"] in (str(MEMORY), "0")
    if seen["cpu_max"] is not None:
        assert seen["cpu_max"] == "25000 100000"
    else:
        assert (seen["cfs_quota"], seen["cfs_period"]) == ("25000", "100000")
    assert seen["pids_max"] == "32"


def test_root_is_refused() -> None:
    with pytest.raises(ValueError, match="never run as root"):
        isolation.container_options(
            spec(), name="x", labels={}, isolation=isolation.Isolation(user="0:0")
        )


def test_session_resources_are_labelled_for_cleanup(engine: EngineUnderTest) -> None:
    created = engine.client.containers.create(
        BASE_IMAGE, ["true"], name=engine.name("label"), labels=engine.labels
    )
    listed = engine.client.containers.list(
        all=True, filters={"label": f"{SESSION_LABEL}={engine.labels[SESSION_LABEL]}"}
    )
    assert created.id in {c.id for c in listed}
    created.remove(force=True)
    with pytest.raises(docker.errors.NotFound):
        engine.client.containers.get(engine.name("label"))


def test_a_plugin_linking_its_socket_to_another_plugins_is_refused(
    controller: ControllerProcess,
) -> None:
    tamper.check_a_linked_socket_is_refused(
        controller, lambda name, env: controller.write(name, f"  env: {env}\n" if env else "")
    )


def _watched_inodes(pid: int) -> set[int]:
    """The inodes that the inotify watches of process ``pid`` are on."""
    watched = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("inotify "):
                    fields = dict(item.split(":", 1) for item in line.split()[1:])
                    watched.add(int(fields["ino"], 16))
    return watched


def test_the_controller_watches_no_directory_a_plugin_links_to(
    controller: ControllerProcess, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    for index in range(20):
        (outside / f"d{index}").mkdir(parents=True)
    controller.start()
    # From instances/<instance>/linked, four levels up is tmp_path.
    controller.write("linker", "  env: {LINK_OUT: ../../../../outside}\n")
    wait_for(lambda: controller.ready("linker"), what="linker Ready")
    instance = base.instance_name("linker", models.Color.BLUE, None, controller.controller_id)
    link = controller.data / "instances" / instance / "linked" / "out"
    assert link.is_symlink()
    assert link.resolve() == outside
    assert controller.process is not None
    watched = _watched_inodes(controller.process.pid)
    assert watched, "the controller watches its instances' directories"
    outside_inodes = {p.stat().st_ino for p in [outside, *outside.iterdir()]}
    assert not watched & outside_inodes, "a watch followed the plugin's link out of its directory"
