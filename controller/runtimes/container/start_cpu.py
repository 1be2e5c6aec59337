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
from controller.runtimes import base
from controller.runtimes.container import engine

START_CPU_MILLIS = base.START_CPU_MILLIS
"""Default CPU (millicores) of an instance until it is ready."""
LABEL_START_CPU = base.LABEL_QUOTA_WHEN_READY


def boost(options: dict[str, Any], millis: int | None) -> None:
    """Raise the CPU of the ``container_options`` to ``millis`` (see
    :func:`base.start_cpu_millis`; None: no boost)."""
    if millis is None:
        return
    quota = cgroups.cpu_quota(millis)
    if quota > options["cpu_quota"]:
        options["labels"][LABEL_START_CPU] = str(options["cpu_quota"])
        options["labels"][base.LABEL_START_CPU] = str(millis)
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
