"""Dependencies between plugins on real engines: start order, and Ready only after their own."""

from __future__ import annotations

import time
from datetime import datetime

from controller.runtimes import base
from controller.spec import models

from .conftest import ControllerProcess


def _started(controller: ControllerProcess, plugin: str) -> datetime:
    name = base.instance_name(plugin, models.Color.BLUE, None, controller.controller_id)
    assert controller.engine is not None  # a container engine, not processes
    text = controller.engine.client.api.inspect_container(name)["State"]["StartedAt"]
    return datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00")


def test_a_chain_applied_together_starts_c_then_b_then_a(controller: ControllerProcess) -> None:
    controller.write("app", '  dependsOn: [{name: api, version: "^1"}]\n')
    controller.write("api", "  dependsOn: [{name: db}]\n")
    controller.write("db", "")
    controller.start()
    seen: list[tuple[bool, bool, bool]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ready = (controller.ready("app"), controller.ready("api"), controller.ready("db"))
        seen.append(ready)
        if all(ready):
            break
        time.sleep(0.02)
    assert seen[-1] == (True, True, True), f"not all Ready: {controller.plugins()}"
    for app, api, db in seen:
        assert not app or api, "app was Ready before api"
        assert not api or db, "api was Ready before db"
    assert _started(controller, "db") < _started(controller, "api") < _started(controller, "app")
    app_ready = controller.condition("app", "Ready")["lastTransitionTime"]
    api_ready = controller.condition("api", "Ready")["lastTransitionTime"]
    assert api_ready <= app_ready
    waited = [
        e for e in controller.admin.get("app")["events"] if e["reason"] == "DependencyNotReady"
    ]
    assert waited, controller.admin.get("app")["events"]
