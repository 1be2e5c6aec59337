"""Replicas of a stateless plugin under a real controller and its gateway, on Docker and Podman.

Three replicas of one color share the calls; one of them killed is restarted alone while
the gateway sends its calls to the other two, failing none; then a blue/green swap
starts three of the new version, flips to them once all three are Ready, and fails no
call either.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from controller.runtimes import base
from controller.spec import models

from .conftest import ControllerProcess, bhctl, wait_for

log = logging.getLogger(__name__)

REPLICAS = """\
  replicas: 3
  gateway: {maxConcurrentCalls: 1000}
  restart: {backoffSeconds: 1}
  hotSwap: {scaleDownDelaySeconds: 2}
"""


@dataclass
class Load:
    """Calls ``kv.who`` through the gateway from a few threads: who answered each call."""

    controller: ControllerProcess
    threads: int = 6
    answers: list[tuple[float, str, str]] = field(default_factory=list)
    """(start, version, host) of each call answered."""
    failures: list[tuple[float, int, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            status, answer, _ = self.controller.call("kv", "who", {})
            with self._lock:
                if status == 200:
                    self.answers.append((began, answer["version"], answer["host"]))
                else:
                    self.failures.append((began, status, answer))
            time.sleep(0.005)

    def window(self, calls: int, timeout: float = 120) -> list[tuple[str, str]]:
        """(version, host) of the next ``calls`` answered calls."""
        start = time.monotonic()

        def seen() -> list[tuple[str, str]]:
            with self._lock:
                return [(v, h) for at, v, h in self.answers if at >= start]

        wait_for(lambda: len(seen()) >= calls, timeout, f"{calls} calls")
        return seen()

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


def names(controller: ControllerProcess, color: models.Color) -> list[str]:
    return [
        base.instance_name("kv", color, None, controller.controller_id, replica)
        for replica in range(3)
    ]


def all_ready(controller: ControllerProcess, version: str) -> bool:
    status = controller.status("kv")
    active = status.get("activeColor")
    records = [i for i in status.get("instances", []) if i["color"] == active]
    return (
        status.get("swap") is None
        and status.get("activeVersion") == version
        and len(records) == 3
        and all(i["ready"] for i in records)
    )


def ids(controller: ControllerProcess, names: list[str]) -> dict[str, str]:
    assert controller.engine is not None
    api = controller.engine.client.api
    return {name: api.inspect_container(name)["Id"] for name in names}


def test_replicas_share_calls_one_is_restarted_alone_and_all_are_swapped(controller):
    controller.write("kv", REPLICAS)
    controller.start()
    wait_for(lambda: all_ready(controller, "1.0.0"), timeout=120, what="3 replicas Ready")
    blue = names(controller, models.Color.BLUE)
    assert sorted(controller.containers()) == sorted(blue)
    listed = bhctl(controller, "get", "kv")
    assert "3/3" in listed.stdout, listed.stdout
    with Load.running(controller) as load:
        spread = collections.Counter(host for _, host in load.window(600))
        log.info("600 calls over 3 replicas: %s", sorted(spread.values()))
        assert len(spread) == 3, spread
        assert min(spread.values()) > 600 / 3 * 0.5, f"calls spread over all 3: {spread}"

        before = ids(controller, blue)
        assert controller.engine is not None
        killed = time.monotonic()
        controller.engine.kill_main_process(blue[1])
        wait_for(
            lambda: (
                [i.get("restarts", 0) for i in controller.status("kv")["instances"]] == [0, 1, 0]
                and all_ready(controller, "1.0.0")
            ),
            timeout=120,
            what=f"{blue[1]} restarted and Ready",
        )
        log.info("killed replica Ready again after %.1fs", time.monotonic() - killed)
        after = ids(controller, blue)
        assert after[blue[0]] == before[blue[0]]
        assert after[blue[2]] == before[blue[2]], "the others were not touched"
        assert after[blue[1]] != before[blue[1]]
        hosts = {host for _, host in load.window(300)}
        assert len(hosts) == 3, "the restarted replica takes calls again"
        assert load.failures == [], "no call failed while a replica was down"

        controller.write("kv", REPLICAS, version="1.1.0")
        wait_for(lambda: all_ready(controller, "1.1.0"), timeout=180, what="3 replicas of 1.1.0")
        green = names(controller, models.Color.GREEN)
        wait_for(
            lambda: sorted(controller.containers()) == sorted(green),
            timeout=60,
            what="blue removed after the scale-down delay",
        )
        served = load.window(600)
        assert {version for version, _ in served} == {"1.1.0"}
        assert len({host for _, host in served}) == 3
    assert load.failures == [], "no call failed in the swap"
    log.info("%d calls answered, none failed", len(load.answers))
