"""The start-up CPU boost: an instance may use more CPU than its spec's until it is ready.

A start's imports are then not throttled. The spec's quota is kept in a
label of the container (:data:`LABEL_START_CPU`), so that a restarted
controller still lowers it; once the instance's socket accepts, the backend
applies it (:func:`set_quota`).
"""

from __future__ import annotations

from typing import Any

import docker

from controller import cgroups
from controller.runtimes.container import engine
from controller.spec import models

START_CPU_MILLIS = 2000
"""Default CPU (millicores) of an instance until it is ready."""
LABEL_START_CPU = models.LABEL_PREFIX + "start-cpu-boost"
"""On an instance started with more CPU than its spec's: the spec's CFS quota, in microseconds
per period, to apply once it is ready (a restarted controller reads it back)."""


def boost(options: dict[str, Any], millis: int) -> None:
    """Raise the CPU of the ``container_options`` to ``millis`` where the spec gives it less."""
    quota = cgroups.cpu_quota(millis)
    if quota > options["cpu_quota"]:
        options["labels"][LABEL_START_CPU] = str(options["cpu_quota"])
        options["cpu_quota"] = quota


def set_quota(client: docker.DockerClient, kind: engine.Engine, name: str, quota: int) -> None:
    """Lower a started instance's CPU to its spec's (``quota`` per CFS period)."""
    period = cgroups.CPU_PERIOD_US
    if kind is engine.Engine.PODMAN:  # its Docker-compatible API has no update
        api = client.api
        url = f"{api.base_url}/v4.0.0/libpod/containers/{name}/update"
        resources = {"cpu": {"quota": quota, "period": period}}
        api._raise_for_status(api._post_json(url, data=resources))  # type: ignore[attr-defined]
    else:
        client.api.update_container(name, cpu_quota=quota, cpu_period=period)
