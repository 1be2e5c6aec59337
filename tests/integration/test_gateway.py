"""The gateway in front of real plugins on Docker and Podman, under a real controller process.

Calls go over HTTP (and gRPC) to the controller's gateway, which reaches
each plugin's container over its Unix socket only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from pathlib import Path

import grpc
import pytest
from blackhole_sdk.proto import plugin_pb2

from controller.protocol import client
from controller.runtimes import base
from controller.spec import models

from .conftest import wait_for

STORAGE = "blackhole/example-storage:{}"


def test_example_plugins_answer_through_the_gateway(controller):
    controller.write(
        "kv", "  state: {version: 2}\n", version="1.2.0", image=STORAGE.format("1.2.0")
    )
    controller.write(
        "stats",
        "  state: {version: 2}\n  config: {windows: [60]}\n",
        image="blackhole/example-analytics:1.0.0",
    )
    controller.start()
    wait_for(lambda: controller.ready("kv", "stats"), what="kv and stats Ready")
    assert controller.call("kv", "put", {"key": "a", "value": [1, 2]})[:2] == (
        200, {"key": "a", "revision": 1},
    )  # fmt: skip
    assert controller.call("kv", "get", {"key": "a"})[:2] == (
        200, {"key": "a", "value": [1, 2], "revision": 1},
    )  # fmt: skip
    status, answer, _ = controller.call("kv", "get", {"key": "missing"})
    assert (status, answer["reason"]) == (404, "PluginError")
    assert "no key 'missing'" in answer["error"]
    for value in (1, 2, 3, 10):
        assert controller.call("stats", "ingest", {"value": value})[0] == 200
    status, answer, _ = controller.call("stats", "query", {"window": 60})
    assert status == 200
    assert answer == {"window": 60, "count": 4, "mean": 4.0, "p95": 10.0}
    status, answer, _ = controller.call("nothing", "get", {})
    assert (status, answer["reason"]) == (404, "PluginNotFound")

    # gRPC passthrough: the same call, the plugin named in the metadata.
    with grpc.insecure_channel(controller.gateway("grpc")) as channel:
        handle = channel.unary_unary(
            "/blackhole.plugin.v1.Plugin/Handle",
            request_serializer=plugin_pb2.HandleRequest.SerializeToString,
            response_deserializer=plugin_pb2.HandleResponse.FromString,
        )
        request = plugin_pb2.HandleRequest(method="get", payload=b'{"key": "a"}')
        answer = handle(request, metadata=(("x-blackhole-plugin", "kv"),), timeout=10)
        assert json.loads(answer.payload)["value"] == [1, 2]
        with pytest.raises(grpc.RpcError) as unknown:
            handle(request, metadata=(("x-blackhole-plugin", "nothing"),), timeout=10)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def test_state_moves_between_instances_byte_for_byte_and_across_the_migration(controller):
    controller.write("old", "  state: {version: 1}\n", image=STORAGE.format("1.0.0"))
    controller.write(
        "new", "  state: {version: 2}\n", version="1.2.0", image=STORAGE.format("1.2.0")
    )
    controller.write(
        "twin", "  state: {version: 2}\n", version="1.2.0", image=STORAGE.format("1.2.0")
    )
    controller.start()
    wait_for(lambda: controller.ready("old", "new", "twin"), what="three stores Ready")
    for i in range(50):
        assert controller.call("old", "put", {"key": f"k{i}", "value": {"n": i}})[0] == 200

    async def transfer() -> tuple[client.State, client.State, client.State, client.State]:
        plugins = client.Clients()
        try:
            old, new, twin = (plugins.get(endpoint(controller, n)) for n in ("old", "new", "twin"))
            exported = await old.export_state(30)
            imported = await new.import_state(exported, 30)
            migrated = await new.export_state(30)
            await twin.import_state(migrated, 30)
            return exported, imported, migrated, await twin.export_state(30)
        finally:
            await plugins.close()

    exported, imported, migrated, copied = asyncio.run(transfer())
    assert exported.version == 1
    assert json.loads(exported.data) == {f"k{i}": {"n": i} for i in range(50)}
    assert (imported.version, imported.sha256) == (2, migrated.sha256)
    assert migrated.version == 2
    assert copied.data == migrated.data, "a version-2 state round-trips byte for byte"
    assert controller.call("twin", "get", {"key": "k7"})[1] == {
        "key": "k7", "value": {"n": 7}, "revision": 1,
    }  # fmt: skip


def endpoint(controller, name: str) -> str:
    instance = base.instance_name(name, models.Color.BLUE, None, controller.controller_id)
    return f"unix:{controller.data / 'instances' / instance / base.SOCKET_NAME}"


def test_tokens_sizes_rates_and_concurrency_are_enforced(controller, tmp_path: Path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        "  - {name: ops, token: ops-token-0123456789, plugins: ['*']}\n"
        "  - {name: narrow, token: narrow-token-0123456789, plugins: [small]}\n"
    )
    tokens.chmod(0o600)
    controller.extra_args += ["--gateway-tokens", str(tokens)]
    controller.write("small", "  gateway: {maxRequestBytes: 100}\n")
    controller.write("slow", "  gateway: {rateLimit: {callsPerSecond: 0.5, burst: 1}}\n")
    controller.write("narrow", "  gateway: {maxConcurrentCalls: 1}\n")
    controller.start()
    wait_for(lambda: controller.ready("small", "slow", "narrow"), what="three Ready")
    ops = {"Authorization": "Bearer ops-token-0123456789"}

    status, answer, headers = controller.call("small", "echo", {"a": 1})
    assert (status, answer["reason"]) == (401, "Unauthenticated")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert controller.call("small", "echo", {}, headers={"Authorization": "Bearer wrong"})[0] == 401
    narrow = {"Authorization": "Bearer narrow-token-0123456789"}
    assert controller.call("small", "echo", {"a": 1}, headers=narrow)[:2] == (200, {"a": 1})
    forbidden = controller.call("slow", "echo", {}, headers=narrow)
    unknown = controller.call("nothing", "echo", {}, headers=narrow)
    assert (forbidden[0], forbidden[1]["reason"]) == (404, "PluginNotFound")
    assert forbidden[1]["error"].replace("slow", "X") == unknown[1]["error"].replace("nothing", "X")

    status, answer, _ = controller.call("small", "echo", {"a": "x" * 200}, headers=ops)
    assert (status, answer["reason"]) == (413, "RequestTooLarge")

    assert controller.call("slow", "echo", {}, headers=ops)[0] == 200
    status, answer, headers = controller.call("slow", "echo", {}, headers=ops)
    assert (status, answer["reason"]) == (429, "RateLimited")
    assert int(headers["Retry-After"]) >= 1

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(controller.call, "narrow", "sleep", {"seconds": 2}, headers=ops)
        time.sleep(0.5)
        status, answer, headers = controller.call("narrow", "echo", {}, headers=ops)
        assert (status, answer["reason"]) == (429, "TooManyCalls")
        assert headers["Retry-After"] == "1"
        assert busy.result()[0] == 200


def test_down_plugins_timeouts_and_crashes_mid_call(controller):
    controller.write("mute", "  env: {MODE: mute}\n  health: {startupDeadlineSeconds: 600}\n")
    controller.write("victim", "  restart: {backoffSeconds: 0.2}\n")
    controller.write("bystander")
    controller.start()
    wait_for(lambda: controller.ready("victim", "bystander"), what="victim and bystander Ready")

    started = time.monotonic()
    status, answer, _ = controller.call("mute", "echo", {})
    assert (status, answer["reason"]) == (503, "PluginNotReady")
    assert time.monotonic() - started < 2, "a down plugin is answered at once, not timed out"

    status, answer, _ = controller.call(
        "bystander", "sleep", {"seconds": 5}, headers={"X-Timeout-Seconds": "0.5"}
    )
    assert (status, answer["reason"]) == (504, "Timeout")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        others = [
            pool.submit(controller.call, "bystander", "sleep", {"seconds": 1.5}),
            pool.submit(controller.call, "victim", "echo", {"before": True}),
        ]
        time.sleep(0.3)
        status, answer, _ = controller.call("victim", "crash", {})
        assert (status, answer["reason"]) == (502, "PluginFailed")
        assert [f.result()[0] for f in others] == [200, 200]
    assert controller.call("bystander", "echo", {"after": 1})[:2] == (200, {"after": 1})
    wait_for(lambda: controller.ready("victim"), what="victim restarted")
    assert controller.status("victim")["instances"][0]["restarts"] == 1
    assert controller.call("victim", "echo", {"again": 1})[:2] == (200, {"again": 1})


def test_plugins_reach_only_the_plugins_their_spec_lists_and_no_network(controller):
    controller.write("caller", "  permissions: {callPlugins: [callee]}\n")
    controller.write("callee")
    controller.write("secret")
    controller.start()
    wait_for(lambda: controller.ready("caller", "callee", "secret"), what="three Ready")
    controller.call("secret", "put", {"key": "k", "value": "hidden"})

    def through(plugin: str, method: str, payload: object) -> dict[str, object]:
        status, answer, _ = controller.call(
            "caller", "call", {"plugin": plugin, "method": method, "payload": payload}
        )
        assert status == 200
        return dict(answer)

    wait_for(lambda: "answer" in through("callee", "echo", {"x": 1}), what="the gateway socket")
    assert through("callee", "echo", {"x": 1}) == {"answer": {"x": 1}}
    refused = {"failed": 404, "reason": "PluginNotFound"}
    assert through("secret", "get", {"key": "k"}) == refused, "as if it did not exist"
    assert through("nothing", "get", {"key": "k"}) == refused

    secret = base.instance_name("secret", models.Color.BLUE, None, controller.controller_id)
    host_socket = controller.data / "instances" / secret / base.SOCKET_NAME
    gateway_host, gateway_port = controller.gateway().rsplit(":", 1)
    bridge = "172.17.0.1"  # Docker's bridge on the host, where the host's services answer
    for target in (
        {"path": str(host_socket)},
        {"path": f"/proc/1/root{host_socket}"},
        {"host": gateway_host, "port": int(gateway_port)},
        {"host": bridge, "port": int(gateway_port)},
        {"host": "1.1.1.1", "port": 53},
    ):
        for plugin in ("caller", "callee"):
            status, answer, _ = controller.call(plugin, "connect", target)
            assert status == 200
            assert answer["result"].startswith("refused"), (plugin, target, answer)


def test_an_incompatible_state_version_is_refused_with_the_reason(controller):
    controller.write(
        "mismatch", "  state: {version: 3}\n", version="1.2.0", image=STORAGE.format("1.2.0")
    )
    controller.start()
    wait_for(lambda: controller.status("mismatch").get("phase") == "Failed", what="Failed")
    ready = controller.condition("mismatch", "Ready")
    assert ready["reason"] == "StateVersionMismatch"
    assert "state version 2" in ready["message"]
    assert controller.containers() == {}, "nothing is left running"
