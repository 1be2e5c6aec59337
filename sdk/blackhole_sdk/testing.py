"""Test a plugin without Docker: run it in this process or as a subprocess, and call it.

::

    from blackhole_sdk import testing

    def test_put_then_get():
        with testing.in_process(KeyValueStore(), config={"shards": 2}) as kv:
            kv.call("put", {"key": "a", "value": 1})
            assert kv.call("get", {"key": "a"}) == {"key": "a", "value": 1}

    def test_the_real_program():
        with testing.subprocess(["python3", "plugin.py"]) as kv:
            ...

Both speak the real protocol over a real Unix socket, so what passes here
passes under the controller. With pytest, the ``blackhole_plugin`` fixture
(registered by the SDK's pytest plugin) starts either and stops it after the
test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess as subprocesses
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from blackhole_sdk import PROTOCOL_VERSION
from blackhole_sdk.plugin import Plugin
from blackhole_sdk.proto import plugin_pb2, plugin_pb2_grpc
from blackhole_sdk.server import CHUNK_BYTES, serve_async

__all__ = ["CallError", "Harness", "in_process", "load", "subprocess"]


def load(path: Path | str, name: str | None = None) -> ModuleType:
    """Import the plugin program at ``path`` as a module (its ``__main__`` block does not run)."""
    path = Path(path)
    module_name = name or f"blackhole_plugin_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class CallError(Exception):
    """A call answered with an error status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Harness:
    """A client of one running plugin, with plain (blocking) methods."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = plugin_pb2_grpc.PluginStub(self.channel)
        self.check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self.process: subprocesses.Popen[bytes] | None = None
        """The plugin's process, for :func:`subprocess`."""
        self.output_path: Path | None = None

    def output(self) -> str:
        """What the plugin's process wrote so far (stdout and stderr), for :func:`subprocess`."""
        return self.output_path.read_text(errors="replace") if self.output_path else ""

    def initialize(
        self,
        config: dict[str, Any] | None = None,
        *,
        plugin: str = "test",
        version: str = "0.0.0",
        color: str = "blue",
        protocol_version: int = PROTOCOL_VERSION,
    ) -> plugin_pb2.InitializeResponse:
        answer: plugin_pb2.InitializeResponse = self._unary(
            self.stub.Initialize,
            plugin_pb2.InitializeRequest(
                protocol_version=protocol_version,
                plugin=plugin,
                version=version,
                color=color,
                config_json=json.dumps(config or {}).encode(),
            ),
        )
        return answer

    def call(self, method: str, payload: Any = None, timeout: float = 10.0) -> Any:
        """Call ``method`` with ``payload`` as JSON; the JSON answer, decoded."""
        body = b"" if payload is None else json.dumps(payload).encode()
        answer = self.call_bytes(method, body, timeout=timeout)
        return json.loads(answer) if answer else None

    def call_bytes(
        self,
        method: str,
        payload: bytes = b"",
        metadata: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> bytes:
        request = plugin_pb2.HandleRequest(method=method, metadata=metadata or {}, payload=payload)
        answer: plugin_pb2.HandleResponse = self._unary(self.stub.Handle, request, timeout)
        return answer.payload

    def call_stream(self, method: str, payload: bytes, timeout: float = 60.0) -> bytes:
        """Call ``method`` through ``HandleStream``, the payload sent in chunks."""

        def chunks() -> Iterator[plugin_pb2.HandleChunk]:
            yield plugin_pb2.HandleChunk(method=method, data=payload[:CHUNK_BYTES])
            for start in range(CHUNK_BYTES, len(payload), CHUNK_BYTES):
                yield plugin_pb2.HandleChunk(data=payload[start : start + CHUNK_BYTES])

        try:
            return b"".join(c.data for c in self.stub.HandleStream(chunks(), timeout=timeout))
        except grpc.RpcError as e:
            raise _error(e) from None

    def healthy(self, timeout: float = 5.0) -> bool:
        answer = self._unary(self.check, health_pb2.HealthCheckRequest(), timeout)
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def export_state(self, timeout: float = 60.0) -> tuple[int, bytes]:
        """The plugin's state version and state bytes."""
        try:
            chunks = list(self.stub.ExportState(plugin_pb2.ExportStateRequest(), timeout=timeout))
        except grpc.RpcError as e:
            raise _error(e) from None
        return (chunks[0].state_version if chunks else 0), b"".join(c.data for c in chunks)

    def import_state(
        self, version: int, state: bytes, timeout: float = 60.0
    ) -> plugin_pb2.ImportStateResponse:
        """Hand ``state`` of state ``version`` to the plugin."""
        digest = hashlib.sha256(state).hexdigest()
        chunks = [
            plugin_pb2.StateChunk(
                state_version=version,
                size=len(state),
                sha256=digest,
                data=state[s : s + CHUNK_BYTES],
            )
            for s in range(0, max(len(state), 1), CHUNK_BYTES)
        ]
        answer: plugin_pb2.ImportStateResponse = self._unary(
            self.stub.ImportState, iter(chunks), timeout
        )
        return answer

    def drain(self, timeout: float = 0, resume: bool = False) -> int:
        """Stop the plugin taking calls (or resume); the calls still in flight."""
        request = plugin_pb2.DrainRequest(timeout_milliseconds=round(timeout * 1000), resume=resume)
        answer: plugin_pb2.DrainResponse = self._unary(self.stub.Drain, request, None)
        return answer.in_flight

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method: Any, request: Any, timeout: float | None = 10.0) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise _error(e) from None


