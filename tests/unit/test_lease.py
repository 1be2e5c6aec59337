"""Leader election against an API server (kmock, extended: resourceVersions and 409s).

The candidates' clocks are fake: a takeover happens when the holder's record
has not changed for the lease duration as the candidate itself observed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from controller import lease
from tests.integration import kube


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def api() -> AsyncIterator[k8s_client.ApiClient]:
    async with kube.ApiServer() as server, kmock.Server(server) as http:
        configuration = k8s_client.Configuration()
        configuration.host = str(http.url).rstrip("/")
        with k8s_client.ApiClient(configuration) as api_client:
            namespace: Any = {"metadata": {"name": "system"}}
            core = k8s_client.CoreV1Api(api_client)
            await asyncio.to_thread(core.create_namespace, namespace)
            yield api_client


def _candidate(api: k8s_client.ApiClient, identity: str, clock: Clock) -> lease.Election:
    settings = lease.Settings(
        name="blackhole", namespace="system", identity=identity,
        lease_seconds=15, renew_seconds=10, retry_seconds=2,
    )  # fmt: skip
    return lease.Election(api, settings, clock=clock)


async def test_the_first_candidate_leads_and_the_second_waits_while_it_renews(
    api: k8s_client.ApiClient,
):
    clock = Clock()
    a, b = _candidate(api, "a", clock), _candidate(api, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    for _ in range(10):  # 20 s of renewals every 2 s: b never gets it
        clock.now += 2
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
    assert a.valid()
    assert not b.leading


async def test_a_holder_that_stops_renewing_is_taken_over_after_the_lease_duration(api):
    clock = Clock()
    a, b = _candidate(api, "a", clock), _candidate(api, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()  # b observes a's record now
    clock.now += 14
    assert not await b.try_acquire_or_renew()  # not yet: 14 s < 15 s
    assert not a.valid()  # a did not renew within its renew deadline: it must not act
    clock.now += 2
    assert await b.try_acquire_or_renew()
    assert b.valid()
    # a comes back: it sees another holder, and does not get the Lease back.
    assert not await a.try_acquire_or_renew()


async def test_a_write_from_a_stale_read_is_refused(api):
    clock = Clock()
    a, b = _candidate(api, "a", clock), _candidate(api, "b", clock)
    assert await a.try_acquire_or_renew()
    stale = await asyncio.to_thread(a._read)
    assert await a.try_acquire_or_renew()  # the Lease moves on (a renewal)
    with pytest.raises(ApiException) as refused:
        await asyncio.to_thread(b._write, stale, transitions=1)  # acting on an old read
    assert refused.value.status == 409


async def test_a_released_lease_is_taken_at_once(api):
    clock = Clock()
    a, b = _candidate(api, "a", clock), _candidate(api, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert await b.try_acquire_or_renew()  # no waiting for the lease duration
    assert b.leading


def test_settings_must_leave_room_to_renew():
    with pytest.raises(ValueError, match="retry < renew deadline < lease duration"):
        lease.Settings(name="x", namespace="y", identity="z", lease_seconds=5, renew_seconds=5)
