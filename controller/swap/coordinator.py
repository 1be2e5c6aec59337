"""The blue/green swap of one plugin, advanced one reconcile pass at a time.

A swap begins when the spec of a Ready plugin changes what its instance is
made of. Its progress lives in the plugin's status (``status.swap``), so a
controller that dies at any step finds it when it starts again:

1. Starting: the other color starts beside the active one and must become
   Ready (handshake, health) within ``startupDeadlineSeconds``, then answer
   the spec's pre-promotion checks; with ``autoPromote: false`` it waits
   for ``bhctl swap promote``.
2. Pre-copy (``hotSwap.stateTransfer: PreCopy``, the default): while the
   old color still serves, its whole state is streamed into the new one,
   then what changed meanwhile, round after round (``preCopyRounds``), until
   the last round's changes are small (``preCopyTargetBytes``). Each round
   is also kept in the snapshot store, as a checkpoint chain.
3. Promoting, in one go: the gateway holds the plugin's new calls; the old
   color drains (its calls in flight reach zero, bounded by
   ``drainTimeoutSeconds``) and freezes; what changed since the last round
   moves as one delta (with FullCopy, or where a plugin keeps no revisions
   or the state versions differ, the whole state, which the new color
   migrates); the status records the new color as active, in one write;
   the route flips and the held calls go to the new color. The time calls
   were held is ``lastSwap.pauseMilliseconds``, promoted or not.
4. Promoted: the old color is kept, frozen, for ``scaleDownDelaySeconds``;
   then it is removed and the swap is done.

A Canary swap (``hotSwap.strategy: Canary``, stateless plugins only) goes
from Starting through its steps instead of waiting for promotion (step
``Canary``): ``setWeight`` has the gateway send that share of the calls to
the new color, ``pause`` waits for its duration or for ``bhctl swap
promote`` (which also goes past an analysis), ``analysis`` measures the new
color. After the last step it is promoted as above; an abort or a failed
analysis at any step returns every call to the old color and removes the
new one once its calls in flight have ended. A BlueGreen swap may be
measured before promotion (``prePromotionAnalysis``, step ``Analyzing``) and
either after it (``postPromotionAnalysis``, within the scale-down window,
which lasts until it passed); :mod:`~controller.swap.analysis` takes the
measurements, one pass at a time.

The spec's webhooks (:mod:`~controller.swap.webhooks`) are called before
promotion (PrePromotion: a no blocks the swap at AwaitingPromotion or rolls
it back), when the scale-down window has passed (PostPromotion: a no rolls
back or keeps both colors) and after a rollback (Rollback: to tell).

Any failure rolls back: the route stays on (or returns to) the old color,
which takes calls again with its state as it was frozen; the new color is
removed; the plugin is Degraded with the reason (``SwapFailedNotReady``,
``SwapFailedChecks``, ``SwapFailedImport``, ``SwapFailedAnalysis``, ``SwapFailedHold`` and
``SwapFailedFlip`` when a gateway does not acknowledge the hold or the flip
in time, ...), and that spec is not tried
again until it changes (its generation: any edit, the swap settings
included) or ``bhctl swap retry``. A controller that died while Promoting rolls back
and tries again; one that died after the flip goes on from Promoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from datetime import UTC, datetime
from typing import Any

from controller.errors import ControllerError, IncompatiblePluginError, PluginCallError
from controller.runtimes import base
from controller.spec import models
from controller.state import snapshots as snapshots_module
from controller.swap import analysis, context, transfer

log = logging.getLogger(__name__)

CRASH_AT_VARIABLE = "BLACKHOLE_SWAP_CRASH_AT"
"""Fault injection for tests: the controller SIGKILLs itself when a swap reaches this point."""
STATE_TIMEOUT = 60.0
"""Longest an export or import of state may take, in seconds."""


class SwapFailure(Exception):
    """A step failed: the swap rolls back with this CamelCase reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _checkpoint(point: str) -> None:
    if os.environ.get(CRASH_AT_VARIABLE) == point:
        log.warning("%s=%s: killing the controller here", CRASH_AT_VARIABLE, point)
        os.kill(os.getpid(), signal.SIGKILL)


def other(color: models.Color) -> models.Color:
    return models.Color.GREEN if color is models.Color.BLUE else models.Color.BLUE


def _matches(answer: Any, expect: Any) -> bool:
    if isinstance(expect, dict):
        return isinstance(answer, dict) and all(
            k in answer and _matches(answer[k], v) for k, v in expect.items()
        )
    return bool(answer == expect)


