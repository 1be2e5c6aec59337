"""The controller reaches a plugin only through the socket the plugin itself listens on.

A plugin owns its socket directory and can put any name in it: a link to
another plugin's socket in place of its own must never lead the
controller's calls there. Each test serves real plugins on Unix sockets
and checks what a client of the controller reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from blackhole_sdk import Plugin, server

from controller import unix
from controller.errors import IncompatiblePluginError, PluginCallError
from controller.protocol import client
from controller.runtimes import base


class Named(Plugin):
    def __init__(self, name: str) -> None:
        self.name = name

    def handle(self, method: str, payload: Any) -> Any:
        return {"served_by": self.name}


@pytest.fixture
def instances(tmp_path: Path) -> Path:
    """``instances/`` as a runtime lays it out: one directory per instance."""
    # Short, so that every socket path fits in sun_path wherever the tests run.
    directory = tmp_path / "i"
    directory.mkdir()
    return directory


@contextlib.asynccontextmanager
async def serving(name: str, instances: Path) -> AsyncIterator[Path]:
    """Plugin ``name`` listening on ``instances/<name>/plugin.sock``."""
    path = instances / name / base.SOCKET_NAME
    path.parent.mkdir()
    grpc_server, _ = server.server_for(Named(name))
    grpc_server.add_insecure_port(f"unix:{path}")
    await grpc_server.start()
    try:
        yield path
    finally:
        await grpc_server.stop(0)


async def ask(endpoint: str, plugin: str = "attacker") -> Any:
    """What the plugin at ``endpoint`` answers, after the controller's handshake as ``plugin``."""
    plugins = client.Clients()
    try:
        await plugins.get(endpoint).initialize(
            plugin=plugin, version="1.0.0", color="blue", config={}, timeout=5
        )
        return json.loads(await plugins.call(endpoint, "who", b"null", 5))
    finally:
        await plugins.close()


async def test_a_plugin_socket_is_reached(instances: Path):
    async with serving("alpha", instances) as path:
        assert await base.probe_socket(path, 5)
        assert await ask(f"unix:{path}", "alpha") == {"served_by": "alpha"}


async def test_a_link_to_another_plugins_socket_is_refused(instances: Path):
    async with serving("victim", instances) as victim:
        own = instances / "attacker" / base.SOCKET_NAME
        own.parent.mkdir()
        os.symlink(f"../victim/{base.SOCKET_NAME}", own)
        assert own.resolve() == victim.resolve()
        # Something is there: the probe says so, and the connection refuses it with the reason.
        assert await base.probe_socket(own, 5)
        with pytest.raises(IncompatiblePluginError, match="link") as refused:
            await ask(f"unix:{own}")
        assert refused.value.reason == "SocketTampered"


async def test_a_socket_directory_replaced_by_a_link_is_refused(instances: Path):
    async with serving("victim", instances) as victim:
        os.symlink("victim", instances / "attacker")
        with pytest.raises(IncompatiblePluginError) as refused:
            await ask(f"unix:{instances / 'attacker' / victim.name}")
        assert refused.value.reason == "SocketTampered"


async def test_a_file_in_place_of_the_socket_is_refused(instances: Path):
    path = instances / "alpha" / base.SOCKET_NAME
    path.parent.mkdir()
    path.write_text("not a socket")
    with pytest.raises(IncompatiblePluginError, match="regular file") as refused:
        await ask(f"unix:{path}")
    assert refused.value.reason == "SocketTampered"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a socket's owner needs root")
async def test_a_socket_of_another_user_is_refused(instances: Path):
    async with serving("alpha", instances) as path:
        os.chown(path, 4242, 4242)
        with pytest.raises(IncompatiblePluginError, match="4242") as refused:
            await ask(f"unix:{path}")
        assert refused.value.reason == "SocketTampered"


def test_a_name_changed_after_it_was_opened_still_leads_to_the_same_socket(instances: Path):
    """The controller holds the socket itself: a later link in its place changes nothing."""
    own, other = instances / "own.sock", instances / "other.sock"
    with socket.socket(socket.AF_UNIX) as first, socket.socket(socket.AF_UNIX) as second:
        first.bind(str(own))
        second.bind(str(other))
        first.listen()
        second.listen()
        pinned = base.open_socket(own)
        try:
            own.unlink()
            os.symlink(other.name, own)
            with socket.socket(socket.AF_UNIX) as peer:
                peer.connect(base.fd_address(pinned))
                first.settimeout(5)
                accepted, _ = first.accept()
                accepted.close()
        finally:
            os.close(pinned)


async def test_no_socket_yet_is_unavailable_not_tampered(instances: Path):
    path = instances / "alpha" / base.SOCKET_NAME
    path.parent.mkdir()
    assert not await base.probe_socket(path, 1)
    with pytest.raises(PluginCallError) as unavailable:
        await ask(f"unix:{path}")
    assert unavailable.value.code == "UNAVAILABLE"


def test_deep_socket_paths_are_reached(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["d" * 30] * 4)
    deep.mkdir(parents=True)
    path = deep / "x.sock"
    assert len(str(path)) > unix.SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as listener, unix.unix_address(path) as address:
        listener.bind(address)
        listener.listen()
        pinned = base.open_socket(path)
        try:
            with socket.socket(socket.AF_UNIX) as peer:
                peer.connect(base.fd_address(pinned))
        finally:
            os.close(pinned)


async def test_a_bound_socket_that_listens_a_moment_later_is_seen_accepting(instances: Path):
    path = instances / "alpha" / base.SOCKET_NAME
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(path))  # a server between its bind and its listen
        asyncio.get_running_loop().call_later(0.005, bound.listen)
        assert await base.probe_socket(path, 5)


async def test_a_socket_that_never_listens_is_not_accepting(instances: Path):
    path = instances / "alpha" / base.SOCKET_NAME
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(path))
        assert not await base.probe_socket(path, 5)


async def test_the_sdks_socket_has_its_name_only_once_it_listens(
    instances: Path, monkeypatch: pytest.MonkeyPatch
):
    path = instances / "alpha" / base.SOCKET_NAME
    path.parent.mkdir()
    seen: list[bool] = []
    start = server.Listener.start

    async def start_checked(listener: server.Listener) -> None:
        seen.append(os.path.lexists(path))  # bound by now, not listening yet
        await start(listener)

    monkeypatch.setattr(server.Listener, "start", start_checked)
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve_async(Named("alpha"), f"unix:{path}", stop))
    async with asyncio.timeout(30):
        while not path.exists():
            await asyncio.sleep(0.005)
    assert seen == [False], "the name appeared before the server listened"
    assert await ask(f"unix:{path}", "alpha") == {"served_by": "alpha"}
    assert sorted(p.name for p in path.parent.iterdir()) == [base.SOCKET_NAME]
    stop.set()
    await serving
