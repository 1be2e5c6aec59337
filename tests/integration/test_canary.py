"""Canary swaps of real plugins under a real controller and its gateway, on Docker and Podman.

Under a steady load through the gateway, a canary at 10%, then 50%, then 100% sends each
share of the calls to the new version (measured on the answers) and fails no call; a new
version that fails a fifth of its calls is rolled back by the builtin success-rate
analysis, after which no call fails; and a swap's Prometheus analysis asks a real
Prometheus, passing on one query and rolling back on another, saying which and its value.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.cli import gateway as gateway_process
from controller.gateway import control

from .conftest import BHCTL, ControllerProcess, bhctl, wait_for
from .test_metrics import Prometheus, _free_port

log = logging.getLogger(__name__)

CANARY = """\
  env: {{FAIL_RATE: "{fail}"}}
  gateway: {{maxConcurrentCalls: 1000}}
  hotSwap:
    strategy: Canary
    scaleDownDelaySeconds: 0
{more}"""
STEPS = """\
    canary:
      stickyHeader: X-User
      steps:
        - setWeight: 10
        - pause: {}
        - setWeight: 50
        - pause: {}
"""
ANALYZED = """\
    analysis:
      - {name: success, builtin: SuccessRate, min: 0.95, intervalSeconds: 2, count: 5}
    canary:
      steps:
        - setWeight: 50
        - analysis: {metrics: [success]}
"""


@dataclass
class Load:
    """Calls ``who`` through the gateway at a steady rate: when each began, who answered."""

    controller: ControllerProcess
    rate: float = 200.0
    threads: int = 8
    answers: list[tuple[float, str]] = field(default_factory=list)
    """(start, version) of each call answered."""
    failures: list[tuple[float, int, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        interval = self.threads / self.rate
        deadline = time.monotonic()
        while not self._stop.is_set():
            began = time.monotonic()
            status, answer, _ = self.controller.call("kv", "who", {})
            with self._lock:
                if status == 200:
                    self.answers.append((began, answer["version"]))
                else:
                    self.failures.append((began, status, answer))
            deadline += interval
            time.sleep(max(0.0, deadline - time.monotonic()))

    def since(self, start: float) -> list[str]:
        with self._lock:
            return [version for at, version in self.answers if at >= start]

    def window(self, calls: int, timeout: float = 120) -> tuple[list[str], float]:
        """The versions of the next ``calls`` answered calls, and their rate (calls/s)."""
        start = time.monotonic()
        wait_for(lambda: len(self.since(start)) >= calls, timeout, f"{calls} calls")
        seen = self.since(start)
        return seen, len(seen) / (time.monotonic() - start)

    @classmethod
    @contextlib.contextmanager
    def running(cls, controller: ControllerProcess, rate: float = 200.0) -> Iterator[Load]:
        load = cls(controller, rate)
        workers = [threading.Thread(target=load._run) for _ in range(load.threads)]
        for worker in workers:
            worker.start()
        try:
            yield load
        finally:
            load._stop.set()
            for worker in workers:
                worker.join()


def write_kv(controller: ControllerProcess, version: str, more: str, fail: float = 0) -> None:
    controller.write("kv", CANARY.format(fail=fail, more=more), version=version)


def gateway_weight(controller: ControllerProcess) -> float:
    """The weight the gateway process itself applies to kv's new color."""
    path = gateway_process.control_socket(controller.data)
    status = control.ask(path, {"type": "status"})
    return float(status["plugins"]["kv"]["weight"])


def canary_at(controller: ControllerProcess, step: int, weight: int) -> bool:
    swap = controller.status("kv").get("swap") or {}
    return (
        swap.get("canaryStep") == step
        and swap.get("weight") == weight
        and gateway_weight(controller) == weight
    )