class Coordinator:
    """Begins and advances the swap of the plugin of one pass."""

    def __init__(
        self, ctx: context.PassContext, services: context.Services, effects: context.Effects
    ) -> None:
        self.c = ctx
        self.s = services
        self.e = effects
        self.held_ms: float | None = None
        """How long calls were held by a promotion that failed."""
        self.moved = 0
        self.held_bytes = 0
        self.held_delta = False
        """Whether what moved while calls were held was a delta (on the last round's revision)."""
        self.transfer = ""

    # Beginning.

    async def begin(self, current: base.Instance) -> tuple[float | None, str]:
        """Start the other color beside ``current``; the requeue delay and what happened."""
        c = self.c
        target = other(current.color)
        want = c.want_for(target)
        for stale in c.observed:
            if stale.color is target:
                await self.e.remove(stale)
        c.status.swap = models.SwapProgress(
            step=models.SwapStep.STARTING,
            from_color=current.color,
            to_color=target,
            from_version=current.version,
            from_hash=current.spec_hash,
            to_version=str(c.spec.version),
            to_hash=want.spec_hash,
            started=datetime.fromtimestamp(c.now, UTC),
        )
        await self.e.start(want)
        await self.e.revision_result(want.spec_hash, "InProgress")
        for replica in range(c.count):
            view = c.of_replica(replica)
            if replica:
                await self.e.start(view.want_for(target))
            record = view.instance_status(target)
            record.version, record.state, record.ready = str(c.spec.version), "running", False
            record.restarts, record.last_exit_code, record.oom_killed = 0, None, False
            record.start_cpu = None  # known once observed
        message = (
            f"swapping {current.version} -> {c.spec.version}: started {want.name} beside "
            f"{current.name}"
        )
        await self.e.event("Normal", "SwapStarted", message)
        self._swapping("SwapStarting", message)
        return c.memory.next_probe(want.name), message

    # Advancing.

    async def advance(self) -> float | None:
        """One step of the swap in progress; the requeue delay (None: none needed).

        Answers the pass's request when it acts on it (abort, undo, promote); one it does
        not act on yet (a promote before the new color is Ready) stays pending.
        """
        c = self.c
        request = c.asked
        progress = c.status.swap
        assert progress is not None
        old = self._instance(progress.from_color)
        new = self._instance(progress.to_color)
        try:
            if progress.step is models.SwapStep.PROMOTED:
                return await self._promoted(progress, old, new, request)
            if progress.step is models.SwapStep.PROMOTING:
                raise SwapFailure(
                    "SwapInterrupted",
                    "the controller stopped while calls were held; the old color serves again "
                    "and the swap starts over",
                )
            if request in ("abort", "undo"):
                c.answered("Done", f"the swap to {progress.to_version} is rolled back")
                raise SwapFailure("SwapAborted", f"aborted by bhctl swap {request}")
            if progress.to_hash != c.want_for(progress.to_color).spec_hash:
                raise SwapFailure(
                    "SwapSuperseded",
                    f"the spec changed again during the swap to {progress.to_version}",
                )
            if old is None or old.state is not base.InstanceState.RUNNING:
                raise SwapFailure(
                    "SwapSourceLost",
                    f"the {progress.from_color.value} instance stopped during the swap",
                )
            if new is None or new.state is base.InstanceState.CREATED:
                if new is not None:
                    await self.e.remove(new)
                await self.e.start(c.want_for(progress.to_color))
                return context.FIRST_PROBE
            if new.state is not base.InstanceState.RUNNING:
                lines = await self.e.last_logs(new.name)
                how = f"exit code {new.exit_code}" + (" (OOM killed)" if new.oom_killed else "")
                raise SwapFailure(
                    "SwapFailedCrashed",
                    f"{new.name} exited before promotion ({how}); last log lines:\n{lines}",
                )
            await self._check_serving(old)
            first_ready = await self._ready(progress, new)
            # The other replicas are probed in the same pass, not only once the first is Ready.
            others_ready = await self._replicas_ready(progress)
            if not first_ready or not others_ready:
                delay = c.memory.next_probe(new.name)
                if new.waiting and new.started_at is None:  # scheduling, pulling: not counted
                    self._swapping(
                        "SwapStarting",
                        f"waiting for {new.name} to run: {new.waiting}"
                        + (f" ({new.waiting_message})" if new.waiting_message else ""),
                    )
                    return delay
                since = progress.started.timestamp()
                if new.started_at is not None:
                    since = max(since, new.started_at.timestamp())
                deadline = c.spec.health.startup_deadline_seconds
                if c.now - since > deadline:
                    waited = f" ({new.waiting}: {new.waiting_message})" if new.waiting else ""
                    raise SwapFailure(
                        "SwapFailedNotReady",
                        f"{new.name} was not Ready within startupDeadlineSeconds "
                        f"({deadline}s){waited}",
                    )
                self._swapping("SwapStarting", f"waiting for {new.name} to be Ready")
                return delay
            c.instance_status(progress.to_color).ready = True
            await self._checks(new)
            self.s.routes.set_preview(c.key, self.s.runtime.endpoint(new))
            waiting, request = await self._before_promotion(progress, new, request)
            if waiting is not None:
                return waiting
            blocked = await self._gate("PrePromotion", progress, can_roll_back=True)
            if blocked is not None:
                if request == "promote":
                    c.answered("Refused", blocked)
                progress.step = models.SwapStep.AWAITING_PROMOTION
                self._swapping("SwapBlockedByWebhook", blocked)
                return float(c.spec.health.period_seconds)
            if request == "promote":
                c.answered("Done", f"{new.name} ({progress.to_version}) is promoted")
            return await self._promote(progress, old, new)
        except SwapFailure as failure:
            return await self._roll_back(progress, old, new, failure)

    async def _before_promotion(
        self, progress: models.SwapProgress, new: base.Instance, request: str | None
    ) -> tuple[float | None, str | None]:
        """The canary's steps, the pre-promotion analysis, the wait for bhctl swap promote:
        the requeue delay while one waits (None: on to the promotion), and the request
        left to answer."""
        c = self.c
        swap = c.spec.hot_swap
        canary = swap.strategy == "Canary"
        if canary:
            delay = await self._canary(progress, new, request)
            if delay is not None:
                return delay, request
            request = c.asked
        elif (
            swap.pre_promotion_analysis
            and not self._analyzed(progress, "PrePromotion")
            and request != "promote"
        ):
            progress.step = models.SwapStep.ANALYZING
            delay = await self._analyze(progress, new, "PrePromotion", swap.pre_promotion_analysis)
            if delay is not None:
                return delay, request
        elif request == "promote":
            self._skip_analysis(progress)
        if not swap.auto_promote and request != "promote" and not canary:
            if progress.step is not models.SwapStep.AWAITING_PROMOTION:
                progress.step = models.SwapStep.AWAITING_PROMOTION
                await self.e.event(
                    "Normal",
                    "SwapAwaitingPromotion",
                    f"{new.name} ({progress.to_version}) is Ready and passed its checks; "
                    f"promote it with bhctl swap promote {c.key}",
                )
            self._swapping("SwapAwaitingPromotion", f"{new.name} waits for bhctl swap promote")
            return float(c.spec.health.period_seconds), request
        return None, request

    async def _check_serving(self, old: base.Instance) -> None:
        """Keep health-checking the color that serves while the new one starts or waits."""
        c = self.c
        endpoint = self.s.runtime.endpoint(old)
        timeout = float(c.spec.health.timeout_seconds)
        for replica in c.replicas(old.color):
            if replica.replica and replica.replica < c.count:
                record = c.of_replica(replica.replica).instance_status(old.color)
                record.ready = replica.state is base.InstanceState.RUNNING and (
                    await self.s.plugins.healthy(self.s.runtime.endpoint(replica), timeout)
                )
        record = c.instance_status(old.color)
        record.ready = await self.s.plugins.healthy(endpoint, timeout)
        pool = self._pool(old.color)
        if record.ready or pool:
            self.s.routes.set_route(c.key, endpoint, old.name, c.spec, pool)
        else:
            self.s.routes.clear_route(c.key)

    def _instance(self, color: models.Color) -> base.Instance | None:
        return next((i for i in self.c.observed if i.color is color and not i.replica), None)

    def _pool(self, color: models.Color) -> list[str]:
        """The endpoints of ``color``'s Ready replicas, when it has several (spec.replicas)."""
        c = self.c
        if c.count == 1:
            return []
        ready = {i.replica for i in c.status.instances if i.color is color and i.ready}
        return [
            self.s.runtime.endpoint(i)
            for i in c.replicas(color)
            if i.replica in ready and i.replica < c.count and i.state is base.InstanceState.RUNNING
        ]

    async def _replicas_ready(self, progress: models.SwapProgress) -> bool:
        """Whether the new color's replicas after the first are all Ready too (each started
        again when it is missing; one that exited fails the swap)."""
        c = self.c
        ready = True
        for replica in range(1, c.count):
            view = c.of_replica(replica)
            new = view.instance(progress.to_color)
            if new is None or new.state is base.InstanceState.CREATED:
                if new is not None:
                    await self.e.remove(new)
                await self.e.start(view.want_for(progress.to_color))
                ready = False
                continue
            if new.state is not base.InstanceState.RUNNING:
                lines = await self.e.last_logs(new.name)
                how = f"exit code {new.exit_code}" + (" (OOM killed)" if new.oom_killed else "")
                raise SwapFailure(
                    "SwapFailedCrashed",
                    f"{new.name} exited before promotion ({how}); last log lines:\n{lines}",
                )
            record = view.instance_status(progress.to_color)
            record.ready = record.ready or await self._ready(progress, new, view)
            ready = ready and record.ready
        return ready

    async def _ready(
        self,
        progress: models.SwapProgress,
        new: base.Instance,
        view: context.PassContext | None = None,
    ) -> bool:
        c = view or self.c
        timeout = float(c.spec.health.timeout_seconds)
        c.instance_status(new.color).start_cpu = base.start_cpu_of(new)
        if not await self.s.runtime.ready(new, timeout):
            return False
        endpoint = self.s.runtime.endpoint(new)
        try:
            handshake = await self.s.plugins.handshake(
                endpoint, c.want_for(progress.to_color), timeout
            )
        except IncompatiblePluginError as e:
            raise SwapFailure("SwapFailedHandshake", str(e)) from None
        except ControllerError:
            return False
        expected = c.spec.state.version if c.spec.state else 0
        if handshake.state_version != expected:
            raise SwapFailure(
                "SwapFailedHandshake",
                f"{new.name} reads and writes state version {handshake.state_version}, but "
                f"spec.state.version is {expected or 'not set (no state)'}",
            )
        return await self.s.plugins.healthy(endpoint, timeout)

    async def _checks(self, new: base.Instance) -> None:
        c = self.c
        endpoint = self.s.runtime.endpoint(new)
        timeout = float(c.spec.gateway.timeout_seconds)
        for index, check in enumerate(c.spec.hot_swap.checks):
            where = f"spec.hotSwap.checks[{index}] ({check.method})"
            payload = b"" if check.payload is None else json.dumps(check.payload).encode()
            try:
                raw = await self.s.plugins.call(endpoint, check.method, payload, timeout)
                answer = json.loads(raw) if raw else None
            except (ControllerError, ValueError) as e:
                raise SwapFailure("SwapFailedChecks", f"{where} failed: {e}") from None
            if check.expect is not None and not _matches(answer, check.expect):
                raise SwapFailure(
                    "SwapFailedChecks",
                    f"{where} answered {json.dumps(answer)[:500]}, "
                    f"expected {json.dumps(check.expect)}",
                )

    # Canary steps and analyses.

    async def _canary(
        self, progress: models.SwapProgress, new: base.Instance, request: str | None
    ) -> float | None:
        """Go through the canary's steps from where it is; the requeue delay while a step
        waits, None once they are all done (the swap is promoted then)."""
        c = self.c
        canary = c.spec.hot_swap.canary
        assert canary is not None
        steps = canary.steps
        endpoint = self.s.runtime.endpoint(new)
        if progress.step is not models.SwapStep.CANARY:
            progress.step = models.SwapStep.CANARY
            progress.canary_step, progress.weight = 0, 0
            progress.step_started = datetime.fromtimestamp(c.now, UTC)
        while (index := progress.canary_step or 0) < len(steps):
            step = steps[index]
            where = f"step {index + 1} of {len(steps)}"
            self._weigh(progress, endpoint)
            if step.set_weight is not None:
                progress.weight = step.set_weight
                self._weigh(progress, endpoint)
                await self.e.event(
                    "Normal",
                    "CanaryWeight",
                    f"{where}: {new.name} ({progress.to_version}) takes {step.set_weight}% "
                    "of the calls",
                )
            elif request == "promote":
                c.answered("Done", f"{where} ({step.kind}) skipped by bhctl swap promote")
                request = None
                self._skip_analysis(progress)
            elif step.pause is not None:
                duration = step.pause.duration_seconds
                waited = c.now - (progress.step_started or progress.started).timestamp()
                if duration is None or waited < duration:
                    until = "bhctl swap promote" if duration is None else f"{duration}s pass"
                    self._swapping(
                        "CanaryPaused",
                        f"{where}: paused at weight {progress.weight}% until {until}",
                    )
                    if duration is None:
                        return float(c.spec.health.period_seconds)
                    return max(0.05, min(float(c.spec.health.period_seconds), duration - waited))
            else:
                assert step.analysis is not None
                delay = await self._analyze(progress, new, where, step.analysis.metrics)
                if delay is not None:
                    return delay
            progress.canary_step = index + 1
            progress.step_started = datetime.fromtimestamp(c.now, UTC)
        progress.weight = 100
        self._weigh(progress, endpoint)
        return None

    def _weigh(self, progress: models.SwapProgress, endpoint: str) -> None:
        """Keep the gateway's canary weight as the progress says (every pass: a gateway that
        started again gets it)."""
        c = self.c
        canary = c.spec.hot_swap.canary
        weight = progress.weight or 0
        header = canary.sticky_header if canary else None
        self.s.routes.set_canary(
            c.key, endpoint if weight else None, weight, header, self._pool(progress.to_color)
        )
        self.s.metrics.canary_weight.labels(c.key).set(weight)

    def _analyzed(self, progress: models.SwapProgress, where: str) -> bool:
        return any(r.at == where and r.phase != "Running" for r in progress.analyses)

    def _skip_analysis(self, progress: models.SwapProgress) -> None:
        """A promote goes past the analysis that runs, if one does."""
        if progress.analysis is not None and progress.analysis.phase == "Running":
            progress.analysis.phase = "Skipped"
            self.s.metrics.analysis_runs.labels(self.c.key, "Skipped").inc()
            self._keep_run(progress)

    def _keep_run(self, progress: models.SwapProgress) -> None:
        if progress.analysis is not None:
            progress.analyses = [*progress.analyses[-19:], progress.analysis]
            progress.analysis = None

    async def _analyze(
        self, progress: models.SwapProgress, new: base.Instance, where: str, names: list[str]
    ) -> float | None:
        """Take the measurements due of the analysis at ``where``; the requeue delay while it
        runs, None once it passed (a failure raises :class:`SwapFailure`)."""
        c = self.c
        spec = c.spec.hot_swap.measurements(names)
        run = progress.analysis
        if run is None or run.at != where:
            run = progress.analysis = analysis.start(where, spec, c.now)
            c.memory.baselines.clear()
            await self.e.event(
                "Normal",
                "AnalysisStarted",
                f"analysis {where} of {new.name}: {', '.join(m.name for m in spec)}",
            )
        source = analysis.Source(
            stats=self.s.routes.stats,
            prometheus=self.s.prometheus,
            endpoint=self.s.runtime.endpoint(new),
            labels={
                "plugin": c.name,
                "namespace": c.namespace or "",
                "color": new.color.value,
                "version": progress.to_version,
            },
            baselines=c.memory.baselines,
        )
        before = {r.name: (r.measured, r.failures) for r in run.measurements}
        delay = await analysis.measure(run, spec, source, c.now)
        for result in run.measurements:
            measured, failures = before.get(result.name, (0, 0))
            failed = result.failures - failures
            self.s.metrics.analysis_measurements.labels(c.key, "Failed").inc(failed)
            passed = result.measured - measured - failed
            self.s.metrics.analysis_measurements.labels(c.key, "Successful").inc(passed)
        if delay is not None:
            said = "; ".join(
                f"{r.name} {r.measured}/{m.count}"
                + (f" ({r.failures} failed)" if r.failures else "")
                for r, m in zip(run.measurements, spec, strict=False)
            )
            self._swapping("Analyzing", f"analysis {where}: {said}")
            return delay
        self.s.metrics.analysis_runs.labels(c.key, run.phase).inc()
        self._keep_run(progress)
        if run.phase == "Failed":
            raise SwapFailure("SwapFailedAnalysis", analysis.failed_message(run, spec))
        await self.e.event("Normal", "AnalysisSuccessful", f"analysis {where} of {new.name} passed")
        return None

    # Promoting: the pre-copy, then the pause.

    async def _pre_copy(
        self, progress: models.SwapProgress, old_endpoint: str, new_endpoint: str
    ) -> str:
        """Copy the state while the old color serves; the revision the new one holds ("": none).

        "" means the last move must be the whole state: a plugin that keeps
        no revisions, or states of different versions (the new color
        migrates, which deltas cannot do).
        """
        c = self.c
        assert c.spec.state is not None
        swap = c.spec.hot_swap
        timeout = float(c.spec.health.timeout_seconds)
        want = c.want_for(progress.to_color)
        try:
            handshake = await self.s.plugins.handshake(new_endpoint, want, timeout)
        except ControllerError as e:
            raise SwapFailure("SwapFailedNotReady", f"handshake before the copy: {e}") from None
        if not handshake.deltas:
            self.transfer = "FullCopy (the new color imports no deltas)"
            return ""
        revision = ""
        for round in range(swap.pre_copy_rounds):
            try:
                moved = await transfer.move(
                    self.s.plugins,
                    old_endpoint,
                    new_endpoint,
                    since=revision,
                    timeout=STATE_TIMEOUT,
                    state_version=handshake.state_version,
                    recording=self._recording(progress),
                )
            except transfer.Unsuitable as e:
                self.transfer = f"FullCopy ({e})"
                return ""
            except ControllerError as e:
                raise SwapFailure("SwapFailedImport", f"pre-copy round {round + 1}: {e}") from None
            self.moved += moved.sent.size
            if not moved.sent.revision or moved.after.revision != moved.sent.revision:
                self.transfer = "FullCopy (the plugin keeps no revisions)"
                return ""
            revision = moved.sent.revision
            self.transfer = f"PreCopy ({round + 1} round{'s' if round else ''})"
            if round and moved.sent.size <= swap.pre_copy_target_bytes:
                break
        return revision

    def _recording(self, progress: models.SwapProgress) -> transfer.Recording | None:
        c = self.c
        if self.s.snapshots is None:
            return None
        return transfer.Recording(
            self.s.snapshots,
            c.key,
            progress.from_version,
            "swap",
            limit=c.spec.resources.memory.as_int(),
        )

    async def _move_held(
        self, progress: models.SwapProgress, old_endpoint: str, new_endpoint: str, since: str
    ) -> str:
        """Move the state while calls are held: the last delta, or the whole state."""
        c = self.c
        assert c.spec.state is not None
        if since:
            try:
                moved = await transfer.move(
                    self.s.plugins, old_endpoint, new_endpoint, since=since, timeout=STATE_TIMEOUT
                )
            except PluginCallError as e:
                if e.code != "UNIMPLEMENTED":  # e.g. a delta on the wrong base: roll back
                    raise SwapFailure("SwapFailedImport", f"the last delta: {e}") from None
            else:
                self.moved += moved.sent.size
                self.held_bytes = moved.sent.size
                self.held_delta = moved.sent.delta
                return ""
            self.transfer = "FullCopy (the new color refused the delta)"
        try:
            moved = await transfer.move(
                self.s.plugins,
                old_endpoint,
                new_endpoint,
                timeout=STATE_TIMEOUT,
                max_state_version=c.spec.state.version,
            )
        except transfer.Unsuitable as e:  # newer than the new color reads: back to a snapshot
            return await self._older_state(new_endpoint, e.state_version, c.spec.state.version)
        except ControllerError as e:
            raise SwapFailure("SwapFailedImport", f"{e}") from None
        self.moved += moved.sent.size
        self.held_bytes = moved.sent.size
        return ""

    async def _promote(
        self, progress: models.SwapProgress, old: base.Instance, new: base.Instance
    ) -> float | None:
        c = self.c
        swap = c.spec.hot_swap
        old_endpoint, new_endpoint = self.s.runtime.endpoint(old), self.s.runtime.endpoint(new)
        since = ""
        self.transfer = "FullCopy"
        if c.spec.state is not None and swap.state_transfer == "PreCopy":
            since = await self._pre_copy(progress, old_endpoint, new_endpoint)
            _checkpoint("precopied")
        progress.step = models.SwapStep.PROMOTING
        await self.e.persist()
        _checkpoint("promoting")
        note = ""
        started = time.monotonic()
        steps: list[tuple[str, float]] = []

        def step(name: str) -> None:
            steps.append((name, time.monotonic()))

        self.s.routes.hold(c.key)
        self.s.routes.set_preview(c.key, None)  # about to be the active color
        flipped = False
        try:
            try:
                await self.s.routes.acknowledged()
            except ControllerError as e:
                raise SwapFailure("SwapFailedHold", f"calls could not be held: {e}") from None
            left = await self.s.routes.wait_idle(old_endpoint, float(swap.drain_timeout_seconds))
            step("in flight")
            if left:
                raise SwapFailure(
                    "SwapFailedDrain",
                    f"{left} call(s) still in flight on {old.name} after drainTimeoutSeconds "
                    f"({swap.drain_timeout_seconds}s)",
                )
            try:
                await self.s.plugins.drain(
                    old_endpoint, max(0.001, float(swap.drain_timeout_seconds))
                )
            except ControllerError as e:
                raise SwapFailure("SwapFailedDrain", f"{old.name} did not drain: {e}") from None
            step("drain")
            _checkpoint("drained")
            if c.spec.state is not None:
                note = await self._move_held(progress, old_endpoint, new_endpoint, since)
                step("state")
                _checkpoint("imported")
            held = (time.monotonic() - started) * 1000
            if held > swap.max_pause_milliseconds:
                raise SwapFailure(
                    "SwapFailedPause",
                    f"calls were held {held:.0f} ms, over maxPauseMilliseconds "
                    f"({swap.max_pause_milliseconds}); raise spec.hotSwap.maxPauseMilliseconds "
                    "to allow it",
                )
            unflipped = (c.status.active_color, c.status.active_version, c.status.last_swap)
            progress.step = models.SwapStep.PROMOTED
            progress.promoted = datetime.fromtimestamp(c.now, UTC)
            c.status.active_color = progress.to_color
            c.status.active_version = progress.to_version
            c.status.last_swap = models.SwapStatus(
                from_version=progress.from_version,
                to_version=progress.to_version,
                from_hash=progress.from_hash or None,
                result="InProgress",
                to_hash=progress.to_hash,
                state_bytes=self.moved if c.spec.state is not None else None,
                held_state_bytes=self.held_bytes if c.spec.state is not None else None,
                state_transfer=self.transfer if c.spec.state is not None else None,
            )
            await self.e.persist()
            step("status")
            _checkpoint("flipped")
            self.s.routes.set_route(
                c.key, new_endpoint, new.name, c.spec, self._pool(progress.to_color)
            )
            self.s.routes.set_canary(c.key, None, 0)
            self.s.metrics.canary_weight.labels(c.key).set(0)
            flipped = True
            try:
                await self.s.routes.acknowledged()
            except ControllerError as e:
                # Not every gateway flipped: none may. The old route goes to all of them
                # before the release does, and the rollback records the old color.
                progress.step = models.SwapStep.PROMOTING
                progress.promoted = None
                c.status.active_color, c.status.active_version, c.status.last_swap = unflipped
                raise SwapFailure("SwapFailedFlip", f"the flip was not applied: {e}") from None
        except BaseException:  # a failed step, or anything else: the old color serves again
            if flipped:
                self.s.routes.set_route(
                    c.key, old_endpoint, old.name, c.spec, self._pool(progress.from_color)
                )
            await self._resume(old_endpoint)
            self.s.routes.release(c.key)
            self.held_ms = (time.monotonic() - started) * 1000
            raise
        self.s.routes.release(c.key)
        pause = (time.monotonic() - started) * 1000
        spent, before = [], started
        for name, at in steps:
            spent.append(f"{name} {(at - before) * 1000:.1f}")
            before = at
        c.status.last_swap.pause_milliseconds = round(pause, 3)
        self.s.metrics.swap_pause.labels(c.key).observe(pause / 1000)
        await self._keep_held_state(progress, old_endpoint, since)
        moved = (
            f"; {self.moved} bytes of state moved, {self.held_bytes} of them while held "
            f"({self.transfer})"
            if c.spec.state is not None
            else ""
        )
        await self.e.event(
            "Normal",
            "SwapPromoted",
            f"{new.name} ({progress.to_version}) serves; calls were held {pause:.1f} ms "
            f"({', '.join(spent)} ms)"
            + moved
            + note
            + f"; {old.name} is kept {swap.scale_down_delay_seconds}s for rollback",
        )
        self._swapping(
            "SwapPromoted", f"{old.name} is kept for rollback until the scale-down delay passes"
        )
        return min(float(c.spec.health.period_seconds), float(swap.scale_down_delay_seconds))

    async def _keep_held_state(
        self, progress: models.SwapProgress, old_endpoint: str, since: str
    ) -> None:
        """Keep what moved while calls were held as a snapshot, from the old color, frozen
        as it was: the last delta of the pre-copy's chain (or the whole state, for a whole
        copy). Not kept as it passed: that would have lengthened the hold."""
        c = self.c
        if c.spec.state is None or self.s.snapshots is None:
            return
        try:
            await transfer.record(
                self.s.plugins, self.s.snapshots, c.key, old_endpoint,
                progress.from_version, "swap", since if self.held_delta else "",
                timeout=STATE_TIMEOUT,
                limit=c.spec.resources.memory.as_int(),
            )  # fmt: skip
        except ControllerError as e:
            log.warning("%s: the swap's state was not kept as a snapshot: %s", c.key, e)

    async def _older_state(self, endpoint: str, newer: int, version: int) -> str:
        """Going back to an older state version: the newest snapshot it can read, streamed in.

        State cannot be migrated backwards; what was written since that
        snapshot is not carried back (it stays in the snapshot of this swap).
        """
        c = self.c
        if self.s.snapshots is None:
            raise SwapFailure(
                "SwapFailedImport", "no state store to go back to an older state from"
            )
        try:
            snapshot = await asyncio.to_thread(self.s.snapshots.newest_full, c.key, version)
            await transfer.load(
                self.s.plugins, self.s.snapshots, snapshot, endpoint, timeout=STATE_TIMEOUT
            )
        except snapshots_module.SnapshotNotFoundError as e:
            raise SwapFailure(
                "SwapFailedImport",
                f"state version {newer} cannot go back to version {version}, and {e}",
            ) from None
        except ControllerError as e:
            raise SwapFailure("SwapFailedImport", f"snapshot {snapshot.id}: {e}") from None
        self.moved += snapshot.size
        self.held_bytes = snapshot.size
        return (
            f"; state version {newer} cannot go back to {version}: the state is "
            f"snapshot {snapshot.id} ({snapshot.plugin_version}, "
            f"taken {snapshot.taken_at:%Y-%m-%d %H:%M:%S}Z)"
        )

    async def _resume(self, endpoint: str) -> None:
        try:
            await self.s.plugins.drain(endpoint, 5.0, resume=True)
        except ControllerError as e:
            log.warning("%s: could not tell %s to take calls again: %s", self.c.key, endpoint, e)

    # Promoted: the scale-down window.

    async def _promoted(
        self,
        progress: models.SwapProgress,
        old: base.Instance | None,
        new: base.Instance | None,
        request: str | None,
    ) -> float | None:
        c = self.c
        if new is None or new.state is not base.InstanceState.RUNNING:
            raise SwapFailure(
                "SwapFailedAfterPromotion",
                f"the {progress.to_color.value} instance stopped within the scale-down window",
            )
        old_alive = old is not None and old.state is base.InstanceState.RUNNING
        if request in ("abort", "undo") and old_alive:
            c.answered("Done", f"the swap to {progress.to_version} is rolled back")
            raise SwapFailure("SwapAborted", f"rolled back by bhctl swap {request}")
        if request in ("abort", "undo"):
            c.answered("Refused", f"the {progress.from_color.value} instance is gone")
            await self.e.event(
                "Warning",
                "SwapNotAborted",
                f"the {progress.from_color.value} instance is gone: nothing to go back to",
            )
        endpoint = self.s.runtime.endpoint(new)
        health = c.spec.health
        if not await self.s.plugins.healthy(endpoint, float(health.timeout_seconds)):
            # As for any serving instance: rolled back at failureThreshold checks in a row,
            # not for one slow answer.
            c.memory.health_failures += 1
            failed = f"{new.name} failed {c.memory.health_failures} health check(s) in a row"
            if c.memory.health_failures >= health.failure_threshold:
                raise SwapFailure("SwapFailedAfterPromotion", f"{failed} after promotion")
            self._swapping(
                "HealthCheckFailed",
                f"{failed} after promotion; rolled back at failureThreshold "
                f"({health.failure_threshold})",
            )
            return float(health.period_seconds)
        c.memory.health_failures = 0
        self.s.routes.set_route(c.key, endpoint, new.name, c.spec, self._pool(progress.to_color))
        self.s.routes.set_preview(c.key, None)
        assert progress.promoted is not None
        progress.weight = 100 if progress.weight is not None else None
        names = c.spec.hot_swap.post_promotion_analysis
        if names and old_alive and not self._analyzed(progress, "PostPromotion"):
            delay = await self._analyze(progress, new, "PostPromotion", names)
            if delay is not None:
                return delay
        kept = c.now - progress.promoted.timestamp()
        window = float(c.spec.hot_swap.scale_down_delay_seconds)
        changed = progress.to_hash != c.want_for(progress.to_color).spec_hash
        if kept < window and not changed:
            return min(float(c.spec.health.period_seconds), window - kept)
        if not changed:
            blocked = await self._gate("PostPromotion", progress, can_roll_back=old_alive)
            if blocked is not None:
                kept_for = f"; {old.name} is kept meanwhile" if old is not None else ""
                self._swapping("SwapBlockedByWebhook", blocked + kept_for)
                return float(c.spec.health.period_seconds)
        for instance in c.replicas(progress.from_color):
            await self.e.remove(instance)
        c.status.instances = [i for i in c.status.instances if i.color is progress.to_color]
        c.status.swap = None
        if c.status.last_swap is not None:
            c.status.last_swap.result = "Promoted"
            c.status.last_swap.time = datetime.now(UTC)
        self.s.metrics.swaps.labels(c.key, "Promoted").inc()
        await self.e.revision_result(progress.to_hash, "Promoted")
        await self.e.event(
            "Normal",
            "SwapCompleted",
            f"swap to {progress.to_version} done; removed the {progress.from_color.value} instance",
        )
        c.found("True", "InstanceReady", f"{new.name} answers its health check")
        return 0.0 if changed else float(c.spec.health.period_seconds)

    # Rolling back.

    async def _roll_back(
        self,
        progress: models.SwapProgress,
        old: base.Instance | None,
        new: base.Instance | None,
        failure: SwapFailure,
    ) -> float | None:
        c = self.c
        message = str(failure)
        promoted = progress.step is models.SwapStep.PROMOTED
        old_alive = old is not None and old.state is base.InstanceState.RUNNING
        quiet = failure.reason in ("SwapInterrupted", "SwapSuperseded", "SwapSourceLost")
        aborted = failure.reason == "SwapAborted"
        # Everything the route and the status say changes while calls are held, and is
        # persisted before they are released: a controller dying after this finds the
        # old color active, never the one being removed.
        self.s.routes.hold(c.key)
        self.s.routes.set_preview(c.key, None)
        self.s.routes.set_canary(c.key, None, 0)
        self.s.metrics.canary_weight.labels(c.key).set(0)
        try:
            if promoted and old_alive and old is not None:
                message += await self._return_state(old, new)
            if old_alive and old is not None:
                old_endpoint = self.s.runtime.endpoint(old)
                await self._resume(old_endpoint)
                self.s.routes.set_route(
                    c.key, old_endpoint, old.name, c.spec, self._pool(progress.from_color)
                )
            else:
                self.s.routes.clear_route(c.key)
            c.status.active_color = progress.from_color
            c.status.active_version = progress.from_version
            c.status.instances = [i for i in c.status.instances if i.color is progress.from_color]
            c.status.swap = None
            c.status.last_swap = models.SwapStatus(
                from_version=progress.from_version,
                to_version=progress.to_version,
                pause_milliseconds=c.status.last_swap.pause_milliseconds
                if promoted and c.status.last_swap
                else (round(self.held_ms, 3) if self.held_ms is not None else None),
                result="Aborted" if aborted else "RolledBack",
                reason=failure.reason,
                to_hash=None if quiet else progress.to_hash,
                from_hash=progress.from_hash or None,
                time=datetime.now(UTC),
                generation=c.generation,
            )
            serving = f"{old.name} serves" if old_alive and old is not None else "nothing serves"
            said = f"swap to {progress.to_version} rolled back: {message}; {serving}"
            if quiet:  # nothing is wrong with the plugin: the next pass starts over
                c.found(
                    "True" if old_alive else "False",
                    failure.reason,
                    said,
                    progressing=(failure.reason, "starting over from what runs"),
                )
            else:
                c.status.last_swap.message = said
                c.found(
                    "True" if old_alive else "False",
                    failure.reason,
                    said,
                    degraded=(failure.reason, said),
                )
            await self.e.persist()
        finally:
            self.s.routes.release(c.key)
        if new is not None and progress.weight and not promoted:
            # A canary's calls in flight on the new color end there before it goes.
            drain = max(0.001, float(c.spec.hot_swap.drain_timeout_seconds))
            with contextlib.suppress(ControllerError):
                await self.s.routes.wait_idle(self.s.runtime.endpoint(new), drain)
        for instance in c.replicas(progress.to_color):
            await self.e.remove(instance)
        if self.held_ms is not None:
            self.s.metrics.swap_pause.labels(c.key).observe(self.held_ms / 1000)
        self.s.metrics.swaps.labels(c.key, c.status.last_swap.result).inc()
        await self.e.revision_result(progress.to_hash, c.status.last_swap.result, failure.reason)
        self.s.metrics.rollbacks.labels(c.key, failure.reason).inc()
        await self.e.event(
            "Normal" if quiet else "Warning",
            failure.reason,
            f"swap {progress.from_version} -> {progress.to_version} rolled back: {message}",
        )
        if quiet:
            return 0.0  # the next pass starts over from what runs
        await self._gate(
            "Rollback",
            progress,
            can_roll_back=False,
            reason=failure.reason,
            result=c.status.last_swap.result,
            message=message,
        )
        return float(c.spec.health.period_seconds)

    # Webhooks.

    async def _gate(
        self, type: str, progress: models.SwapProgress, *, can_roll_back: bool, **more: str
    ) -> str | None:
        """Call the spec's hooks of ``type``: what blocks the swap (None: nothing), or a
        :class:`SwapFailure` for a hook that says no with onFailure RollBack."""
        c = self.c
        hooks = c.spec.hot_swap.webhooks
        if not any(h.type == type for h in hooks):
            return None
        about = {
            "plugin": c.name,
            "namespace": c.namespace,
            "generation": c.generation,
            "step": progress.step.value,
            "fromVersion": progress.from_version,
            "toVersion": progress.to_version,
            "fromColor": progress.from_color.value,
            "toColor": progress.to_color.value,
            "fromSpecHash": progress.from_hash,
            "toSpecHash": progress.to_hash,
            **more,
        }
        blocked = []
        for outcome in await self.s.webhooks.send(hooks, type, about):
            said = (
                f"webhook {outcome.hook.name} ({type}) said no after {outcome.attempts} "
                f"attempt{'s' if outcome.attempts > 1 else ''}: {outcome.message}"
            )
            failure = outcome.hook.failure
            self.s.metrics.webhooks.labels(c.key, type, "Passed" if outcome.ok else failure).inc()
            if outcome.ok:
                continue
            if failure == "RollBack" and can_roll_back:
                raise SwapFailure("SwapFailedWebhook", said)
            if failure == "Block":
                await self.e.event("Warning", "SwapBlockedByWebhook", said)
                blocked.append(said)
                continue
            ignored = "nothing to roll back to" if failure == "RollBack" else "ignored"
            await self.e.event("Warning", "WebhookFailed", f"{said} ({ignored})")
        return "; ".join(blocked) if blocked else None

    async def _return_state(self, old: base.Instance, new: base.Instance | None) -> str:
        """After promotion: hand what the new color wrote back to the old one, if it can.

        Called with the plugin's calls held.
        """
        c = self.c
        if c.spec.state is None:
            return ""
        if new is None or new.state is not base.InstanceState.RUNNING:
            return "; the new color is gone: the old one serves the state frozen at the swap"
        new_endpoint = self.s.runtime.endpoint(new)
        drain = max(0.001, float(c.spec.hot_swap.drain_timeout_seconds))
        try:
            left = await self.s.routes.wait_idle(new_endpoint, drain)
            left = left or await self.s.plugins.drain(new_endpoint, drain)
            if left:
                return (
                    f"; {left} call(s) were still in flight on the new color: the old one "
                    "serves the state frozen at the swap"
                )
            await transfer.move(
                self.s.plugins, new_endpoint, self.s.runtime.endpoint(old), timeout=STATE_TIMEOUT
            )
        except ControllerError as e:
            return (
                f"; the new color's state could not be handed back ({e}): the old one serves "
                "the state frozen at the swap"
            )
        return "; the new color's state was handed back to the old one"

    def _swapping(self, reason: str, message: str) -> None:
        c = self.c
        active = c.status.active_color
        serving = active is None or c.instance_status(active).ready
        if serving:
            c.found(
                "True",
                "InstanceReady",
                "the active color serves while the swap goes on",
                progressing=(reason, message),
            )
        else:
            c.found(
                "False",
                "ActiveUnhealthy",
                "the active color fails its health check",
                progressing=(reason, message),
            )
