"""One instance's life, a step at a time: start, probe until Ready, health-check, restart.

Crashes are handled here, not by the engine's restart policy, so that they
are seen and counted: a dead instance is restarted after an exponential
backoff; past ``restart.maxRestarts`` within ``restart.windowSeconds`` the
plugin is Degraded with reason CrashLoop, its exit code and last log lines,
and is left stopped until its oldest restart leaves the window or its spec
changes. Where the platform restarts a crashed instance by itself (a
kubelet, with its own back-off), its exits are counted from what the
platform reports (``Instance.crashes``) against the same limit, and the
instance is left to it: nothing is recreated. Each step says what it found on the pass's context
(:meth:`~controller.swap.context.PassContext.found`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import NoReturn

from controller.errors import ControllerError, IncompatiblePluginError, PermanentError
from controller.metrics import violations as violations_module
from controller.reconcile.checkpoints import Checkpoints
from controller.reconcile.standby import Standby
from controller.reconcile.workers import Result
from controller.runtimes import base
from controller.spec import conditions
from controller.swap import context

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
"""Seconds an instance being replaced gets to exit after SIGTERM."""


class Lifecycle:
    """The active instance of the plugin of one pass."""

    def __init__(
        self,
        ctx: context.PassContext,
        services: context.Services,
        effects: context.Effects,
        violations: violations_module.Violations,
    ) -> None:
        self.c = ctx
        self.s = services
        self.e = effects
        self.violations = violations
        self.checkpoints = Checkpoints(ctx, services, effects)
        self.standby = Standby(ctx, services)

    @property
    def want(self) -> base.InstanceSpec:
        """What the active color should run (the pass's spec may change, e.g. by undo)."""
        return self.c.want_for(self.c.color)

    async def converge(self, current: base.Instance | None) -> Result:
        c = self.c
        record = c.instance_status(self.want.color)
        if current is None:
            return await self.start("Created", f"started {self.want.name} ({c.spec.version})")
        if current.spec_hash != self.want.spec_hash:
            self.s.routes.clear_route(c.key)
            if current.state is base.InstanceState.RUNNING and record.ready:
                await self.checkpoints.last(current)  # its replacement gets the state back
            await self.s.runtime.stop(current.name, STOP_TIMEOUT)
            await self.e.remove(current)
            record.restarts = 0
            record.last_exit_code = None
            record.oom_killed = False
            change = (
                f"version {current.version} -> {c.spec.version}"
                if current.version != str(c.spec.version)
                else "spec changed"
            )
            return await self.start(
                "Replaced", f"replaced {self.want.name} (stop, then start): {change}"
            )
        counted = await self._platform_restarts(current)
        if counted is not None:
            return counted
        if current.state is base.InstanceState.EXITED and current.restarting:
            return self._restarting(current)
        if current.state is base.InstanceState.CREATED:
            await self.e.remove(current)  # a start cut short, e.g. by a crash of ours
            return await self.start("Created", f"started {self.want.name} ({c.spec.version})")
        if current.state not in (base.InstanceState.RUNNING, base.InstanceState.PAUSED):
            self.s.routes.clear_route(c.key)
            return await self._crashed(current)
        return await self._probe(current)  # a paused one fails its health checks

    async def start(self, reason: str, message: str) -> Result:
        await self.e.start(self.want)
        await self._started(reason, message)
        return Result(requeue_after=self.c.memory.next_probe(self.want.name))

    async def _started(self, reason: str, message: str) -> None:
        """What a start of the active instance resets and tells."""
        c = self.c
        c.memory.probe_delay.pop(self.want.name, None)
        c.memory.health_failures = 0
        c.status.active_color = self.want.color
        c.status.active_version = str(c.spec.version)
        record = c.instance_status(self.want.color)
        record.state = base.InstanceState.RUNNING.value
        record.ready = False
        record.version = str(c.spec.version)
        record.start_cpu = None  # a new instance: known once observed
        await self.e.event("Normal", reason, message)
        c.found(
            "False",
            "InstanceStarting",
            f"{self.want.name} is starting",
            progressing=(reason if reason != "Created" else "InstanceStarting", message),
        )

    async def hold_back(self, current: base.Instance) -> Result:
        """Keep an old instance whose spec is not known serving: health checks, no handshake.

        Its handshake would be checked against the refused spec; and a crash
        of it has nothing to restart but that spec, which converge then does.
        """
        c = self.c
        record = c.instance_status(current.color)
        if current.state is not base.InstanceState.RUNNING:
            return await self.converge(current)
        health = c.spec.health
        endpoint = self.s.runtime.endpoint(current)
        record.state = current.state.value
        record.ready = await self.s.plugins.healthy(endpoint, float(health.timeout_seconds))
        if record.ready:
            self.s.routes.set_route(c.key, endpoint, current.name, c.spec)
            c.found("True", "InstanceReady", f"{current.name} answers its health check")
        else:
            self.s.routes.clear_route(c.key)
            c.found("False", "Unhealthy", f"{current.name} fails its health check")
        return Result(requeue_after=float(health.period_seconds))

    def _backoff_left(self, current: base.Instance, restarts: int) -> float:
        """Seconds until a crashed instance may be restarted (exponential backoff)."""
        restart = self.c.spec.restart
        delay = min(restart.max_backoff_seconds, restart.backoff_seconds * 2.0**restarts)
        finished = current.finished_at.timestamp() if current.finished_at else self.c.now
        return finished + delay - self.c.now

    async def _crashed(self, current: base.Instance) -> Result:
        c = self.c
        record = c.instance_status(current.color)
        if (
            not current.oom_killed
            and current.exit_code == 137
            and "OOMKilled" in self.violations.current(c.key)
        ):  # the kernel said so, though the engine did not (Podman on cgroup v1)
            current = dataclasses.replace(current, oom_killed=True)
        restart = c.spec.restart
        record.state = current.state.value
        record.ready = False
        held = c.memory.crash_held == current.id
        if held:  # stopped by us for a crash loop whose exits are all counted: no new one
            how = f"exit code {record.last_exit_code}" + (
                " (OOM killed)" if record.oom_killed else ""
            )
            return await self._crash_loop_held(current, how)
        how = f"exit code {current.exit_code}" + (" (OOM killed)" if current.oom_killed else "")
        record.last_exit_code = current.exit_code
        record.oom_killed = current.oom_killed
        if current.oom_killed:
            self.violations.oom_killed(
                c.key,
                f"{current.name} was killed for memory (limit {c.spec.resources.memory}); "
                "raise spec.resources.memory or find what grows",
            )
        history = c.memory.restarts
        while history and history[0] <= c.now - restart.window_seconds:
            history.popleft()
        looping = len(history) >= restart.max_restarts
        wait = self._backoff_left(current, len(history))
        if (looping or wait > 0) and self.s.runtime.capabilities().restarts_crashed:
            # Held down: where the platform would restart it by itself, stop it.
            await self.s.runtime.stop(current.name, STOP_TIMEOUT)
        if looping:
            return await self._crash_loop(current, len(history) + 1, how)
        if wait > 0:
            said = f"{current.name} {how}; restarting in {wait:.1f}s"
            c.found(
                "False",
                "BackOff",
                said,
                progressing=("BackOff", f"restarting {current.name} in {wait:.1f}s"),
                degraded=("BackOff", said) if history else None,
            )
            return Result(requeue_after=wait)
        frozen = await self.standby.frozen(current)
        thawing = asyncio.ensure_future(self.standby.thaw(frozen)) if frozen else None
        try:  # the standby thaws meanwhile
            lines = await self.e.last_logs(current.name)
            await self.e.remove(current)
        finally:
            if thawing is not None:
                await thawing
        promoted = await self.standby.promote(frozen, current) if frozen else None
        history.append(c.now)
        self.s.metrics.restarts.labels(c.key).inc()
        self.violations.restarted(c.key)
        restarts = record.restarts + 1
        said = f"after {how} (restart {restarts}); last log lines:\n{lines}"
        if promoted is None:
            result = await self.start("Restarted", f"restarted {current.name} {said}")
        else:
            await self._started("Restarted", f"restarted {current.name} from its standby {said}")
        record = c.instance_status(self.want.color)
        record.restarts = restarts
        record.last_exit_code = current.exit_code
        record.oom_killed = current.oom_killed
        if promoted is not None:  # started long ago: Ready as soon as it answers, this pass
            c.memory.handshaken.discard(promoted.id)
            return await self._probe(promoted, since=c.now)
        return result

    async def _crash_loop_held(self, current: base.Instance, how: str) -> Result:
        """The instance a crash loop of platform restarts stopped: held until the window
        lets a restart in (made then, as after any crash), or the spec changes."""
        c = self.c
        history = c.memory.restarts
        while history and history[0] <= c.now - c.spec.restart.window_seconds:
            history.popleft()
        if len(history) > c.spec.restart.max_restarts:
            return await self._crash_loop(current, len(history), how)
        c.memory.crash_held = None
        lines = await self.e.last_logs(current.name)
        await self.e.remove(current)
        history.append(c.now)
        self.s.metrics.restarts.labels(c.key).inc()
        self.violations.restarted(c.key)
        restarts = c.instance_status(current.color).restarts + 1
        result = await self.start(
            "Restarted",
            f"restarted {current.name} after its crash loop ({how}; restart {restarts}); "
            f"last log lines:\n{lines}",
        )
        c.instance_status(self.want.color).restarts = restarts
        return result

    async def _crash_loop(self, current: base.Instance, crashes: int, how: str) -> Result:
        c = self.c
        restart = c.spec.restart
        history = c.memory.restarts
        lines = await self.e.last_logs(current.name)
        message = (
            f"{current.name} crashed {crashes} times within "
            f"{restart.window_seconds}s (maxRestarts {restart.max_restarts}); last "
            f"{how}; not restarting until the spec changes or the window passes. "
            f"Last log lines:\n{lines}"
        )
        before = conditions.find(c.old.conditions, conditions.DEGRADED)
        if before is None or before.status != "True" or before.reason != "CrashLoop":
            await self.e.event("Warning", "CrashLoop", message)
        c.found("False", "CrashLoop", message, degraded=("CrashLoop", message))
        retry = history[0] + restart.window_seconds - c.now if history else None
        return Result(requeue_after=retry)

    async def _platform_restarts(self, current: base.Instance) -> Result | None:
        """Count the exits the platform restarts ``current`` from by itself.

        Each new one is a restart against ``restart.maxRestarts`` (the
        instance shakes hands again and gets its checkpoint back once Ready);
        past the limit it is stopped and the plugin is in CrashLoop (the
        result), else None and the pass goes on.
        """
        c = self.c
        counted = c.memory.crashes_counted.get(current.id)
        if counted is None:
            counted = current.crashes  # first seen by this process: counted by whoever saw them
        elif current.crashes < counted:
            counted = 0  # a new pod of the same Deployment: its count starts over
        c.memory.crashes_counted[current.id] = current.crashes
        new = current.crashes - counted
        if new <= 0:
            return None
        record = c.instance_status(current.color)
        restart = c.spec.restart
        how = f"exit code {current.exit_code}" + (" (OOM killed)" if current.oom_killed else "")
        self.s.routes.clear_route(c.key)
        c.memory.handshaken.discard(current.id)  # a new process: it shakes hands again
        c.memory.probe_delay.pop(current.name, None)
        record.ready = False
        record.restarts += new
        record.last_exit_code = current.exit_code
        record.oom_killed = current.oom_killed
        if current.oom_killed:
            self.violations.oom_killed(
                c.key,
                f"{current.name} was killed for memory (limit {c.spec.resources.memory}); "
                "raise spec.resources.memory or find what grows",
            )
        history = c.memory.restarts
        while history and history[0] <= c.now - restart.window_seconds:
            history.popleft()
        for _ in range(new):
            history.append(c.now)
            self.s.metrics.restarts.labels(c.key).inc()
            self.violations.restarted(c.key)
        if len(history) > restart.max_restarts:
            await self.s.runtime.stop(current.name, STOP_TIMEOUT)
            c.memory.crash_held = current.id
            return await self._crash_loop(current, len(history), how)
        lines = await self.e.last_logs(current.name)
        await self.e.event(
            "Normal",
            "Restarted",
            f"{current.name} {how}, restarted by the platform (restart {record.restarts}); "
            f"last log lines:\n{lines}",
        )
        return None

    def _restarting(self, current: base.Instance) -> Result:
        """An exited instance the platform starts again after its back-off: left to it."""
        c = self.c
        record = c.instance_status(current.color)
        self.s.routes.clear_route(c.key)
        record.state = current.state.value
        record.ready = False
        how = f"exit code {current.exit_code}" + (" (OOM killed)" if current.oom_killed else "")
        said = f"{current.name} exited ({how}); the platform restarts it after its back-off"
        c.found(
            "False",
            "BackOff",
            said,
            progressing=("BackOff", said),
            degraded=("BackOff", said),
        )
        return Result(requeue_after=float(c.spec.health.period_seconds))

    async def _probe(self, current: base.Instance, since: float | None = None) -> Result:
        """Probe ``current``; ``since``: when it was started, if not when the runtime says
        (a promoted standby was started long before it took over)."""
        c = self.c
        record = c.instance_status(current.color)
        health = c.spec.health
        timeout = float(health.timeout_seconds)
        endpoint = self.s.runtime.endpoint(current)
        plugins = self.s.plugins
        accepting = True
        if record.ready and current.id in c.memory.handshaken:
            ready = await plugins.healthy(endpoint, timeout)
            if not ready:  # left draining by a swap that could not resume it? Resume it.
                with contextlib.suppress(ControllerError):
                    await plugins.drain(endpoint, timeout, resume=True)
                    ready = await plugins.healthy(endpoint, timeout)
        else:
            accepting = await self.s.runtime.ready(current, timeout)
            ready = accepting and await self._handshake(current, endpoint, timeout)
        record.state = current.state.value
        record.start_cpu = base.start_cpu_of(current)
        if ready and not record.ready and not await self.checkpoints.restore(current, endpoint):
            return Result(requeue_after=c.memory.next_probe(current.name))  # state not back yet
        if ready:
            self.s.routes.set_route(c.key, endpoint, current.name, c.spec)
            c.status.active_color = current.color
            c.status.active_version = current.version
            c.memory.health_failures = 0
            c.memory.probe_delay.pop(current.name, None)
            became_ready = not record.ready
            if became_ready:
                started = current.started_at.timestamp() if current.started_at else c.now
                started = started if since is None else since
                await self.e.event(
                    "Normal",
                    "Ready",
                    f"{current.name} is Ready ({c.now - started:.2f}s after start)",
                )
            record.ready = True
            c.found("True", "InstanceReady", f"{current.name} answers its health check")
            after = await self.checkpoints.checkpoint(current, endpoint)
            if became_ready and self.standby.runtime is not None:
                return Result(requeue_after=0.0)  # its standby next pass: this one says Ready
            await self.standby.keep(current)
            return Result(requeue_after=after)
        if not record.ready:  # still starting
            started = current.started_at.timestamp() if current.started_at else c.now
            if current.waiting and c.now - started < health.startup_deadline_seconds:
                return await self._waiting(current)
            if c.now - started < health.startup_deadline_seconds:
                c.found(
                    "False",
                    "InstanceStarting",
                    f"{current.name} is starting",
                    progressing=("InstanceStarting", f"waiting for {current.name} to be Ready"),
                )
                delay = c.memory.next_probe(current.name)
                if not accepting and self.s.runtime.capabilities().announces_sockets:
                    delay = max(delay, context.SOCKET_FALLBACK_PROBE)  # its socket says sooner
                return Result(requeue_after=delay)
            waited = f" ({current.waiting}: {current.waiting_message})" if current.waiting else ""
            return await self._unhealthy(
                current,
                f"{current.name} was not Ready within startupDeadlineSeconds "
                f"({health.startup_deadline_seconds}s){waited}",
            )
        self.s.routes.clear_route(c.key)
        c.memory.health_failures += 1
        paused = current.state is base.InstanceState.PAUSED
        failed = f"{current.name} failed {c.memory.health_failures} health check(s) in a row" + (
            " (the engine says it is paused)" if paused else ""
        )
        if c.memory.health_failures < health.failure_threshold:
            c.found(
                "False",
                "HealthCheckFailed",
                f"{failed}; restarted at failureThreshold ({health.failure_threshold})",
            )
            return Result(requeue_after=float(health.period_seconds))
        return await self._unhealthy(current, failed)

    async def _waiting(self, current: base.Instance) -> Result:
        """An instance the platform has not run yet: scheduling and pulling are reported
        as such and do not count against the startup deadline; a failed wait (an image
        that cannot be pulled) is Degraded and counts from when the instance was made."""
        c = self.c
        failed = current.started_at is not None
        said = f"{current.name} does not run yet: {current.waiting}" + (
            f" ({current.waiting_message})" if current.waiting_message else ""
        )
        if not failed:
            said += "; the startup deadline counts from when it runs"
        if c.memory.waiting_said.get(current.name) != current.waiting:
            c.memory.waiting_said[current.name] = current.waiting
            await self.e.event("Warning" if failed else "Normal", current.waiting, said)
        c.found(
            "False",
            current.waiting,
            said,
            progressing=(current.waiting, said),
            degraded=(current.waiting, said) if failed else None,
        )
        return Result(requeue_after=float(c.spec.health.period_seconds))

    async def _handshake(self, current: base.Instance, endpoint: str, timeout: float) -> bool:
        """Initialize the instance (idempotent) and check what it says; True when it is healthy.

        A plugin that speaks another protocol version, or whose state
        version is not the spec's, can never work: it is removed and the
        plugin is Failed until its spec changes.
        """
        c = self.c
        try:
            handshake = await self.s.plugins.handshake(endpoint, self.want, timeout)
        except IncompatiblePluginError as e:
            await self._refuse(current, e.reason, str(e))
        except ControllerError as e:
            log.debug("handshake with %s failed: %s", current.name, e, extra=c.log)
            return False
        expected = c.spec.state.version if c.spec.state else 0
        if handshake.state_version != expected:
            await self._refuse(
                current,
                "StateVersionMismatch",
                f"{current.name} reads and writes state version {handshake.state_version}, "
                f"but spec.state.version is {expected or 'not set (no state)'}",
            )
        record = c.instance_status(current.color)
        if record.ready and handshake.initializations == 1:
            # Recorded Ready, yet a process that never shook hands: replaced while no one
            # watched (a pod of the same Deployment). It has none of the state: restore it.
            log.warning(
                "%s was Ready but answers as a new process: its checkpoint is restored",
                current.name,
                extra=c.log,
            )
            record.ready = False
        c.memory.handshaken.add(current.id)
        return await self.s.plugins.healthy(endpoint, timeout)

    async def _refuse(self, current: base.Instance, reason: str, message: str) -> NoReturn:
        c = self.c
        c.memory.refused = (self.want.spec_hash, reason, message)
        await self.e.remove(current)
        await self.e.event("Warning", reason, message)
        c.found("False", reason, message, degraded=(reason, message), stalled=True)
        c.status.instances = []
        raise PermanentError(f"{c.key}: {message}")

    async def _unhealthy(self, current: base.Instance, why: str) -> Result:
        await self.e.event("Warning", "Unhealthy", why)
        await self.s.runtime.stop(current.name, STOP_TIMEOUT)
        self.c.instance_status(current.color).ready = False
        stopped = await self.s.runtime.inspect(current.name)
        return await self._crashed(stopped)
