"""The controller process (``bhctl run``) on real Docker and real Podman.

Each test runs its own controller, with its own specs directory, data
directory and controller id, and checks the world as the engine reports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from controller.runtimes import base
from controller.spec import models

from . import test_start_cpu
from .conftest import BHCTL, PLUGIN_IMAGE, ControllerProcess, bhctl, wait_for

MI = 2**20


def inspect(controller: ControllerProcess, plugin: str) -> dict[str, Any]:
    """The engine's view of the plugin's one instance (whichever its color)."""
    names = [
        base.instance_name(plugin, color, None, controller.controller_id) for color in models.Color
    ]
    [name] = [n for n in names if n in controller.containers()]
    assert controller.engine is not None
    return dict(controller.engine.client.api.inspect_container(name))


@pytest.fixture
def host_root() -> Any:
    root = Path(tempfile.mkdtemp(prefix="bh-hostpaths-"))
    (root / "shared").mkdir()
    return root


def test_three_specs_become_three_isolated_ready_instances(controller, host_root):
    controller.extra_args = ["--host-path-root", str(host_root)]
    controller.write(
        "alpha",
        "  resources: {cpu: 250m, memory: 64Mi, pids: 32}\n"
        "  volumes: [{name: data, mountPath: /data, size: 1Gi}]\n",
    )
    controller.write("beta", "  resources: {cpu: 100m, memory: 48Mi, pids: 16}\n")
    controller.write(
        "gamma",
        f"  volumes: [{{name: shared, mountPath: /shared, hostPath: {host_root}/shared, "
        "readOnly: true}]\n",
    )
    controller.start()
    wait_for(lambda: controller.ready("alpha", "beta", "gamma"), what="three Ready plugins")
    assert sorted(controller.containers()) == sorted(
        base.instance_name(p, models.Color.BLUE, None, controller.controller_id)
        for p in ("alpha", "beta", "gamma")
    )
    expected = {
        "alpha": (250, 64 * MI, 32),
        "beta": (100, 48 * MI, 16),
        "gamma": (500, 128 * MI, 64),
    }
    for plugin, (millis, memory, pids) in expected.items():
        attrs = inspect(controller, plugin)
        host = attrs["HostConfig"]
        assert host["Memory"] == memory
        assert host["MemorySwap"] == memory, "no swap beyond the memory limit"
        # Ready: the spec's CPU, where the kernel enforces it (instances start with more, and
        # Podman's inspection keeps the value a container was created with).
        assert test_start_cpu.cpu_quota(attrs["State"]["Pid"]) == millis * 100
        assert host["PidsLimit"] == pids
        assert host["ReadonlyRootfs"] is True
        assert host["NetworkMode"] == "none"
        assert any("no-new-privileges" in opt for opt in host["SecurityOpt"])
        cap_drop = [c.upper().removeprefix("CAP_") for c in host["CapDrop"]]
        assert cap_drop == ["ALL"] or {"CHOWN", "SETUID", "NET_RAW"} <= set(cap_drop)
        assert not host.get("CapAdd")
        assert attrs["Config"]["User"] == "65532:65532"
        assert attrs["Config"]["Labels"][base.LABEL_PLUGIN] == plugin
        assert attrs["Config"]["Labels"][base.LABEL_CONTROLLER] == controller.controller_id
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        socket_dir = Path(mounts["/run/blackhole"]["Source"])
        assert socket_dir.stat().st_uid == 65532
        assert socket_dir.stat().st_mode & 0o777 == 0o700
        assert "/tmp" in host["Tmpfs"]
    alpha = {m["Destination"]: m for m in inspect(controller, "alpha")["Mounts"]}["/data"]
    assert alpha["Type"] == "volume"
    volume = controller.engine.client.volumes.get(alpha["Name"])
    assert volume.attrs["Labels"][base.LABEL_PLUGIN] == "alpha"
    gamma = {m["Destination"]: m for m in inspect(controller, "gamma")["Mounts"]}["/shared"]
    assert gamma["Type"] == "bind"
    assert gamma["Source"] == str((host_root / "shared").resolve())
    assert gamma["RW"] is False


def test_spec_edits_are_followed_and_deletions_clean_up(controller):
    swap = "  hotSwap: {scaleDownDelaySeconds: 0}\n"
    controller.write(
        "alpha", "  resources: {memory: 64Mi}\n  volumes: [{name: data, mountPath: /data}]\n" + swap
    )
    controller.start()
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    assert controller.status("alpha")["observedGeneration"] == 1
    first = inspect(controller, "alpha")["Id"]
    controller.write(
        "alpha", "  resources: {memory: 96Mi}\n  volumes: [{name: data, mountPath: /data}]\n" + swap
    )
    wait_for(
        lambda: (
            controller.status("alpha").get("observedGeneration") == 2
            and controller.ready("alpha")
            and (controller.status("alpha").get("lastSwap") or {}).get("result") == "Promoted"
            and len(controller.containers()) == 1
        ),
        what="generation 2 swapped in",
    )
    attrs = inspect(controller, "alpha")
    assert attrs["Id"] != first, "a resource change brings in a new instance, blue/green"
    assert attrs["Name"].endswith("alpha-green")
    assert attrs["HostConfig"]["Memory"] == 96 * MI
    events = controller.admin.get("alpha")["events"]
    assert {"SwapStarted", "SwapPromoted", "SwapCompleted"} <= {e["reason"] for e in events}

    volume = {m["Destination"]: m for m in attrs["Mounts"]}["/data"]["Name"]
    (controller.specs / "alpha.yaml").unlink()
    wait_for(lambda: not controller.containers(), what="the instance to be removed")
    assert "alpha" not in controller.plugins()
    controller.engine.client.volumes.get(volume)  # named volumes are kept: the plugin's data


def test_a_label_change_restarts_nothing(controller):
    controller.write("alpha")
    controller.start()
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    first = inspect(controller, "alpha")["Id"]
    path = controller.specs / "alpha.yaml"
    path.write_text(path.read_text().replace("name: alpha", "name: alpha\n  labels: {team: x}"))
    wait_for(lambda: controller.status("alpha").get("observedGeneration") == 2, what="generation 2")
    assert inspect(controller, "alpha")["Id"] == first


def test_private_networks_link_only_plugins_that_name_each_other(controller):
    controller.write("left", "  permissions: {network: private, peers: [right]}\n")
    controller.write("right", "  permissions: {network: private, peers: [left]}\n")
    controller.start()
    wait_for(lambda: controller.ready("left", "right"), what="both Ready")
    left = set(inspect(controller, "left")["NetworkSettings"]["Networks"])
    right = set(inspect(controller, "right")["NetworkSettings"]["Networks"])
    [shared] = left & right
    network = controller.engine.client.networks.get(shared)
    assert network.attrs["Internal"] is True, "a private network has no route out"
    (controller.specs / "left.yaml").unlink()
    (controller.specs / "right.yaml").unlink()
    wait_for(lambda: not controller.containers(), what="both removed")

    def gone() -> bool:
        try:
            controller.engine.client.networks.get(shared)
        except docker.errors.NotFound:
            return True
        return False

    wait_for(gone, what=f"network {shared} to be removed")


def test_a_killed_instance_is_restarted_and_a_crash_loop_is_reported(controller):
    controller.write("steady")
    controller.write(
        "crashy",
        "  env: {MODE: crash}\n"
        "  restart: {maxRestarts: 2, backoffSeconds: 0.2, maxBackoffSeconds: 1}\n",
    )
    controller.start()
    wait_for(lambda: controller.ready("steady"), what="steady Ready")
    name = base.instance_name("steady", models.Color.BLUE, None, controller.controller_id)
    controller.engine.kill_main_process(name)

    def restarted() -> bool:
        instances = controller.status("steady").get("instances", [])
        return controller.ready("steady") and bool(instances[0]["restarts"] == 1)

    wait_for(restarted, what="steady restarted once and Ready")
    record = controller.status("steady")["instances"][0]
    assert record["lastExitCode"] == 137
    reasons = [e["reason"] for e in controller.admin.get("steady")["events"]]
    assert "Restarted" in reasons

    degraded = wait_for(
        lambda: (
            (c := controller.condition("crashy", "Degraded")).get("reason") == "CrashLoop" and c
        ),
        what="the crash loop reported",
    )
    assert controller.status("crashy")["phase"] == "Degraded"
    assert "exit code 3" in degraded["message"]
    assert "boom: crashing on purpose" in degraded["message"], "the last log lines are shown"
    assert controller.status("crashy")["instances"][0]["restarts"] == 2


def test_a_controller_killed_mid_reconcile_converges_to_exactly_twenty(controller):
    for index in range(20):
        controller.write(f"p{index:02d}")
    controller.extra_args = ["--workers", "4"]
    controller.start()
    wait_for(lambda: 1 <= len(controller.containers()) < 20, timeout=60, what="some started")
    controller.kill()
    controller.start()
    names = {f"p{i:02d}" for i in range(20)}
    wait_for(lambda: controller.ready(*names), timeout=120, what="all 20 Ready")
    found = controller.containers()
    assert sorted(found) == sorted(
        base.instance_name(n, models.Color.BLUE, None, controller.controller_id) for n in names
    )
    assert set(found.values()) == {"running"}
    assert sorted(p.name for p in (controller.data / "instances").iterdir()) == sorted(found)


def test_what_the_controller_does_not_own_is_never_touched(controller, engine):
    handmade = engine.client.containers.create(
        PLUGIN_IMAGE, name=engine.name("handmade"), labels=engine.labels, network_mode="none"
    )
    impostor_labels = {
        **engine.labels,
        base.LABEL_MANAGED_BY: base.MANAGED_BY,
        base.LABEL_CONTROLLER: "someone-else",
        base.LABEL_PLUGIN: "alpha",
        base.LABEL_COLOR: "blue",
    }
    other = engine.client.containers.create(
        PLUGIN_IMAGE, name=engine.name("other-controller"), labels=impostor_labels,
        network_mode="none",
    )  # fmt: skip
    controller.write("alpha")
    controller.start()
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    (controller.specs / "alpha.yaml").unlink()
    wait_for(lambda: not controller.containers(), what="alpha removed")
    handmade.reload()
    other.reload()  # both still exist: reload raises NotFound otherwise


def test_host_paths_outside_the_root_or_with_dotdot_are_refused_naming_the_field(
    controller, host_root
):
    controller.extra_args = ["--host-path-root", str(host_root)]
    (host_root / "escape").symlink_to("/etc")
    controller.start()

    def apply(name: str, host_path: str) -> subprocess.CompletedProcess[str]:
        spec = controller.root / f"{name}.yaml"
        spec.write_text(
            f"apiVersion: blackhole.dev/v1alpha1\nkind: Plugin\nmetadata: {{name: {name}}}\n"
            f"spec:\n  image: {PLUGIN_IMAGE}\n  version: 1.0.0\n"
            f"  volumes: [{{name: x, mountPath: /x, hostPath: {host_path}}}]\n"
        )
        return bhctl(controller, "apply", "-f", str(spec))

    result = apply("dotdot", f"{host_root}/../etc")
    assert result.returncode == 1
    assert "spec.volumes[0].hostPath" in result.stderr
    assert '".."' in result.stderr
    assert "dotdot" not in controller.plugins()

    for name, path in (("outside", "/etc"), ("symlink", f"{host_root}/escape")):
        result = apply(name, path)
        assert result.returncode == 0, result.stderr

        def failed(name: str = name) -> bool:
            return bool(controller.status(name).get("phase") == "Failed")

        wait_for(failed, what=f"{name} Failed")
        ready = controller.condition(name, "Ready")
        assert ready["reason"] == "InvalidSpec"
        assert "spec.volumes[0].hostPath" in ready["message"]
    assert controller.containers() == {}, "nothing was created"


def test_sigterm_leaves_instances_running_and_a_new_controller_adopts_them(controller):
    controller.write("alpha")
    controller.start()
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    first = inspect(controller, "alpha")["Id"]
    assert controller.terminate() == 0
    assert inspect(controller, "alpha")["State"]["Running"] is True
    controller.start()
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready again")
    assert inspect(controller, "alpha")["Id"] == first, "adopted, not recreated"


def test_the_cli_prints_plugins_as_objects_and_tables(controller):
    controller.write("alpha")
    controller.start()
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    listing = json.loads(bhctl(controller, "get", "-o", "json").stdout)
    assert listing["kind"] == "List"
    [item] = listing["items"]
    plugin = models.Plugin.model_validate(item)
    assert plugin.status is not None
    assert plugin.status.phase is models.Phase.RUNNING
    table = bhctl(controller, "get").stdout
    assert "alpha" in table
    assert "Running" in table
    described = bhctl(controller, "describe", "alpha").stdout
    assert "InstanceReady" in described
    assert "Created" in described
    logs = bhctl(controller, "logs", "alpha").stdout
    assert "listening on unix:/run/blackhole/plugin.sock" in logs
    missing = bhctl(controller, "describe", "nope")
    assert missing.returncode == 1
    assert 'no plugin "nope"' in missing.stderr


def test_the_cli_says_so_when_no_controller_runs(tmp_path):
    result = subprocess.run(
        [str(BHCTL), "get", "--data-dir", str(tmp_path)], capture_output=True, text=True,
        check=False, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "no controller answers" in result.stderr


def test_applied_specs_run_and_delete_through_the_admin_api(controller):
    controller.start()
    spec = controller.root / "applied.yaml"
    spec.write_text(
        f"apiVersion: blackhole.dev/v1alpha1\nkind: Plugin\nmetadata: {{name: applied}}\n"
        f"spec:\n  image: {PLUGIN_IMAGE}\n  version: 1.0.0\n"
    )
    result = bhctl(controller, "apply", "-f", str(spec))
    assert result.returncode == 0, result.stderr
    assert "plugin/applied created (generation 1)" in result.stdout
    wait_for(lambda: controller.ready("applied"), what="applied Ready")
    again = bhctl(controller, "apply", "-f", str(spec))
    assert again.returncode == 0, again.stderr
    assert "plugin/applied unchanged" in again.stdout
    assert bhctl(controller, "delete", "applied").returncode == 0
    wait_for(lambda: not controller.containers(), what="applied removed")


def test_down_removes_instances_networks_volumes_the_gateway_and_the_controller(controller):
    engine = controller.engine
    assert engine is not None
    owner = {"label": f"{base.LABEL_CONTROLLER}={controller.controller_id}"}
    controller.write(
        "left",
        "  permissions: {network: private, peers: [right]}\n"
        "  volumes: [{name: data, mountPath: /data, size: 1Gi}]\n",
    )
    controller.write("right", "  permissions: {network: private, peers: [left]}\n")
    controller.start()
    wait_for(lambda: controller.ready("left", "right"), timeout=90, what="two Ready plugins")
    assert engine.client.api.networks(filters=owner)
    volume = base.volume_name("left", "data", None, controller.controller_id)
    assert [v["Name"] for v in engine.client.api.volumes(filters=owner)["Volumes"]] == [volume]
    gateway = controller.gateway_pid()
    assert gateway is not None

    kept = bhctl(controller, "down", timeout=300)
    assert kept.returncode == 0, kept.stderr
    instances = sorted(
        base.instance_name(p, models.Color.BLUE, None, controller.controller_id)
        for p in ("left", "right")
    )
    assert [f"instance/{n} removed" for n in instances] == kept.stdout.splitlines()[:2]
    assert f"gateway stopped (pid {gateway})" in kept.stdout
    assert f"controller stopped (pid {controller.process.pid})" in kept.stdout
    assert controller.process.wait(timeout=60) == 0
    assert controller.containers() == {}
    assert engine.client.api.networks(filters=owner) == []
    assert [v["Name"] for v in engine.client.api.volumes(filters=owner)["Volumes"]] == [volume]
    assert controller.gateway_pid() is None
    assert bhctl(controller, "get").returncode == 1  # nothing answers any more

    controller.start()  # the specs are still there: up again, then down with the volumes
    wait_for(lambda: controller.ready("left", "right"), timeout=90, what="Ready again")
    removed = bhctl(controller, "down", "--volumes", timeout=300)
    assert removed.returncode == 0, removed.stderr
    assert f"volume/{volume} removed" in removed.stdout
    assert controller.process.wait(timeout=60) == 0
    assert engine.client.api.volumes(filters=owner)["Volumes"] in (None, [])
    assert controller.containers() == {}