def _error(e: grpc.RpcError) -> CallError:
    return CallError(e.code(), e.details() or "")


def _wait_until_serving(harness: Harness, timeout: float, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            harness.check(health_pb2.HealthCheckRequest(), timeout=0.5)
            return
        except grpc.RpcError:
            if alive is not None and not alive():
                raise RuntimeError("the plugin exited before it listened") from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the plugin did not listen on {harness.address} in {timeout}s"
                ) from None
            time.sleep(0.02)


@contextlib.contextmanager
def _socket_dir() -> Iterator[Path]:
    # Short, so that the socket path fits in sun_path wherever the tests run.
    directory = Path(tempfile.mkdtemp(prefix="bh-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def in_process(
    plugin: Plugin,
    *,
    config: dict[str, Any] | None = None,
    initialize: bool = True,
    timeout: float = 10.0,
) -> Iterator[Harness]:
    """Serve ``plugin`` from a thread of this process; yield a client (initialized by default)."""
    with _socket_dir() as directory:
        address = f"unix:{directory / 'plugin.sock'}"
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve_async(plugin, address, stop))
            except BaseException as e:  # noqa: BLE001 (re-raised in the test's thread below)
                failure.append(e)

        thread = threading.Thread(target=run, name="blackhole-plugin", daemon=True)
        thread.start()
        harness = Harness(address)
        try:
            _wait_until_serving(harness, timeout, alive=thread.is_alive)
            if initialize:
                harness.initialize(config)
            yield harness
        finally:
            harness.close()
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout)
            loop.close()
        if failure:
            raise failure[0]


@contextlib.contextmanager
def subprocess(
    argv: Sequence[str] | str,
    *,
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    initialize: bool = True,
    timeout: float = 20.0,
) -> Iterator[Harness]:
    """Run the plugin program ``argv`` (a path runs with this Python); yield a client.

    The program gets ``BLACKHOLE_SOCKET`` like under the controller; its
    process is ``harness.process`` and its output ``harness.output()``. On
    exit it gets SIGTERM and must stop.
    """
    command: list[str] = [sys.executable, argv] if isinstance(argv, str) else list(argv)
    with _socket_dir() as directory:
        path = directory / "plugin.sock"
        harness = Harness(f"unix:{path}")
        harness.output_path = directory / "output.log"
        with harness.output_path.open("wb") as output:
            process = subprocesses.Popen(
                command,
                env={**os.environ, **(env or {}), "BLACKHOLE_SOCKET": str(path)},
                stdout=output,
                stderr=subprocesses.STDOUT,
            )
        harness.process = process
        try:
            _wait_until_serving(harness, timeout, alive=lambda: process.poll() is None)
            if initialize:
                harness.initialize(config)
            yield harness
        finally:
            harness.close()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocesses.TimeoutExpired:
                    process.kill()
                    process.wait()
