"""A small synchronous client of the admin API, for ``bhctl``.

It imports the standard library and the error hierarchy only: every ``bhctl``
command that talks to a running controller loads it, and must start fast.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from controller.errors import ControllerError
from controller.unix import unix_address


class AdminError(ControllerError):
    """The admin API answered with an error."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        issues = body.get("issues") or []
        message = body.get("error", f"HTTP {status}")
        super().__init__("\n".join([message, *issues]) if issues else message)


class ControllerNotRunningError(ControllerError):
    """Nothing answers on the admin socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            with unix_address(self.path) as address:
                sock.connect(address)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Calls the admin API of the controller whose data directory is given."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _call(
        self, method: str, path: str, body: str | bytes | None = None, **query: str
    ) -> dict[str, Any]:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            headers = {"Content-Type": "application/yaml"} if body is not None else {}
            data_out = body.encode() if isinstance(body, str) else body
            connection.request(method, path, body=data_out, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                text = raw[:200].decode(errors="replace")
                data = {"error": f"HTTP {response.status}, not JSON: {text}"}
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise ControllerNotRunningError(
                f"no controller answers on {self.socket_path}: start one with bhctl run, "
                "or point --data-dir at the one that runs"
            ) from e
        finally:
            connection.close()
        if response.status >= 400:
            raise AdminError(response.status, data)
        return dict(data)

    def list(self) -> dict[str, Any]:
        return self._call("GET", "/v1/plugins")

    def get(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/plugins/{urllib.parse.quote(name, safe='')}")

    def apply(self, text: str | bytes, origin: str, dry_run: bool = False) -> dict[str, Any]:
        """Apply specs; ``dry_run``: only say what each would change, applying nothing."""
        query = {"dryRun": "true"} if dry_run else {}
        return self._call("POST", "/v1/plugins", text, origin=origin, **query)

    def delete(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/plugins/{urllib.parse.quote(name, safe='')}")

    def top(self) -> dict[str, Any]:
        return self._call("GET", "/v1/top")

    def swap(self, name: str, action: str, revision: int | None = None) -> dict[str, Any]:
        query = {"revision": str(revision)} if revision is not None else {}
        return self._call(
            "POST", f"{_plugin(name)}/swap/{urllib.parse.quote(action, safe='')}", **query
        )

    def revisions(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"{_plugin(name)}/revisions")

    def state_history(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"{_plugin(name)}/state")

    def state_export(self, name: str, snapshot: int | None) -> dict[str, Any]:
        query = {"snapshot": str(snapshot)} if snapshot is not None else {}
        return self._call("GET", f"{_plugin(name)}/state/export", **query)

    def request(self, id: int, wait: float = 0.0) -> dict[str, Any]:
        """An operator's request and its outcome (Pending, Done or Refused); ``wait``: up to
        that many seconds for a pending one to be answered."""
        return self._call("GET", f"/v1/requests/{id}", wait=f"{wait:g}")

    def down(self, volumes: bool) -> dict[str, Any]:
        """Remove every instance the controller runs (and its volumes), then stop it."""
        return self._call("POST", "/v1/down", volumes=str(volumes).lower())

    def state_import(self, name: str, state_version: int, data: bytes) -> dict[str, Any]:
        body = json.dumps({"stateVersion": state_version, "data": base64.b64encode(data).decode()})
        return self._call("POST", f"{_plugin(name)}/state/import", body)

    def logs(
        self,
        name: str,
        color: str | None,
        tail: int,
        previous: bool = False,
        timestamps: bool = False,
        replica: int = 0,
    ) -> dict[str, Any]:
        query = {"tail": str(tail)} | ({"color": color} if color else {})
        if replica:
            query["replica"] = str(replica)
        if previous:
            query["previous"] = "true"
        if timestamps:
            query["timestamps"] = "true"
        return self._call("GET", f"/v1/plugins/{urllib.parse.quote(name, safe='')}/logs", **query)


def _plugin(name: str) -> str:
    return f"/v1/plugins/{urllib.parse.quote(name, safe='')}"
