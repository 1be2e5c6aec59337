"""A plugin that links its socket's name to another plugin's socket, on any runtime.

Shared by the engine tests and the process runtime's: the tampering plugin
must be refused, with the reason in an event and in its Ready condition,
and no call meant for it may reach the other plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from controller.runtimes import base
from controller.spec import models

from .conftest import ControllerProcess, wait_for


def check_a_linked_socket_is_refused(
    controller: ControllerProcess, write: Callable[[str, str], object]
) -> None:
    """``write(name, env)`` declares plugin ``name`` with the test plugin's ``env`` (YAML)."""
    controller.start()
    write("victim", "")
    wait_for(lambda: controller.ready("victim"), what="victim Ready")
    assert controller.call("victim", "put", {"key": "secret", "value": "victim's"})[0] == 200
    victim = base.instance_name("victim", models.Color.BLUE, None, controller.controller_id)
    write("tamper", f"{{MODE: tamper, VICTIM: {victim}}}")

    def refused() -> bool:
        ready = controller.condition("tamper", "Ready")
        return ready.get("reason") == "SocketTampered" or controller.ready("tamper")

    wait_for(refused, timeout=60, what="tamper refused")
    ready = controller.condition("tamper", "Ready")
    assert ready["status"] == "False", "a plugin whose socket is a link is never Ready"
    assert "link" in ready["message"]
    events = controller.admin.get("tamper")["events"]
    assert any(e["reason"] == "SocketTampered" and e["type"] == "Warning" for e in events)
    status, answer, _ = controller.call("tamper", "get", {"key": "secret"})
    assert status != 200, answer
    assert "victim's" not in str(answer)
    assert controller.call("victim", "get", {"key": "secret"})[:2] == (200, {"value": "victim's"})
