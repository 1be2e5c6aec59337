"""Calls from one plugin to another, through the gateway and nothing else.

The controller gives an instance whose spec lists plugins in
``permissions.callPlugins`` a socket to the gateway, ``gateway.sock``
beside its own (``BLACKHOLE_GATEWAY_SOCKET``). The gateway knows the caller
by that socket and lets through only the calls its spec allows::

    from blackhole_sdk import calls

    class Checkout(Plugin):
        async def handle(self, method, payload):
            stock = await calls.call("inventory", "reserve", {"sku": payload["sku"]})
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
from typing import Any

import grpc

from blackhole_sdk.plugin import PluginError

DEFAULT_SOCKET = "/run/blackhole/gateway.sock"


class CallFailed(PluginError):
    """The gateway answered with an error: ``status`` (HTTP), ``reason`` and the message."""

    def __init__(self, http_status: int, reason: str, message: str) -> None:
        super().__init__(f"{http_status} {reason}: {message}", grpc.StatusCode.UNAVAILABLE)
        self.http_status = http_status
        self.reason = reason


async def call(
    plugin: str,
    method: str,
    payload: Any = None,
    *,
    timeout: float = 30.0,
    socket_path: str | None = None,
) -> Any:
    """Call ``method`` of ``plugin`` with ``payload`` (JSON); its decoded JSON answer."""
    path = socket_path or os.environ.get("BLACKHOLE_GATEWAY_SOCKET", DEFAULT_SOCKET)
    body = b"" if payload is None else json.dumps(payload).encode()
    target = f"/v1/plugins/{urllib.parse.quote(plugin)}/call/{urllib.parse.quote(method)}"
    head = (
        f"POST {target} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Timeout-Seconds: {timeout:g}\r\n"
        "Connection: close\r\n\r\n"
    )
    try:
        async with asyncio.timeout(timeout + 1):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(head.encode() + body)
                await writer.drain()
                answer = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as e:
        raise CallFailed(503, "GatewayUnreachable", f"{path}: {e}") from None
    header, _, content = answer.partition(b"\r\n\r\n")
    status_line = header.split(b"\r\n", 1)[0].decode(errors="replace")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        raise CallFailed(502, "BadAnswer", f"the gateway answered {status_line!r}") from None
    if b"transfer-encoding: chunked" in header.lower():
        content = _unchunk(content)
    decoded = json.loads(content) if content else None
    if status != 200:
        problem = decoded if isinstance(decoded, dict) else {}
        raise CallFailed(status, str(problem.get("reason", "")), str(problem.get("error", "")))
    return decoded


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)
