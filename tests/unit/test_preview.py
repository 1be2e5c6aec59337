"""Preview calls through a real gateway on loopback, its routes sent over the real control
socket: a token allowed to preview reaches a swap's new color on HTTP and gRPC, never the
active one; other tokens are refused; with no new color there is nothing to preview. And
the swap coordinator offers the new color for preview only while it waits for promotion."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from blackhole_sdk.proto import plugin_pb2

from controller.gateway import auth, router, server
from controller.protocol import client
from controller.spec import models

from .test_gateway_control import controller_side, gateway_side, spec
from .test_reconciler import World

PREVIEWER = "preview-token-0123456789"
CALLER = "caller-token-0123456789"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bh-pv-") as name:
        yield Path(name)


@contextlib.asynccontextmanager
async def color_plugin(path: Path, color: str) -> AsyncIterator[str]:
    """A plugin that answers every call with its color; its endpoint."""

    async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return plugin_pb2.HandleResponse(payload=json.dumps(color).encode()).SerializeToString()

    plugin = grpc.aio.server()
    plugin.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "blackhole.plugin.v1.Plugin",
                {"Handle": grpc.unary_unary_rpc_method_handler(handle)},
            ),
        )
    )
    endpoint = f"unix:{path}"
    plugin.add_insecure_port(endpoint)
    await plugin.start()
    try:
        yield endpoint
    finally:
        await plugin.stop(0)


def post(url: str, token: str, preview: bool) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    if preview:
        headers[server.PREVIEW_HEADER] = "true"
    request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["reason"]


async def grpc_call(address: str, token: str, preview: bool) -> Any:
    metadata = [(server.PLUGIN_HEADER, "kv"), ("authorization", f"Bearer {token}")]
    if preview:
        metadata.append((server.PREVIEW_HEADER.lower(), "true"))
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any = channel.unary_unary("/blackhole.plugin.v1.Plugin/Handle")
        raw = await call(
            plugin_pb2.HandleRequest(method="who", payload=b"{}").SerializeToString(),
            metadata=metadata,
            timeout=30,
        )
    return json.loads(plugin_pb2.HandleResponse.FromString(raw).payload)


async def test_preview_calls_reach_only_the_new_color(socket_dir: Path) -> None:
    tokens = auth.Tokens(
        [
            auth.Token("ci", hashlib.sha256(PREVIEWER.encode()).hexdigest(), frozenset("*"), True),
            auth.Token("app", hashlib.sha256(CALLER.encode()).hexdigest(), frozenset("*")),
        ]
    )
    plugins = client.Clients()
    async with (
        color_plugin(socket_dir / "blue.sock", "blue") as blue,
        color_plugin(socket_dir / "green.sock", "green") as green,
        gateway_side(socket_dir / "gateway.sock") as controls,
    ):
        gateway = server.Gateway(
            controls.lookup, controls.router, plugins, tokens=tokens, ready=controls.ready
        )
        bound = await gateway.start("127.0.0.1:0", "127.0.0.1:0")
        url = f"http://{bound['http']}/v1/plugins/kv/call/who"
        try:
            async with controller_side(socket_dir / "gateway.sock") as (remote, _):
                remote.set_route("kv", blue, "bh-kv-blue", spec())
                remote.start_syncing()
                await asyncio.wait_for(controls.ready.wait(), 30)
                assert await asyncio.to_thread(post, url, PREVIEWER, True) == (409, "NoPreview")

                remote.set_preview("kv", green)
                async with asyncio.timeout(30):
                    while controls.router.gates["kv"].preview != green:
                        await asyncio.sleep(0.005)
                for _ in range(20):
                    assert await asyncio.to_thread(post, url, PREVIEWER, True) == (200, "green")
                    assert await asyncio.to_thread(post, url, CALLER, False) == (200, "blue")
                    assert await asyncio.to_thread(post, url, PREVIEWER, False) == (200, "blue")
                refused = await asyncio.to_thread(post, url, CALLER, True)
                assert refused == (403, "PreviewForbidden")
                assert await grpc_call(bound["grpc"], PREVIEWER, True) == "green"
                assert await grpc_call(bound["grpc"], CALLER, False) == "blue"
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await grpc_call(bound["grpc"], CALLER, True)
                assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED

                remote.set_preview("kv", None)
                async with asyncio.timeout(30):
                    while controls.router.gates["kv"].preview is not None:
                        await asyncio.sleep(0.005)
                assert await asyncio.to_thread(post, url, PREVIEWER, True) == (409, "NoPreview")
                table = remote.table()
                assert table["kv"]["preview"] is None
        finally:
            await gateway.stop()
            await plugins.close()


def test_a_token_may_preview_only_when_its_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"tokens:\n  - {{name: ci, token: {PREVIEWER}, plugins: ['*'], preview: true}}\n"
        f"  - {{name: app, token: {CALLER}, plugins: [kv]}}\n"
    )
    path.chmod(0o600)
    loaded = auth.Tokens.load(path)
    assert [(t.name, t.preview) for t in loaded.tokens] == [("ci", True), ("app", False)]
    path.write_text(f"tokens:\n  - {{name: ci, token: {PREVIEWER}, plugins: [kv], preview: 1}}\n")
    with pytest.raises(auth.TokensFileError, match=r"tokens\[0\]\.preview: true or false"):
        auth.Tokens.load(path)


class PreviewRoutes(router.Router):
    """The in-process router, recording each preview it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.previews: list[str | None] = []

    def set_preview(self, key: str, endpoint: str | None) -> None:
        super().set_preview(key, endpoint)
        self.previews.append(endpoint)


async def test_the_new_color_is_previewed_while_it_waits_and_not_after(tmp_path: Path) -> None:
    world = World(tmp_path)
    routes = PreviewRoutes()
    world.reconciler.routes = routes
    world.write("kv", version="1.0.0")
    await world.settle("kv")
    assert routes.gates["kv"].preview is None
    world.write("kv", version="1.1.0", extra="  hotSwap: {autoPromote: false}\n")
    status = await world.settle("kv")
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.AWAITING_PROMOTION
    green = world.runtime.endpoint(world.runtime.instances["bh-kv-green"])
    assert routes.gates["kv"].preview == green
    assert routes.route("kv") != green, "the active color is not the previewed one"
    world.reconciler.request("kv", "promote")
    status = await world.settle("kv", passes=1)
    assert status.active_color is models.Color.GREEN
    assert routes.gates["kv"].preview is None
    assert routes.route("kv") == green

    world.write("kv", version="1.2.0", extra="  hotSwap: {autoPromote: false}\n")
    world.clock.offset += 60
    await world.settle("kv")
    assert routes.gates["kv"].preview is not None
    world.reconciler.request("kv", "abort")
    await world.settle("kv", passes=1)
    assert routes.gates["kv"].preview is None, "an abort ends the preview"
    assert routes.previews[-1] is None
