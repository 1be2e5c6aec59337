"""The plugin the integration tests run: serves the protocol, or misbehaves as MODE says.

MODE=serve (default): serve until SIGTERM. Methods: ``echo`` (answers its
payload), ``who`` (answers its version and color), ``sleep`` (``{"seconds": s}``),
``put``/``get`` (a map: its state), ``crash`` (the process dies in the middle of the
call), ``connect`` ``spin`` (``{"seconds": s}``: burns CPU), ``allocate`` (``{"mib": n}``:
holds that much memory), ``connect``
(``{"host": h, "port": p}`` or ``{"path": p}``: tries to open a connection
and says what happened), ``call`` (``{"plugin", "method", "payload"}``: calls
another plugin through the gateway), ``run`` (``{"argv": [...]}``: runs a
command, answers its exit code and output). MODE=crash: print a line and exit 3 at once.
MODE=mute: run, but never listen (never Ready). MODE=tamper: never listen,
but make the name of its socket a link to the socket of instance VICTIM (a
plugin that tries to have the controller's calls for it sent to another
plugin). STATE_VERSION: the state
version it declares (default 0: none); CRASH_AFTER_IMPORT=S: exit 3 S seconds
after importing state; FAIL=import: refuse every import. STATEFUL=1: keep the
map in the SDK's Store (revisions and deltas, as StatefulPlugin does);
DIVERGE=1 with it: write a key of its own after each whole import, so that
the next delta (made on the exporter's revision) no longer applies.
LINK_OUT=PATH: before it listens, put a directory beside its socket holding a
link to PATH. FAIL_RATE=F: fail that share of calls at random (gRPC INTERNAL, a 500).
"""

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any

import grpc
from blackhole_sdk import Plugin, PluginError, StatefulPlugin, calls, serve

mode = os.environ.get("MODE", "serve")
fail_rate = float(os.environ.get("FAIL_RATE", "0"))
print(f"test plugin {os.environ.get('BLACKHOLE_PLUGIN')} mode={mode}", flush=True)


class TestPlugin(Plugin):
    state_version = int(os.environ.get("STATE_VERSION", "0"))

    def initialize(self, config: dict[str, Any]) -> None:
        self.data: dict[str, Any] = {}

    async def handle(self, method: str, payload: Any) -> Any:
        payload = payload or {}
        if fail_rate and random.random() < fail_rate:
            raise PluginError("failing on purpose (FAIL_RATE)", grpc.StatusCode.INTERNAL)
        if method == "echo":
            return payload
        if method == "who":
            return {
                "version": os.environ.get("BLACKHOLE_VERSION"),
                "color": os.environ.get("BLACKHOLE_COLOR"),
            }
        if method == "sleep":
            await asyncio.sleep(float(payload["seconds"]))
            return {"slept": payload["seconds"]}
        if method == "put":
            self.data[str(payload["key"])] = payload.get("value")
            return {"stored": payload["key"]}
        if method == "get":
            return {"value": self.data.get(str(payload["key"]))}
        if method == "spin":  # burn CPU for a while, on the event loop
            until = time.monotonic() + float(payload["seconds"])
            while time.monotonic() < until:
                sum(i * i for i in range(10_000))
            return {"spun": payload["seconds"]}
        if method == "allocate":  # grow by this many MiB, past the limit if asked
            self.ballast = [bytearray(1 << 20) for _ in range(int(payload["mib"]))]
            for block in self.ballast:
                block[::4096] = b"x" * len(block[::4096])
            return {"allocated": payload["mib"]}
        if method == "crash":
            print("crashing in the middle of a call", file=sys.stderr, flush=True)
            os._exit(3)
        if method == "connect":
            return {"result": _connect(payload)}
        if method == "run":
            done = subprocess.run(
                payload["argv"], capture_output=True, text=True, timeout=10, check=False
            )
            return {"code": done.returncode, "output": done.stdout + done.stderr}
        if method == "call":
            try:
                answer = await calls.call(
                    payload["plugin"], payload["method"], payload.get("payload")
                )
            except calls.CallFailed as e:
                return {"failed": e.http_status, "reason": e.reason}
            return {"answer": answer}
        raise PluginError(f"unknown method {method!r}")

    def export_state(self) -> bytes:
        return json.dumps(self.data, sort_keys=True).encode()

    def import_state(self, state: bytes) -> None:
        if os.environ.get("FAIL") == "import":
            raise PluginError("this build cannot read that state (FAIL=import)")
        self.data = json.loads(state) if state else {}
        crash_after = os.environ.get("CRASH_AFTER_IMPORT")
        if crash_after:
            print(f"crashing {crash_after}s after this import", file=sys.stderr, flush=True)
            asyncio.get_running_loop().call_later(float(crash_after), os._exit, 3)


def _connect(target: dict[str, Any]) -> str:
    family = socket.AF_UNIX if "path" in target else socket.AF_INET
    address: Any = target["path"] if "path" in target else (target["host"], int(target["port"]))
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(address)
        except OSError as e:
            return f"refused: {e}"
    return "connected"


class StatefulTestPlugin(StatefulPlugin, TestPlugin):
    """The same calls, the map in a Store: swaps move deltas."""

    state_version = int(os.environ.get("STATE_VERSION", "1"))

    def initialize(self, config: dict[str, Any]) -> None:
        self.data = self.state  # type: ignore[assignment]

    def import_snapshot(self, state: bytes, revision: str) -> None:
        if os.environ.get("FAIL") == "import":
            raise PluginError("this build cannot read that state (FAIL=import)")
        super().import_snapshot(state, revision)
        if os.environ.get("DIVERGE") == "1":  # right after answering the import
            color = os.environ.get("BLACKHOLE_COLOR", "")
            asyncio.get_running_loop().call_soon(self.state.__setitem__, "diverged", color)


if mode == "crash":
    print("boom: crashing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
if os.environ.get("LINK_OUT"):
    here = os.path.dirname(os.environ["BLACKHOLE_SOCKET"])
    os.mkdir(os.path.join(here, ".staged"))
    os.symlink(os.environ["LINK_OUT"], os.path.join(here, ".staged", "out"))
    os.rename(os.path.join(here, ".staged"), os.path.join(here, "linked"))  # appears whole
if mode == "tamper":
    own = os.environ["BLACKHOLE_SOCKET"]
    # The instance's socket directory is instances/<instance> on the host: "../VICTIM" beside it.
    victim = os.path.join("..", os.environ["VICTIM"], os.path.basename(own))
    os.symlink(victim, own + ".link")
    os.rename(own + ".link", own)  # the link appears whole: no socket was ever there
    print(f"{own} now links to {victim}", flush=True)
if mode in ("mute", "tamper"):
    while True:
        time.sleep(3600)
serve(StatefulTestPlugin() if os.environ.get("STATEFUL") == "1" else TestPlugin())