def watched_tree(controller: ControllerProcess, until: str) -> list[str]:
    """The lines ``bhctl get kv -w`` prints, up to the first with ``until``."""
    command = [str(BHCTL), "get", "kv", "-w", "--data-dir", str(controller.data)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as watch:
        assert watch.stdout is not None
        lines: list[str] = []
        try:
            for line in watch.stdout:
                lines.append(line.rstrip("\n"))
                if until in line:
                    return lines
        finally:
            watch.terminate()
    raise AssertionError(f"bhctl get -w ended before {until!r}: {lines}")


def sticky_versions(controller: ControllerProcess, user: str) -> set[str]:
    """The versions that answered a few calls with ``user`` in the sticky header."""
    seen = set()
    for _ in range(4):
        status, answer, _ = controller.call("kv", "who", {}, headers={"X-User": user})
        assert status == 200, answer
        seen.add(answer["version"])
    return seen


def share(versions: list[str], version: str) -> float:
    return versions.count(version) / len(versions)


def test_a_canary_splits_calls_by_its_weights_and_fails_none(controller):
    write_kv(controller, "1.0.0", STEPS)
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv 1.0.0 Ready")
    with Load.running(controller) as load:
        load.window(200)
        write_kv(controller, "1.1.0", STEPS)
        wait_for(lambda: canary_at(controller, 1, 10), timeout=90, what="the canary at 10%")
        said = bhctl(controller, "swap", "status", "kv", "--no-watch")
        assert "Canary step 2/4, weight 10%" in said.stdout, said.stdout
        listed = bhctl(controller, "get", "kv")
        assert "Swapping (canary 10%)" in listed.stdout, listed.stdout
        drawn = watched_tree(controller, "[canary]")
        assert "  Weight:    10%" in drawn
        assert "├── revision 1  blue  1.0.0  weight 90%  [active]" in drawn
        assert "└── revision 2  green  1.1.0  weight 10%  [canary]" in drawn
        at_10, rate = load.window(2000)
        users = {f"user-{n}": sticky_versions(controller, f"user-{n}") for n in range(40)}
        assert all(len(seen) == 1 for seen in users.values()), "a caller keeps its color"
        assert {"1.0.0"} <= set().union(*users.values())
        assert abs(share(at_10, "1.1.0") - 0.10) < 0.03, share(at_10, "1.1.0")
        assert rate > 100, f"{rate:.0f} calls/s"

        promoted = bhctl(controller, "swap", "promote", "kv", "--wait")
        assert promoted.returncode == 0, promoted.stderr
        wait_for(lambda: canary_at(controller, 3, 50), timeout=60, what="the canary at 50%")
        at_50, rate = load.window(2000)
        assert abs(share(at_50, "1.1.0") - 0.50) < 0.05, share(at_50, "1.1.0")

        promoted = bhctl(controller, "swap", "promote", "kv", "--wait")
        assert promoted.returncode == 0, promoted.stderr
        wait_for(
            lambda: (
                controller.status("kv").get("swap") is None
                and controller.status("kv").get("activeVersion") == "1.1.0"
            ),
            timeout=60,
            what="the canary promoted",
        )
        at_100, _ = load.window(1000)
        assert share(at_100, "1.1.0") == 1.0
    assert load.failures == [], "no call failed"
    log.info("split at 10%%: %.3f, at 50%%: %.3f", share(at_10, "1.1.0"), share(at_50, "1.1.0"))


def test_a_canary_that_fails_calls_is_rolled_back_by_its_success_rate(controller):
    write_kv(controller, "1.0.0", ANALYZED)
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv 1.0.0 Ready")
    with Load.running(controller, rate=100.0) as load:
        load.window(100)
        write_kv(controller, "1.1.0", ANALYZED, fail=0.2)

        def rolled_back() -> dict[str, Any]:
            last = controller.status("kv").get("lastSwap") or {}
            return last if last.get("reason") == "SwapFailedAnalysis" else {}

        last = wait_for(rolled_back, timeout=120, what="the analysis to roll back")
        after = time.monotonic()
        wait_for(lambda: gateway_weight(controller) == 0, what="the gateway back on 1.0.0")
        versions, _ = load.window(1000)
        assert set(versions) == {"1.0.0"}
    assert "success (SuccessRate) failed" in last["message"]
    assert "wanted >= 0.95" in last["message"]
    late = [f for f in load.failures if f[0] >= after]
    assert late == [], "no call failed after the rollback"
    assert load.failures, "the new version failed some calls while it was a canary"
    assert {status for _, status, _ in load.failures} == {500}
    assert controller.status("kv")["activeVersion"] == "1.0.0"


def test_a_prometheus_analysis_asks_a_real_prometheus(controller, tmp_path: Path):
    address = f"127.0.0.1:{_free_port()}"
    controller.extra_args += ["--prometheus-url", f"http://{address}"]
    blue_green = """\
  gateway: {{maxConcurrentCalls: 1000}}
  hotSwap:
    scaleDownDelaySeconds: 0
    analysis:
      - name: calls
        prometheus: {{query: '{query}'}}
        {limit}
        intervalSeconds: 2
        count: 2
    prePromotionAnalysis: [calls]
"""
    answered = 'sum(blackhole_gateway_requests_total{plugin="{{plugin}}",code="200"})'
    controller.write("kv", blue_green.format(query=answered, limit="min: 1"))
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv 1.0.0 Ready")
    server = Prometheus(tmp_path, controller.gateway("metrics"), address=address)
    try:
        for _ in range(5):
            assert controller.call("kv", "who", {})[0] == 200
        wait_for(
            lambda: server.value(answered.replace("{{plugin}}", "kv")).get("", 0) >= 5,
            what="Prometheus to have the calls",
        )
        controller.write("kv", blue_green.format(query=answered, limit="min: 1"), version="1.1.0")
        wait_for(
            lambda: (controller.status("kv").get("lastSwap") or {}).get("result") == "Promoted",
            timeout=120,
            what="the analysed swap promoted",
        )
        promoted = 'sum(blackhole_swaps_total{plugin="{{plugin}}",result="Promoted"})'
        wait_for(
            lambda: server.value(promoted.replace("{{plugin}}", "kv")).get("", 0) == 1,
            what="Prometheus to have the promotion",
        )
        controller.write("kv", blue_green.format(query=promoted, limit="max: 0"), version="1.2.0")

        def rolled_back() -> dict[str, Any]:
            last = controller.status("kv").get("lastSwap") or {}
            return last if last.get("reason") == "SwapFailedAnalysis" else {}

        last = wait_for(rolled_back, timeout=120, what="the failed analysis to roll back")
        assert "calls (prometheus) failed 1 of 1 measurements" in last["message"]
        assert "values 1, wanted <= 0" in last["message"]
        assert controller.status("kv")["activeVersion"] == "1.1.0"
    finally:
        server.stop()
