"""The gateway in its own process outlives the controller, on Docker and on Podman.

A controller killed with SIGKILL leaves its gateway answering; one killed
while a swap holds calls leaves them released to the old color, each
answered; the next controller adopts the same gateway and sends it the
table it rebuilt from its store.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket

from controller.cli import gateway as gateway_process
from controller.gateway.control import GatewayUnavailableError
from tests.integration.conftest import ControllerProcess, wait_for

SWAP = "  hotSwap: {maxPauseMilliseconds: 60000, drainTimeoutSeconds: 60}\n"


def _route(controller: ControllerProcess, name: str) -> str | None:
    """The gateway's route for ``name``; None also while a (new) gateway does not answer yet:
    its pid file is written before its control socket is bound."""
    try:
        status = controller.gateway_status()
    except GatewayUnavailableError:
        return None
    plugin = status["plugins"].get(name) or {}
    return plugin.get("endpoint")


def test_the_gateway_answers_while_the_controller_is_down_and_is_adopted_after(
    controller: ControllerProcess,
) -> None:
    controller.start()
    controller.write("keep")
    wait_for(lambda: controller.ready("keep"), 60, "keep to be Ready")
    assert controller.call("keep", "echo", {"n": 0})[:2] == (200, {"n": 0})
    pid = controller.gateway_pid()
    endpoint = _route(controller, "keep")
    assert pid
    assert endpoint
    controller.kill()
    for n in range(1, 20):  # nothing runs but the gateway and the plugin
        assert controller.call("keep", "echo", {"n": n})[:2] == (200, {"n": n})
    # Make the gateway's table wrong while no controller runs: the next one must not trust it.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(gateway_process.control_socket(controller.data)))
        hello = {"type": "hello", "versions": [1], "role": "controller"}
        table = {"type": "routes", "id": 1, "routes": {}}
        sock.sendall(json.dumps(hello).encode() + b"\n" + json.dumps(table).encode() + b"\n")
        with sock.makefile("rb") as answers:
            assert json.loads(answers.readline())["type"] == "hello"
            assert json.loads(answers.readline())["ok"]
    assert controller.call("keep", "echo", {})[1]["reason"] == "PluginNotFound"
    controller.start()
    wait_for(lambda: _route(controller, "keep") == endpoint, 60, "the route from the store")
    assert controller.gateway_pid() == pid  # adopted, not started again
    assert "adopting the one running" in controller.log_text()
    assert "sent 1 route(s) rebuilt from the store" in controller.log_text()
    assert controller.call("keep", "echo", {"n": 99})[:2] == (200, {"n": 99})


def test_a_controller_killed_while_calls_are_held_leaves_them_to_the_old_route(
    controller: ControllerProcess,
) -> None:
    controller.start()
    controller.write("held", SWAP)
    wait_for(lambda: controller.ready("held"), 60, "held to be Ready")
    blue = _route(controller, "held")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # A slow call in flight on the old color keeps the swap's drain waiting, calls held.
        slow = pool.submit(controller.call, "held", "sleep", {"seconds": 6}, timeout=60)
        wait_for(
            lambda: controller.gateway_status()["plugins"]["held"]["inFlight"] == 1,
            30,
            "the slow call",
        )
        controller.write("held", SWAP, version="2.0.0")
        wait_for(
            lambda: controller.gateway_status()["plugins"]["held"]["holds"] >= 1,
            60,
            "the swap to hold the calls",
        )
        held = [pool.submit(controller.call, "held", "echo", {"n": n}) for n in range(5)]
        wait_for(
            lambda: controller.gateway_status()["plugins"]["held"]["held"] == 5,
            30,
            "five held calls",
        )
        controller.kill()  # mid-hold: its connection closes, the gateway lets them go
        answers = [call.result(timeout=60)[:2] for call in held]
        assert answers == [(200, {"n": n}) for n in range(5)]
        assert slow.result(timeout=60)[:2] == (200, {"slept": 6})
    assert controller.gateway_status()["plugins"]["held"]["holds"] == 0
    assert _route(controller, "held") == blue  # the last committed route: the old color
    controller.start()
    wait_for(
        lambda: controller.ready("held") and controller.status("held").get("swap") is None,
        120,
        "the swap to finish under the next controller",
    )
    assert controller.call("held", "echo", {"n": 7})[:2] == (200, {"n": 7})


def test_a_gateway_that_dies_is_started_again_on_its_ports(controller: ControllerProcess) -> None:
    controller.start()
    controller.write("again")
    wait_for(lambda: controller.ready("again"), 60, "again to be Ready")
    address, pid = controller.gateway(), controller.gateway_pid()
    assert pid
    gateway_process.stop_running(controller.data)
    wait_for(
        lambda: controller.gateway_pid() not in (None, pid), 60, "a new gateway from the controller"
    )
    wait_for(lambda: _route(controller, "again") is not None, 60, "its routes")
    assert controller.gateway() == address
    assert controller.call("again", "echo", {"n": 1})[:2] == (200, {"n": 1})
