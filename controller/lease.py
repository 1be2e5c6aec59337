"""Leader election with a ``coordination.k8s.io`` Lease, so that only one controller acts.

In the shape of client-go's ``leaderelection``: a candidate reads the Lease;
it takes it when nobody holds it or when the holder's record has not changed
for ``lease_seconds`` as timed by this candidate's own clock (no trust in
other machines' clocks); the holder renews it every ``retry_seconds``, and
steps down when it could not renew for ``renew_seconds``. Every write is a
replace carrying the ``resourceVersion`` read, so two candidates racing for
the Lease cannot both win: the loser gets ``409 Conflict``.

The holder labels its own pod ``blackhole.dev/leader=true`` (the gateway's
Service selects it) and takes the label off when it stops leading. It keeps
renewing while a clean shutdown finishes the passes in flight, then gives
the Lease up, so that a successor does not wait for it to expire; one that
loses the Lease stops acting at once (see :meth:`Election.valid`, checked
before every pass and every step of a swap).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller import kubeapi
from controller.spec import models

log = logging.getLogger(__name__)

LEADER_LABEL = f"{models.LABEL_PREFIX}leader"
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Settings:
    name: str
    namespace: str
    identity: str
    lease_seconds: float = 15.0
    """How long a record must stay unchanged before another candidate takes the Lease."""
    renew_seconds: float = 10.0
    """How long the holder keeps acting without a successful renewal."""
    retry_seconds: float = 2.0
    """How often candidates try and the holder renews."""
    pod: str | None = None
    """The holder's pod (name in ``namespace``), labelled while it leads."""

    def __post_init__(self) -> None:
        if not self.retry_seconds < self.renew_seconds < self.lease_seconds:
            raise ValueError(
                "leader election needs retry < renew deadline < lease duration "
                f"(got {self.retry_seconds}, {self.renew_seconds}, {self.lease_seconds})"
            )


