"""The warm standby of a plugin's active instance (``spec.restart.standby``).

A second instance of the active color and spec is started beside the active
one once that is Ready, frozen as soon as its socket accepts (its imports
and start-up done), and kept so. When the active instance crashes and is
due for its restart, the standby is promoted in its place (it takes the
crashed instance's name and endpoint and is thawed) instead of a cold
start: only the handshake, the health check and the restore of the last
checkpoint are left. A new standby is started once the promoted one is
Ready.

A standby is only ever promoted into the color and spec it was started
for, and it receives no state before that: the checkpoint restored into it
is its color's, as for any restarted instance. One of another color or
spec, a dead one, and any standby of a plugin whose spec no longer asks for
one, are removed.
"""

from __future__ import annotations

import dataclasses
import logging

from controller.errors import InstanceNotFoundError
from controller.runtimes import base
from controller.spec import models
from controller.swap import context

log = logging.getLogger(__name__)


class Standby:
    """The standby of one pass's plugin."""

    def __init__(self, ctx: context.PassContext, services: context.Services) -> None:
        self.c = ctx
        self.s = services

    @property
    def runtime(self) -> base.Standbys | None:
        """The runtime, where it keeps standbys and the spec asks for one; else None
        (always for a remote plugin: it runs elsewhere)."""
        if not self.c.spec.restart.standby or self.c.spec.remote is not None:
            return None
        return base.standbys_of(self.s.runtime)

    def want(self, color: models.Color) -> base.InstanceSpec:
        return dataclasses.replace(self.c.want_for(color), standby=True)

    async def _find(self, name: str) -> base.Instance | None:
        try:
            return await self.s.runtime.inspect(name)
        except InstanceNotFoundError:
            return None

    async def keep(self, active: base.Instance) -> None:
        """Beside a Ready ``active`` instance: its standby started, frozen once it accepts.

        Standbys of the other color, and every standby when the spec asks
        for none (or the runtime keeps none), are removed.
        """
        c = self.c
        runtime = self.runtime
        known = c.status.standby
        promoted = known.promoted if known is not None else 0
        if runtime is None:  # only one the status knows of: no calls for plugins without
            if known is not None:
                await self._remove(known.name)
            c.status.standby = None
            return
        for color in models.Color:
            if color is not active.color:
                await self._remove(self.want(color).name)
        want = self.want(active.color)
        found = await self._find(want.name)
        if found is not None and (
            found.spec_hash != want.spec_hash
            or found.color is not active.color
            or found.state not in (base.InstanceState.RUNNING, base.InstanceState.PAUSED)
        ):
            log.info("removing standby %s: not of the active spec or not alive", found.name)
            await self._remove(found.name)
            found = None
        if found is None:
            await self.s.runtime.start(want)
            state = models.StandbyState.STARTING
        elif found.state is base.InstanceState.PAUSED:
            state = models.StandbyState.FROZEN
        elif await self.s.runtime.ready(found, float(c.spec.health.timeout_seconds)):
            await runtime.freeze(found.name)
            state = models.StandbyState.FROZEN
        else:
            state = models.StandbyState.STARTING  # its socket's appearing queues the plugin
        c.status.standby = models.StandbyStatus(
            name=want.name,
            color=active.color,
            version=str(c.spec.version),
            state=state,
            promoted=promoted,
        )

    async def frozen(self, crashed: base.Instance) -> base.Instance | None:
        """The frozen standby of ``crashed``'s color and spec, to take its place; None when
        there is none."""
        if self.runtime is None:
            return None
        found = await self._find(self.want(crashed.color).name)
        if (
            found is None
            or found.state is not base.InstanceState.PAUSED
            or found.color is not crashed.color
            or found.spec_hash != self.c.want_for(crashed.color).spec_hash
        ):
            return None
        return found

    async def thaw(self, standby: base.Instance) -> None:
        assert self.runtime is not None
        await self.runtime.thaw(standby.name)

    async def promote(self, standby: base.Instance, crashed: base.Instance) -> base.Instance:
        """The thawed ``standby`` in the place of ``crashed`` (removed already)."""
        assert self.runtime is not None
        promoted = await self.runtime.promote(standby.name, crashed.name)
        previous = self.c.status.standby
        self.c.status.standby = models.StandbyStatus(
            name=standby.name,
            color=standby.color,
            version=standby.version,
            state=models.StandbyState.PROMOTED,
            promoted=(previous.promoted if previous is not None else 0) + 1,
        )
        return promoted

    async def _remove(self, name: str) -> None:
        if await self._find(name) is not None:
            await self.s.runtime.remove(name)


async def remove_all(
    runtime: base.Runtime, plugin: str, namespace: str | None, controller_id: str
) -> None:
    """Remove the standbys of every color of a plugin being deleted."""
    for color in models.Color:
        name = base.instance_name(plugin, color, namespace, controller_id)
        await runtime.remove(base.standby_name(name))
