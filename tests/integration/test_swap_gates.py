"""A swap's gates and its history with real plugins under a real controller, on Docker and
Podman: a PrePromotion webhook that says no holds the swap (each delivery signed) until it
says yes, and ``bhctl swap undo --to-revision`` goes back to a kept revision with the
plugin's state carried across."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import ControllerProcess, bhctl, wait_for

STORAGE = "blackhole/example-storage:{}"
SECRET = b"a-webhook-secret-of-some-length"
GATED = """\
  state: {{version: 2}}
  health: {{periodSeconds: 1}}
  hotSwap:
    scaleDownDelaySeconds: 0
    webhooks:
      - {{name: gate, type: PrePromotion, url: "{url}/gate", timeoutSeconds: 5, retries: 0}}
"""
PLAIN = """\
  state: {version: 2}
  hotSwap: {scaleDownDelaySeconds: 0}
"""


@dataclass
class Receiver:
    """An HTTP server on loopback that records each POST and answers ``status``."""

    status: int = 403
    received: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def deliveries(self) -> list[tuple[bytes, dict[str, str]]]:
        with self._lock:
            return list(self.received)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with found._lock:
                found.received.append((body, {k.lower(): v for k, v in self.headers.items()}))
                status = found.status
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no" if status >= 300 else b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()


def write_kv(controller: ControllerProcess, version: str, body: str) -> None:
    controller.write("kv", body, version=version, image=STORAGE.format(version))


def value(controller: ControllerProcess, key: str) -> Any:
    status, answer, _ = controller.call("kv", "get", {"key": key})
    assert status == 200, answer
    return answer["value"]


def settled_on(controller: ControllerProcess, version: str) -> None:
    """Wait until ``version`` serves and no swap is in progress."""

    def settled() -> bool:
        status = controller.status("kv")
        return status.get("activeVersion") == version and status.get("swap") is None

    wait_for(settled, timeout=120, what=f"{version} serving, no swap in progress")


def progressing(controller: ControllerProcess) -> str | None:
    return controller.condition("kv", "Progressing").get("reason")


def test_a_pre_promotion_webhook_that_says_no_blocks_promotion_until_it_says_yes(
    controller: ControllerProcess, receiver: Receiver, tmp_path: Path
):
    secret = tmp_path / "webhook-secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    controller.extra_args = ["--webhook-secret", str(secret)]
    write_kv(controller, "1.1.0", GATED.format(url=receiver.url))
    controller.start()
    wait_for(lambda: controller.ready("kv"), timeout=90, what="kv 1.1.0 Ready")
    assert controller.call("kv", "put", {"key": "k", "value": 1})[0] == 200
    assert receiver.deliveries() == [], "no swap, no hook"

    write_kv(controller, "1.2.0", GATED.format(url=receiver.url))
    wait_for(
        lambda: progressing(controller) == "SwapBlockedByWebhook",
        timeout=120,
        what=lambda: f"the swap blocked by the hook: {json.dumps(controller.status('kv'))}",
    )
    wait_for(lambda: len(receiver.deliveries()) >= 3, timeout=60, what="the hook asked again")
    status = controller.status("kv")
    assert status["activeVersion"] == "1.1.0", "blocked: the old version serves"
    assert status["swap"]["step"] == "AwaitingPromotion"
    assert "gate" in controller.condition("kv", "Progressing")["message"]
    assert value(controller, "k") == 1
    for body, headers in receiver.deliveries():
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-blackhole-signature-256"], expected)
        said = json.loads(body)
        assert (said["kind"], said["type"], said["name"]) == ("SwapWebhook", "PrePromotion", "gate")
        assert (said["fromVersion"], said["toVersion"]) == ("1.1.0", "1.2.0")
        assert headers["x-blackhole-delivery"] == said["id"]
    refused = bhctl(controller, "swap", "promote", "kv", "--wait", timeout=120)
    assert refused.returncode != 0, refused.stdout
    assert "gate" in refused.stderr + refused.stdout

    receiver.status = 200
    wait_for(
        lambda: (
            controller.status("kv").get("activeVersion") == "1.2.0"
            and (controller.status("kv").get("lastSwap") or {}).get("result") == "Promoted"
        ),
        timeout=120,
        what="the swap promoted once the hook says yes",
    )
    assert value(controller, "k") == 1


def test_undo_to_a_revision_goes_back_to_it_with_the_state(controller: ControllerProcess):
    write_kv(controller, "1.1.0", PLAIN)
    controller.start()
    wait_for(lambda: controller.ready("kv"), timeout=90, what="kv 1.1.0 Ready")
    for n in range(20):
        assert controller.call("kv", "put", {"key": f"k{n}", "value": n})[0] == 200
    write_kv(controller, "1.2.0", PLAIN)
    settled_on(controller, "1.2.0")
    assert controller.call("kv", "put", {"key": "later", "value": "on 1.2.0"})[0] == 200

    listed = bhctl(controller, "swap", "history", "kv", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    revisions = json.loads(listed.stdout)["revisions"]
    assert [(r["revision"], r["version"]) for r in revisions] == [(1, "1.1.0"), (2, "1.2.0")]
    missing = bhctl(controller, "swap", "undo", "kv", "--to-revision", "9")
    assert missing.returncode == 1
    assert "no revision 9 of kv is kept" in missing.stderr

    undone = bhctl(controller, "swap", "undo", "kv", "--to-revision", "1", "--wait", timeout=300)
    assert undone.returncode == 0, undone.stderr
    assert "going back to revision 1 (1.1.0)" in undone.stdout
    settled_on(controller, "1.1.0")
    for n in (0, 19):
        assert value(controller, f"k{n}") == n
    assert value(controller, "later") == "on 1.2.0", "what the later revision wrote is carried back"
    history = json.loads(bhctl(controller, "swap", "history", "kv", "-o", "json").stdout)
    newest = history["revisions"][-1]
    assert (newest["revision"], newest["version"]) == (3, "1.1.0")
    assert newest["specHash"] == revisions[0]["specHash"]
    assert newest["result"] == "Promoted"
    assert controller.condition("kv", "Pinned").get("status") == "True", "until the spec changes"