def _now() -> str:
    return (
        datetime.datetime.now(datetime.UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


class Election:
    """One candidate for one Lease."""

    def __init__(
        self, api: client.ApiClient, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        # Typed as Any: the bodies sent and read are plain JSON, not the client's models.
        self.coordination: Any = client.CoordinationV1Api(api)
        self.core: Any = client.CoreV1Api(api)
        self.clock = clock
        self.leading = False
        self.transitions = 0
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0

    # One round.

    async def try_acquire_or_renew(self) -> bool:
        """One attempt to take or keep the Lease; True while this candidate holds it.

        Bounded by the renew deadline: an API server that stops answering makes
        the attempt fail in time, not hang (each request has that timeout too).
        """
        try:
            async with asyncio.timeout(self.settings.renew_seconds):
                return await asyncio.to_thread(self._attempt)
        except TimeoutError:
            log.warning("lease %s: the API server did not answer in time", self.settings.name)
            return False
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            status = getattr(e, "status", None)
            if status != 409:
                log.warning("lease %s: %s", self.settings.name, kubeapi.error(e, "renewing"))
            return False

    def _attempt(self) -> bool:
        s = self.settings
        now = self.clock()
        try:
            lease = self._read()
        except ApiException as e:
            if e.status != 404:
                raise
            self._write(None, transitions=0)
            self._took(now, "created")
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder and holder != s.identity:
            duration = float(spec.get("leaseDurationSeconds") or s.lease_seconds)
            if now - self._observed_at < duration:
                return False  # someone else holds it and renews it
            transitions += 1
        elif not holder:
            transitions += 1
        self._write(lease, transitions=transitions)
        if holder == s.identity:
            self._renewed_at = now
            self.transitions = transitions
            self.leading = True
        else:
            self._took(now, f"taken over from {holder!r}" if holder else "taken (released)")
        return True

    def _took(self, now: float, how: str) -> None:
        self._renewed_at = now
        self.leading = True
        log.info("lease %s: %s by %s", self.settings.name, how, self.settings.identity)

    def _read(self) -> dict[str, Any]:
        response = self.coordination.read_namespaced_lease(
            self.settings.name,
            self.settings.namespace,
            _preload_content=False,
            _request_timeout=self._timeout(),
        )
        return dict(json.loads(response.data))

    def _timeout(self) -> tuple[float, float]:
        """(connect, read) seconds for one request: well within the renew deadline."""
        s = self.settings
        return (s.retry_seconds, max(s.retry_seconds, (s.renew_seconds - s.retry_seconds) / 2))

    def _write(self, lease: dict[str, Any] | None, *, transitions: int) -> None:
        s = self.settings
        spec = (lease or {}).get("spec") or {}
        now = _now()
        taking = spec.get("holderIdentity") != s.identity
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": round(s.lease_seconds),
                "acquireTime": now if taking else spec.get("acquireTime", now),
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }
        if lease is None:
            self.coordination.create_namespaced_lease(
                s.namespace, body, _preload_content=False, _request_timeout=self._timeout()
            )
            return
        body["metadata"]["resourceVersion"] = (lease.get("metadata") or {}).get("resourceVersion")
        response = self.coordination.replace_namespaced_lease(
            s.name, s.namespace, body, _preload_content=False, _request_timeout=self._timeout()
        )
        self._observed = (
            s.identity,
            json.loads(response.data)["spec"].get("renewTime"),
            transitions,
        )
        self._observed_at = self.clock()

    # The loops.

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this candidate leads (True) or ``stop`` is set (False)."""
        await self.label(False)
        log.info(
            "lease %s/%s: %s is waiting to lead",
            self.settings.namespace,
            self.settings.name,
            self.settings.identity,
        )
        while not stop.is_set():
            if await self.try_acquire_or_renew():
                await self.label(True)
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.retry_seconds)
        return False

    async def hold(self, stop: asyncio.Event, lost: asyncio.Event) -> None:
        """Renew until ``stop``; set ``lost`` when the Lease cannot be renewed in time."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.retry_seconds)
            if stop.is_set():
                break
            renewed = await self.try_acquire_or_renew()
            if not self.valid() or (not renewed and self._lost_to_another()):
                self.leading = False
                log.error(
                    "lease %s: lost (not renewed for %.1fs); stepping down",
                    self.settings.name,
                    self.clock() - self._renewed_at,
                )
                await self.label(False)
                lost.set()
                return

    def valid(self) -> bool:
        """Whether this candidate may still act: it renewed within the renew deadline."""
        return self.leading and self.clock() - self._renewed_at < self.settings.renew_seconds

    def _lost_to_another(self) -> bool:
        return self._observed is not None and self._observed[0] not in ("", self.settings.identity)

    async def release(self) -> None:
        """Give the Lease up (clean shutdown): the next candidate need not wait for it to expire."""
        if not self.leading:
            return
        self.leading = False
        await self.label(False)
        with contextlib.suppress(ApiException, urllib3.exceptions.HTTPError, OSError):
            await asyncio.to_thread(self._give_up)

    def _give_up(self) -> None:
        lease = self._read()
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.settings.identity:
            return
        body = {
            **lease,
            "spec": {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _now()},
        }
        self.coordination.replace_namespaced_lease(
            self.settings.name,
            self.settings.namespace,
            body,
            _preload_content=False,
            _request_timeout=self._timeout(),
        )
        log.info("lease %s: released by %s", self.settings.name, self.settings.identity)

    async def label(self, leader: bool) -> None:
        """Put the leader label on this pod, or take it off (the gateway's Service follows it)."""
        pod = self.settings.pod
        if not pod:
            return
        patch = {"metadata": {"labels": {LEADER_LABEL: "true" if leader else None}}}
        try:
            await asyncio.to_thread(
                self.core.patch_namespaced_pod,
                pod,
                self.settings.namespace,
                patch,
                _content_type=MERGE_PATCH,
                _preload_content=False,
                _request_timeout=self._timeout(),
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            log.warning("labelling pod %s: %s", pod, kubeapi.error(e, "patching"))
