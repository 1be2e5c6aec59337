"""Live state under a real controller on Docker and Podman (and processes where it applies).

Megabytes of state swap under continuous writes with a pause that holds
only the last changes and loses no write; a delta on the wrong base rolls
back with the old color intact; a plugin of the old protocol still swaps
whole; a rolled-back swap is tried again once its settings change; and an
instance killed (SIGKILL, OOM) gets the newest checkpoint back before it is
Ready, so no write acknowledged before that checkpoint is lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import docker

from controller.runtimes import base
from controller.spec import models

from . import test_process
from .conftest import PLUGIN_DIR, ControllerProcess, wait_for
from .test_hotswap import STORAGE, Load, all_readable

KV = """\
  state: {{version: 2{state}}}
  resources: {{cpu: "1", memory: 256Mi}}
  hotSwap: {{scaleDownDelaySeconds: 1{swap}}}
  gateway: {{maxConcurrentCalls: 1000}}
"""
TEST = """\
  state: {{version: 1{state}}}
  resources: {{memory: {memory}}}
  restart: {{backoffSeconds: 0.2}}
  hotSwap: {{scaleDownDelaySeconds: 1}}
  env: {{{env}}}
"""


def write_kv(controller: ControllerProcess, version: str, state: str = "", swap: str = "") -> None:
    controller.write(
        "kv", KV.format(state=state, swap=swap), version=version, image=STORAGE.format(version)
    )


def fill(controller: ControllerProcess, megabytes: float, name: str = "kv") -> dict[str, Any]:
    """Put about this much state, 4 KiB a key, from a few threads; the keys and values."""
    keys = int(megabytes * 256)

    def put(i: int) -> tuple[str, Any]:
        value = {"n": i, "pad": "x" * 4000}
        status, _, _ = controller.call(name, "put", {"key": f"fill-{i:05d}", "value": value})
        assert status == 200
        return f"fill-{i:05d}", value

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(put, range(keys)))


def swapped(controller: ControllerProcess, name: str, version: str) -> dict[str, Any]:
    status = controller.status(name)
    last = status.get("lastSwap") or {}
    if status.get("swap") is None and last.get("to") == version and last.get("result"):
        return dict(last)
    return {}


def checkpointed_after(controller: ControllerProcess, name: str, moment: float) -> None:
    """Wait for a checkpoint of ``name`` asked for after ``moment`` (wall clock)."""

    def taken(s: dict[str, Any]) -> float:
        return datetime.fromisoformat(s["takenAt"]).timestamp()

    wait_for(
        lambda: any(
            s["reason"] == "checkpoint" and taken(s) > moment
            for s in controller.admin.state_history(name)["snapshots"]
        ),
        what=f"a checkpoint of {name} after the writes",
    )


def events(controller: ControllerProcess, name: str) -> list[dict[str, Any]]:
    return list(controller.admin.get(name)["events"])


def test_megabytes_of_state_swap_under_writes_holding_only_the_last_changes(controller):
    write_kv(controller, "1.1.0")
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    filled = fill(controller, 4)
    with Load.running(controller) as load:
        wait_for(lambda: len(load.written) > 100, what="writes going on")
        write_kv(controller, "1.2.0")
        last = wait_for(lambda: swapped(controller, "kv", "1.2.0"), timeout=120, what="the swap")
        wait_for(lambda: len(load.written) > 400, what="writes after the swap")
    assert last["result"] == "Promoted", last
    assert load.failures == [], "no call failed"
    assert all_readable(controller, load.written) == [], "no write was lost"
    status, answer, _ = controller.call("kv", "get", {"key": "fill-00042"})
    assert status == 200
    assert answer["value"]["n"] == 42
    assert len(filled) == 1024
    assert all_readable(controller, filled) == [], "the state from before the swap is whole"
    assert last["stateTransfer"].startswith("PreCopy"), last
    assert last["stateBytes"] > 4 * 10**6
    assert last["heldStateBytes"] < last["stateBytes"] / 10, "only the last changes were held"


def test_a_delta_on_the_wrong_base_rolls_back_and_the_old_color_serves_intact(controller):
    controller.write("st", TEST.format(state="", memory="64Mi", env="STATEFUL: '1'"))
    controller.start()
    wait_for(lambda: controller.ready("st"), what="st Ready")
    for i in range(100):
        assert controller.call("st", "put", {"key": f"k{i}", "value": i})[0] == 200
    # The new build writes a key of its own after the first copy: the next delta's base is gone.
    controller.write("st", TEST.format(state="", memory="64Mi", env="STATEFUL: '1', DIVERGE: '1'"))
    last = wait_for(lambda: swapped(controller, "st", "1.0.0"), timeout=60, what="the swap")
    assert last["result"] == "RolledBack", last
    assert last["reason"] == "SwapFailedImport"
    [message] = wait_for(
        lambda: [e["message"] for e in events(controller, "st") if e["reason"] == last["reason"]],
        what="the rollback's event",
    )
    assert "revision" in message, message
    status = controller.status("st")
    assert status["activeColor"] == "blue"
    assert [i["color"] for i in status["instances"]] == ["blue"]
    for i in (0, 42, 99):
        assert controller.call("st", "get", {"key": f"k{i}"})[1] == {"value": i}
    assert controller.call("st", "get", {"key": "diverged"})[1] == {"value": None}


def test_a_plugin_of_the_old_protocol_swaps_with_a_whole_copy(controller):
    old = TEST.format(state="", memory="64Mi", env="STATE_VERSION: '1'")
    controller.write("old", old)
    controller.start()
    wait_for(lambda: controller.ready("old"), what="old Ready")
    for i in range(20):
        assert controller.call("old", "put", {"key": f"k{i}", "value": i})[0] == 200
    controller.write("old", old, version="1.1.0")
    last = wait_for(lambda: swapped(controller, "old", "1.1.0"), timeout=60, what="the swap")
    assert last["result"] == "Promoted", last
    assert last["stateTransfer"].startswith("FullCopy"), last
    assert controller.call("old", "get", {"key": "k19"})[1] == {"value": 19}


def test_a_rolled_back_swap_is_tried_again_once_its_settings_change(controller):
    write_kv(controller, "1.1.0")
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    fill(controller, 0.5)
    write_kv(controller, "1.2.0", swap=", maxPauseMilliseconds: 1")
    last = wait_for(lambda: swapped(controller, "kv", "1.2.0"), timeout=60, what="the swap")
    assert (last["result"], last["reason"]) == ("RolledBack", "SwapFailedPause"), last
    assert last["pauseMilliseconds"] > 1, "the held time of a rolled-back swap is reported"
    degraded = controller.condition("kv", "Degraded")
    assert "spec.hotSwap.maxPauseMilliseconds" in degraded["message"]
    write_kv(controller, "1.2.0", swap=", maxPauseMilliseconds: 5000")
    wait_for(
        lambda: swapped(controller, "kv", "1.2.0").get("result") == "Promoted",
        timeout=60,
        what="the swap tried again and promoted",
    )
    assert controller.call("kv", "get", {"key": "fill-00001"})[0] == 200


def _restored_after_kill(controller: ControllerProcess, name: str, kill: Any) -> None:
    """Writes go on; ``kill`` the active instance; check what the restore brought back."""
    with Load.running(controller) as load:
        wait_for(lambda: len(load.written) > 200, what="writes going on")
        before = len(controller.admin.get(name)["events"])
        kill()
        wait_for(
            lambda: (
                controller.status(name).get("lastRestore") is not None and controller.ready(name)
            ),
            timeout=60,
            what="the instance restarted and restored",
        )
    restore = controller.status(name)["lastRestore"]
    taken = datetime.fromisoformat(restore["taken"]).timestamp()
    kept = {k: v for k, v in load.written.items() if load.acknowledged[k] < taken}
    assert len(kept) > 50, "writes were acknowledged before the checkpoint"
    assert all_readable(controller, kept) == [], "every write before the checkpoint is back"
    later = wait_for(
        lambda: (
            [e for e in events(controller, name)[before:] if e["reason"] == "Ready"]
            and events(controller, name)[before:]
        ),
        what="the Ready event",
    )
    reasons = [e["reason"] for e in later]
    assert "StateRestored" in reasons, reasons
    assert reasons.index("StateRestored") < reasons.index("Ready"), "restored before Ready"
    message = later[reasons.index("StateRestored")]["message"]
    assert f"checkpoint {restore['checkpoint']}" in message


def kv_on(controller: ControllerProcess) -> None:
    write_kv(controller, "1.2.0", state=", checkpointSeconds: 1")
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")


def test_a_killed_instance_gets_its_newest_checkpoint_back_before_it_is_ready(controller):
    kv_on(controller)
    name = base.instance_name("kv", models.Color.BLUE, None, controller.controller_id)
    _restored_after_kill(controller, "kv", lambda: controller.engine.kill_main_process(name))


def test_an_oom_killed_instance_gets_its_newest_checkpoint_back(controller):
    body = TEST.format(state=", checkpointSeconds: 1", memory="64Mi", env="STATEFUL: '1'")
    controller.write("st", body)
    controller.start()
    wait_for(lambda: controller.ready("st"), what="st Ready")
    for i in range(200):
        assert controller.call("st", "put", {"key": f"k{i}", "value": i})[0] == 200
    checkpointed_after(controller, "st", time.time())
    controller.call("st", "allocate", {"mib": 200}, timeout=30)  # killed for memory
    wait_for(
        lambda: controller.status("st").get("lastRestore") is not None and controller.ready("st"),
        timeout=60,
        what="restarted and restored",
    )
    assert any(i.get("oomKilled") for i in controller.status("st")["instances"])
    for i in (0, 123, 199):
        assert controller.call("st", "get", {"key": f"k{i}"})[1] == {"value": i}


def test_a_killed_process_plugin_gets_its_newest_checkpoint_back(tmp_path: Path):
    controller = ControllerProcess(
        None, tmp_path, extra_args=["--plugin-root", str(PLUGIN_DIR.parent)]
    )
    try:
        body = test_process.BODY.format(path=PLUGIN_DIR.name, memory="64Mi") + (
            "  state: {version: 1, checkpointSeconds: 1}\n  env: {STATEFUL: '1'}\n"
        )
        controller.write("st", body)
        controller.start()
        wait_for(lambda: controller.ready("st"), what="st Ready")
        for i in range(100):
            assert controller.call("st", "put", {"key": f"k{i}", "value": i})[0] == 200
        checkpointed_after(controller, "st", time.time())
        pid = test_process.state(controller, "st")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: (
                controller.status("st").get("lastRestore") is not None and controller.ready("st")
            ),
            timeout=60,
            what="restarted and restored",
        )
        for i in (0, 99):
            assert controller.call("st", "get", {"key": f"k{i}"})[1] == {"value": i}
    finally:
        controller.end()
        asyncio.run(test_process._remove_all(controller))


def test_both_colors_removed_mid_swap_come_back_with_the_newest_checkpoint(controller):
    write_kv(controller, "1.1.0", state=", checkpointSeconds: 1")
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    filled = fill(controller, 0.5)
    checkpointed_after(controller, "kv", time.time())
    write_kv(controller, "1.2.0", state=", checkpointSeconds: 1", swap=", autoPromote: false")
    wait_for(
        lambda: (controller.status("kv").get("swap") or {}).get("step") == "AwaitingPromotion",
        what="the swap waiting for promotion",
    )
    for color in models.Color:  # as `docker rm -f` of both
        name = base.instance_name("kv", color, None, controller.controller_id)
        try:
            controller.engine.client.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass  # the controller removed it first (the swap lost its source)
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: its removal by the controller is under way
                raise
    wait_for(
        lambda: controller.status("kv").get("lastRestore") is not None and controller.ready("kv"),
        timeout=90,
        what="kv back, restored",
    )
    assert all_readable(controller, filled) == [], "every write before the checkpoint is back"


def test_a_process_plugin_swaps_megabytes_under_writes_losing_nothing(tmp_path: Path):
    controller = ControllerProcess(
        None, tmp_path, extra_args=["--plugin-root", str(PLUGIN_DIR.parent)]
    )

    def body(build: str) -> str:
        return test_process.BODY.format(path=PLUGIN_DIR.name, memory="256Mi") + (
            "  state: {version: 1}\n  hotSwap: {scaleDownDelaySeconds: 1}\n"
            f"  gateway: {{maxConcurrentCalls: 1000}}\n  env: {{STATEFUL: '1', BUILD: '{build}'}}\n"
        )

    try:
        controller.write("kv", body("1"))
        controller.start()
        wait_for(lambda: controller.ready("kv"), what="kv Ready")
        filled = fill(controller, 2)
        with Load.running(controller) as load:
            wait_for(lambda: len(load.written) > 100, what="writes going on")
            controller.write("kv", body("2"))  # another build: a swap
            last = wait_for(lambda: swapped(controller, "kv", "1.0.0"), timeout=120, what="swap")
            wait_for(lambda: len(load.written) > 300, what="writes after the swap")
        assert last["result"] == "Promoted", last
        assert last["stateTransfer"].startswith("PreCopy"), last
        assert load.failures == [], "no call failed"
        assert all_readable(controller, {**filled, **load.written}) == [], "no write was lost"
    finally:
        controller.end()
        asyncio.run(test_process._remove_all(controller))
