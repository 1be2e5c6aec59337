"""Blue/green swaps of real plugins under a real controller, on Docker and Podman.

Under continuous load through the gateway, a swap loses no call and no
write; every way a swap can fail ends with the old color serving its state;
a controller killed at any step of the flip converges, when started again,
to exactly one active color with every key.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from controller.runtimes import base
from controller.spec import models
from controller.swap import coordinator

from .conftest import ControllerProcess, bhctl, wait_for

STORAGE = "blackhole/example-storage:{}"
KV = """\
  state: {{version: {state}}}
  hotSwap: {{scaleDownDelaySeconds: {delay}, maxPauseMilliseconds: 2000}}
  gateway: {{maxConcurrentCalls: 1000}}
"""


def write_kv(controller: ControllerProcess, version: str, state: int, delay: int = 2) -> None:
    controller.write(
        "kv", KV.format(state=state, delay=delay), version=version, image=STORAGE.format(version)
    )


@dataclass
class Load:
    """Writes keys through the gateway at a steady rate from a few threads."""

    controller: ControllerProcess
    rate: float = 200.0
    threads: int = 4
    written: dict[str, int] = field(default_factory=dict)
    acknowledged: dict[str, float] = field(default_factory=dict)
    """When each write was acknowledged (wall clock)."""
    failures: list[tuple[str, int, object]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0

    def _next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def _run(self) -> None:
        interval = self.threads / self.rate
        deadline = time.monotonic()
        while not self._stop.is_set():
            n = self._next()
            key = f"key-{n:06d}"
            status, answer, _ = self.controller.call("kv", "put", {"key": key, "value": n})
            with self._lock:
                if status == 200:
                    self.written[key] = n
                    self.acknowledged[key] = time.time()
                else:
                    self.failures.append((key, status, answer))
            deadline += interval
            time.sleep(max(0.0, deadline - time.monotonic()))

    @classmethod
    @contextlib.contextmanager
    def running(cls, controller: ControllerProcess) -> Iterator[Load]:
        load = cls(controller)
        workers = [threading.Thread(target=load._run) for _ in range(load.threads)]
        for worker in workers:
            worker.start()
        try:
            yield load
        finally:
            load._stop.set()
            for worker in workers:
                worker.join()


def all_readable(controller: ControllerProcess, written: dict[str, int]) -> list[str]:
    missing = []
    for key, value in written.items():
        status, answer, _ = controller.call("kv", "get", {"key": key})
        if status != 200 or answer["value"] != value:
            missing.append(key)
    return missing


def swap_done(controller: ControllerProcess, version: str) -> bool:
    status = controller.status("kv")
    last = status.get("lastSwap") or {}
    return (
        status.get("swap") is None
        and status.get("activeVersion") == version
        and last.get("result") == "Promoted"
        and len(controller.containers()) == 1
    )


def test_a_swap_under_load_fails_no_call_and_loses_no_write(controller):
    write_kv(controller, "1.0.0", state=1)
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv 1.0.0 Ready")
    with Load.running(controller) as load:
        time.sleep(1.0)
        write_kv(controller, "1.1.0", state=2)  # and state version 1 -> 2: the SDK migrates
        wait_for(lambda: swap_done(controller, "1.1.0"), timeout=60, what="the swap to 1.1.0")
        time.sleep(0.5)
    assert load.failures == [], "no call failed"
    assert len(load.written) > 200
    assert all_readable(controller, load.written) == [], "no write was lost"
    status = controller.status("kv")
    assert status["lastSwap"]["pauseMilliseconds"] > 0
    [instance] = controller.containers()
    assert instance.endswith("kv-green")
    # Written by 1.0 in state version 1, read by 1.1 in version 2: revisions were added.
    assert controller.call("kv", "get", {"key": "key-000001"})[1]["revision"] == 1


def rollback_case(controller: ControllerProcess, new_body: str, reason: str) -> dict[str, object]:
    controller.write("kv", "  state: {version: 1}\n  env: {STATE_VERSION: '1'}\n")
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    for i in range(20):
        assert controller.call("kv", "put", {"key": f"k{i}", "value": i})[0] == 200
    controller.write("kv", "  state: {version: 1}\n" + new_body)

    def rolled_back() -> bool:
        last = controller.status("kv").get("lastSwap") or {}
        return last.get("result") == "RolledBack"

    wait_for(rolled_back, timeout=60, what=f"a rollback with {reason}")
    status = controller.status("kv")
    assert status["lastSwap"]["reason"] == reason
    assert status["activeColor"] == "blue"
    assert status["phase"] == "Degraded"
    degraded = controller.condition("kv", "Degraded")
    assert degraded["reason"] == reason
    wait_for(lambda: list(controller.containers()) == [_blue(controller)], what="green removed")
    for i in range(20):
        assert controller.call("kv", "get", {"key": f"k{i}"})[:2] == (200, {"value": i})
    return status


def _blue(controller: ControllerProcess) -> str:
    return base.instance_name("kv", models.Color.BLUE, None, controller.controller_id)


def test_a_new_version_that_never_gets_healthy_is_rolled_back(controller):
    rollback_case(
        controller,
        "  env: {STATE_VERSION: '1', MODE: mute}\n  health: {startupDeadlineSeconds: 3}\n",
        "SwapFailedNotReady",
    )


def test_a_failed_import_is_rolled_back(controller):
    status = rollback_case(
        controller, "  env: {STATE_VERSION: '1', FAIL: import}\n", "SwapFailedImport"
    )
    assert "import" in controller.condition("kv", "Degraded")["message"]
    assert status["activeVersion"] == "1.0.0"


def test_a_crash_two_seconds_after_promotion_is_rolled_back(controller):
    rollback_case(
        controller,
        "  env: {STATE_VERSION: '1', CRASH_AFTER_IMPORT: '2'}\n"
        "  hotSwap: {scaleDownDelaySeconds: 30}\n",
        "SwapFailedAfterPromotion",
    )


@pytest.mark.parametrize("step", ["precopied", "promoting", "drained", "imported", "flipped"])
def test_a_controller_killed_at_each_step_of_the_flip_converges(controller, step):
    write_kv(controller, "1.0.0", state=1)
    controller.start(env={coordinator.CRASH_AT_VARIABLE: step})
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    written = {}
    for i in range(50):
        assert controller.call("kv", "put", {"key": f"k{i}", "value": i})[0] == 200
        written[f"k{i}"] = i
    write_kv(controller, "1.1.0", state=2)
    process = controller.process
    assert process is not None
    wait_for(lambda: process.poll() is not None, what=f"the controller to kill itself at {step}")
    assert process.returncode == -9
    controller.start()
    wait_for(lambda: swap_done(controller, "1.1.0"), timeout=60, what="the swap done after restart")
    assert len(controller.containers()) == 1, "exactly one active color"
    assert all_readable(controller, written) == [], "no key lost"


def test_state_snapshots_through_the_cli(controller, tmp_path):
    write_kv(controller, "1.0.0", state=1, delay=0)
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    assert controller.call("kv", "put", {"key": "a", "value": 1})[0] == 200
    write_kv(controller, "1.1.0", state=2, delay=0)
    wait_for(lambda: swap_done(controller, "1.1.0"), what="the swap to 1.1.0")

    described = bhctl(controller, "describe", "kv").stdout
    assert "Last swap:   1.0.0 -> 1.1.0: Promoted, calls held" in described
    history = bhctl(controller, "state", "history", "kv").stdout
    assert "1.0.0" in history
    assert "swap" in history
    exported = tmp_path / "kv.state"
    assert (
        bhctl(
            controller, "state", "export", "kv", "--raw", "--output-file", str(exported)
        ).returncode
        == 0
    )
    state = json.loads(exported.read_bytes())
    assert state["entries"]["a"] == {"value": 1, "revision": 1}

    state["entries"] = {"b": {"value": "restored", "revision": 7}}
    exported.write_text(json.dumps(state))
    imported = bhctl(controller, "state", "import", "kv", str(exported), "--state-version", "2")
    assert imported.returncode == 0, imported.stderr
    assert controller.call("kv", "get", {"key": "b"})[1]["value"] == "restored"
    assert controller.call("kv", "get", {"key": "a"})[0] == 404
    assert "before-import" in bhctl(controller, "state", "history", "kv").stdout
    failed = bhctl(controller, "swap", "promote", "kv")
    assert failed.returncode == 1
    assert "no swap in progress" in failed.stderr
