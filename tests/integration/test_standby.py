"""Docker and Podman: a warm standby (spec.restart.standby) takes a killed instance's place.

The standby is a container started beside the active one and paused once its
socket accepts; the test kills the active container's main process and
checks that the container now serving under the active name is that very
standby (its id), thawed, with the killed instance's checkpointed state, and
that a new standby is frozen after. How fast that is: ``bench/startup.py
--crash``.
"""

from __future__ import annotations

import time
from typing import Any

from controller.runtimes import base
from controller.spec import models

from .conftest import ControllerProcess, wait_for
from .test_live_state import checkpointed_after

BODY = """\
  state: {version: 1, checkpointSeconds: 1}
  restart: {backoffSeconds: 0.2, standby: true}
  env: {STATE_VERSION: '1'}
"""


def frozen(controller: ControllerProcess, name: str) -> dict[str, Any]:
    standby = controller.status(name).get("standby") or {}
    if standby.get("state") != "Frozen":
        return {}
    assert controller.engine is not None
    attrs = controller.engine.client.api.inspect_container(standby["name"])
    return dict(attrs) if attrs["State"]["Paused"] else {}


def test_a_killed_instance_is_replaced_by_its_frozen_standby_with_its_state(controller):
    controller.write("warm", BODY)
    controller.start()
    wait_for(lambda: controller.ready("warm"), what="warm Ready")
    standby = wait_for(lambda: frozen(controller, "warm"), what="a frozen standby")
    active = base.instance_name("warm", models.Color.BLUE, None, controller.controller_id)
    assert standby["Name"].lstrip("/") == base.standby_name(active)
    assert standby["Config"]["Labels"][base.LABEL_COLOR] == "blue"
    status, _, _ = controller.call("warm", "put", {"key": "k", "value": "kept"})
    assert status == 200
    checkpointed_after(controller, "warm", time.time())

    assert controller.engine is not None
    controller.engine.kill_main_process(active)

    def restarted() -> bool:
        instances = controller.status("warm").get("instances", [])
        return controller.ready("warm") and bool(instances[0]["restarts"] == 1)

    wait_for(restarted, what="warm restarted once and Ready")
    serving = controller.engine.client.api.inspect_container(active)
    assert serving["Id"] == standby["Id"], "the standby took the killed instance's place"
    assert serving["State"]["Running"]
    assert not serving["State"]["Paused"]
    assert controller.call("warm", "get", {"key": "k"})[1] == {"value": "kept"}
    reasons = {e["reason"]: e["message"] for e in controller.admin.get("warm")["events"]}
    assert "from its standby" in reasons["Restarted"]

    replacement = wait_for(lambda: frozen(controller, "warm"), what="a new frozen standby")
    assert replacement["Id"] not in (standby["Id"], serving["Id"])
    assert controller.status("warm")["standby"]["promoted"] == 1
