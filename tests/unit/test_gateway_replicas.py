"""The control protocol over TCP, with its shared secret, and a controller with several gateways.

Real sockets throughout: gateways' :class:`~controller.gateway.control.ControlServer`
on loopback TCP (one of them a real ``bhctl gateway`` process, frozen with
SIGSTOP where a gateway must not answer), the controller's
:class:`~controller.gateway.control.RemoteRoutes` connected to each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.gateway import control, router
from controller.spec import models

SECRET = b"a-secret-of-more-than-sixteen-bytes"
GATEWAY = [sys.executable, "-m", "controller.cli", "gateway"]


def spec() -> models.PluginSpec:
    return models.PluginSpec.model_validate({"image": "blackhole/x:1", "version": "1.0.0"})


KV = router.Declared.of(spec())
HOLD = {"type": "holds", "id": 2, "holds": {"kv": 1}, "lease": 0.2}
TABLE = {"kv": control.entry(KV, "unix:/blue.sock", "bh-kv-blue")}


async def _wait(condition: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def _address(bound: str) -> control.Address:
    host, port = control.split_address(bound)
    return control.Address(host=host, port=port)


@contextlib.asynccontextmanager
async def tcp_gateway(
    secret: bytes = SECRET,
) -> AsyncIterator[tuple[control.ControlServer, control.Address]]:
    with tempfile.TemporaryDirectory(prefix="bh-rep-") as name:
        controls = control.ControlServer(router.Router(), about={"pid": 1})
        await controls.start(Path(name) / "gateway.sock")
        bound = await controls.start_tcp("127.0.0.1:0", control.SharedSecret(secret))
        try:
            yield controls, _address(bound)
        finally:
            await controls.stop()


@contextlib.asynccontextmanager
async def controller(
    gateways: dict[str, control.Replica],
    secret: bytes | None = SECRET,
    **options: Any,
) -> AsyncIterator[control.RemoteRoutes]:
    remote = control.RemoteRoutes(
        None,
        lambda: {"kv": KV},
        secret=control.SharedSecret(secret) if secret else None,
        **options,
    )
    remote.set_gateways(gateways)
    stop = asyncio.Event()
    task = asyncio.create_task(remote.run(stop))
    try:
        yield remote
    finally:
        stop.set()
        await remote.close()
        await task


def _exchange(address: control.Address, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Lines a raw client gets back for ``messages`` (sent after reading the challenge)."""
    with socket.create_connection((address.host, address.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        answers = [json.loads(stream.readline())]
        sock.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
        answers += [json.loads(line) for line in stream]
        return answers


async def test_a_controller_with_the_secret_sends_its_table_over_tcp() -> None:
    async with (
        tcp_gateway() as (gateway, address),
        controller({"a": control.Replica(address)}) as remote,
    ):
        remote.set_route("kv", "tcp:10.0.0.1:50051", "bh-kv-blue", spec())
        remote.start_syncing()
        await _wait(lambda: gateway.router.route("kv") == "tcp:10.0.0.1:50051")
        await remote.acknowledged()
        assert remote.gateways()["a"]["connected"]


async def test_a_wrong_or_missing_proof_is_refused_and_changes_nothing() -> None:
    async with tcp_gateway() as (gateway, address):
        hello = {"type": "hello", "versions": [1], "role": "controller"}
        table = {"type": "routes", "id": 1, "routes": {}}
        for proof in ({}, {"proof": "0" * 64}, {"proof": 7}):
            answers = await asyncio.to_thread(_exchange, address, {**hello, **proof}, table)
            assert answers[0]["type"] == "challenge"
            assert [a.get("reason") for a in answers[1:]] == ["Unauthenticated"]
        async with controller(
            {"a": control.Replica(address)}, secret=b"another-secret-sixteen-bytes"
        ) as remote:
            remote.start_syncing()
            await asyncio.sleep(0.5)
            assert not remote.connected.is_set()
            with pytest.raises(control.GatewayUnavailableError, match="did not acknowledge"):
                await remote.acknowledged()
        assert not gateway.ready.is_set()


async def test_the_secret_is_checked_for_length_and_never_sent() -> None:
    with pytest.raises(control.ControlSecretError, match="fewer than 16"):
        control.SharedSecret(b"short")
    shared = control.SharedSecret(SECRET)
    nonce = shared.challenge()
    assert shared.verify(nonce, shared.proof(nonce))
    assert not shared.verify(shared.challenge(), shared.proof(nonce))  # a proof is for one nonce
    assert SECRET.decode() not in shared.proof(nonce)


async def test_the_unix_socket_asks_for_no_secret() -> None:
    with tempfile.TemporaryDirectory(prefix="bh-rep-") as name:
        path = Path(name) / "gateway.sock"
        controls = control.ControlServer(router.Router(), about={"pid": 1})
        await controls.start(path)
        await controls.start_tcp("127.0.0.1:0", control.SharedSecret(SECRET))
        remote = control.RemoteRoutes(path, lambda: {"kv": KV})
        stop = asyncio.Event()
        task = asyncio.create_task(remote.run(stop))
        try:
            remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
            remote.start_syncing()
            await _wait(lambda: controls.router.route("kv") == "unix:/blue.sock")
        finally:
            stop.set()
            await remote.close()
            await task
            await controls.stop()


async def test_two_replicas_hold_flip_and_release_together() -> None:
    async with (
        tcp_gateway() as (one, first),
        tcp_gateway() as (two, second),
        controller({"a": control.Replica(first), "b": control.Replica(second)}) as remote,
    ):
        remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
        remote.start_syncing()
        await _wait(
            lambda: remote.gateways()["a"]["connected"] and remote.gateways()["b"]["connected"]
        )
        remote.hold("kv")
        await remote.acknowledged()
        assert one.router.gates["kv"].holds == two.router.gates["kv"].holds == 1
        assert await remote.wait_idle("unix:/blue.sock", 1) == 0
        remote.set_route("kv", "unix:/green.sock", "bh-kv-green", spec())
        await remote.acknowledged()
        assert one.router.route("kv") == two.router.route("kv") == "unix:/green.sock"
        assert one.router.gates["kv"].holds == 1  # flipped while still held
        remote.release("kv")
        await remote.acknowledged()
        assert one.router.gates["kv"].holds == two.router.gates["kv"].holds == 0


async def test_a_replica_that_joins_mid_hold_gets_the_table_and_the_holds() -> None:
    async with (
        tcp_gateway() as (_, first),
        tcp_gateway() as (late, second),
        controller({"a": control.Replica(first)}) as remote,
    ):
        remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
        remote.start_syncing()
        remote.hold("kv")
        await _wait(lambda: remote.gateways()["a"]["connected"])
        await remote.acknowledged()
        remote.set_gateways(
            {"a": control.Replica(first), "b": control.Replica(second, ready=False)}
        )
        await _wait(
            lambda: late.router.gates.get("kv") is not None and late.router.gates["kv"].holds == 1
        )
        assert late.router.route("kv") == "unix:/blue.sock"
        remote.release("kv")
        await remote.acknowledged()  # the new replica counts once connected
        assert late.router.gates["kv"].holds == 0
        remote.set_gateways({"a": control.Replica(first)})
        assert set(remote.gateways()) == {"a"}


async def test_a_ready_replica_not_connected_fails_the_acknowledgement() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # nothing listens on it
    async with (
        tcp_gateway() as (_, first),
        controller(
            {
                "a": control.Replica(first),
                "b": control.Replica(control.Address(host="127.0.0.1", port=port)),
            },
            ack_timeout=0.5,
        ) as remote,
    ):
        remote.start_syncing()
        await _wait(lambda: remote.gateways()["a"]["connected"])
        remote.hold("kv")
        with pytest.raises(control.GatewayUnavailableError, match="gateway b did not"):
            await remote.acknowledged()
        remote.release("kv")


@pytest.fixture
def frozen_gateway(
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], control.Address, Path]]:
    """A real ``bhctl gateway`` process with a TCP control listener."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = Path(tempfile.mkdtemp(prefix="bh-rep-"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "gateway",
            "--data-dir",
            str(data / "d"),
            "--addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "",
            "--control-addr",
            f"127.0.0.1:{port}",
            "--control-secret",
            str(secret),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process, control.Address(host="127.0.0.1", port=port), data / "d"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(30)


async def test_a_frozen_replica_fails_the_acknowledgement_and_the_other_goes_on(
    frozen_gateway: tuple[subprocess.Popen[bytes], control.Address, Path],
) -> None:
    process, address, data = frozen_gateway
    async with (
        tcp_gateway() as (one, first),
        controller(
            {"a": control.Replica(first), "b": control.Replica(address)}, ack_timeout=1.0
        ) as remote,
    ):
        remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
        remote.start_syncing()
        await _wait(lambda: remote.gateways()["b"]["connected"], 60)
        await remote.acknowledged()
        os.kill(process.pid, signal.SIGSTOP)
        remote.hold("kv")
        with pytest.raises(control.GatewayUnavailableError, match="gateway b did not"):
            await remote.acknowledged()
        remote.release("kv")  # rolled back: the replica that answered never held long
        await _wait(lambda: one.router.gates["kv"].holds == 0)
        assert one.router.route("kv") == "unix:/blue.sock"
        os.kill(process.pid, signal.SIGCONT)
        await remote.acknowledged()  # it thaws, applies hold and release in order
        status = await asyncio.to_thread(
            lambda: json.loads(
                subprocess.run(
                    [*GATEWAY, "--status", "--data-dir", str(data)],
                    capture_output=True,
                    check=True,
                ).stdout
            )
        )
        assert status["plugins"]["kv"] == {
            "endpoint": "unix:/blue.sock", "instance": "bh-kv-blue", "inFlight": 0,
            "held": 0, "holds": 0, "canary": None, "weight": 0.0,
        }  # fmt: skip


async def test_holds_released_without_the_controller_are_reported_to_it() -> None:
    released: list[tuple[str, dict[str, Any]]] = []
    async with tcp_gateway() as (gateway, address):
        shared = control.SharedSecret(SECRET)

        def hold_then_lapse() -> list[dict[str, Any]]:
            with socket.create_connection((address.host, address.port), timeout=10) as sock:
                stream = sock.makefile("rb")
                nonce = json.loads(stream.readline())["nonce"]
                hello = {"type": "hello", "versions": [1], "role": "controller"}
                sock.sendall(
                    json.dumps({**hello, "proof": shared.proof(nonce)}).encode() + b"\n"
                    + json.dumps({"type": "routes", "id": 1, "routes": TABLE}).encode() + b"\n"
                    + json.dumps(HOLD).encode() + b"\n"
                )  # fmt: skip
                return [json.loads(stream.readline()) for _ in range(4)]

        answers = await asyncio.to_thread(hold_then_lapse)  # a controller that stops renewing
        assert answers[3] == {
            "type": "released", "plugins": ["kv"], "cause": "LeaseLapsed", "lease": 0.2
        }  # fmt: skip
        async with controller(
            {"a": control.Replica(address)},
            on_released=lambda name, record: released.append((name, record)),
            lease=30.0,
        ) as remote:
            remote.set_route("kv", "unix:/blue.sock", "bh-kv-blue", spec())
            remote.start_syncing()
            remote.hold("kv")
            await _wait(lambda: remote.gateways()["a"]["connected"])
            await remote.acknowledged()
        await _wait(lambda: gateway.router.gates["kv"].holds == 0)  # gone: released
        async with controller(  # the next controller hears of what the last one left held
            {"a": control.Replica(address)},
            on_released=lambda name, record: released.append((name, record)),
        ) as remote:
            await _wait(lambda: released)
    assert released == [
        ("a", {"type": "released", "plugins": ["kv"], "cause": "ControllerGone", "lease": 30.0})
    ]


async def test_every_replica_takes_the_canary_and_their_counts_are_summed() -> None:
    async with (
        tcp_gateway() as (one, first),
        tcp_gateway() as (two, second),
        controller({"a": control.Replica(first), "b": control.Replica(second)}) as remote,
    ):
        remote.set_route("kv", "tcp:10.0.0.1:50051", "bh-kv-blue", spec())
        remote.set_canary("kv", "tcp:10.0.0.2:50051", 30, "X-User")
        remote.start_syncing()
        await _wait(lambda: one.router.route("kv") and two.router.route("kv"))
        await remote.acknowledged()
        for gateway in (one, two):
            gate = gateway.router.gates["kv"]
            assert (gate.canary, gate.weight, gate.sticky) == ("tcp:10.0.0.2:50051", 30, "x-user")
        one.router.counts["tcp:10.0.0.2:50051"].record(False, 0.001)
        for failed in (True, False, False):
            two.router.counts["tcp:10.0.0.2:50051"].record(failed, 0.3)
        stats = await remote.stats("tcp:10.0.0.2:50051")
        assert stats is not None
        assert (stats.calls, stats.failures) == (4, 1)
        assert stats.value("SuccessRate") == 0.75
