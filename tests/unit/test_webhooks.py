"""Swap webhooks against a real aiohttp receiver on loopback: a hook that says no blocks
promotion until it says yes, or rolls the swap back; the signature checks; retries with
backoff; the rollback hook is told; URLs that may not be called are refused."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from pydantic import ValidationError

from controller.spec import conditions, models
from controller.state import snapshots
from controller.swap import webhooks

from .test_reconciler import World

SECRET = b"a-secret-of-at-least-16-bytes"
SPEC = "  state: {{version: 1}}\n  hotSwap:\n    scaleDownDelaySeconds: 30\n{more}"


@dataclass
class Receiver:
    """An HTTP server that records each POST and answers with the next status of its path."""

    url: str = ""
    answers: dict[str, list[int]] = field(default_factory=dict)
    received: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    def said(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(body) for where, body, _ in self.received if where == path]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path.lstrip("/")
        self.received.append((path, body, dict(request.headers)))
        statuses = self.answers.get(path, [200])
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return web.Response(status=status, text="no" if status >= 300 else "yes")


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/{path:.*}", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


@pytest_asyncio.fixture
async def kv(tmp_path: Path) -> AsyncIterator[World]:
    world = World(tmp_path)
    world.reconciler.snapshots = snapshots.Snapshots(tmp_path / "data" / "snapshots.db")
    world.reconciler.webhooks = webhooks.Sender(SECRET)
    world.write("kv", version="1.0.0", extra=SPEC.format(more=""))
    status = await world.settle("kv")
    assert conditions.is_true(status.conditions, "Ready")
    world.plugins.states["bh-kv-blue"] = b'{"a": 1}'
    yield world
    await world.reconciler.webhooks.close()


def hooks(receiver: Receiver, *entries: str) -> str:
    """The spec's webhooks, each "TYPE path [onFailure] [retries]"."""
    lines = ["    webhooks:"]
    for entry in entries:
        type, path, *rest = entry.split()
        lines.append(f"      - {{name: {path}, type: {type}, url: '{receiver.url}/{path}'")
        if rest:
            lines[-1] += f", onFailure: {rest[0]}"
        if len(rest) > 1:
            lines[-1] += f", retries: {rest[1]}"
        lines[-1] += "}"
    return "\n".join(lines) + "\n"


def swap_to(world: World, version: str, more: str) -> None:
    world.write("kv", version=version, extra=SPEC.format(more=more))


async def test_a_pre_promotion_hook_that_says_no_blocks_promotion_until_it_says_yes(
    kv: World, receiver: Receiver
) -> None:
    receiver.answers["gate"] = [403]
    swap_to(kv, "1.1.0", hooks(receiver, "PrePromotion gate"))
    status = await kv.settle("kv")
    assert status.active_color is models.Color.BLUE, "not promoted"
    assert status.swap is not None
    assert status.swap.step is models.SwapStep.AWAITING_PROMOTION
    progressing = conditions.find(status.conditions, "Progressing")
    assert progressing is not None
    assert progressing.reason == "SwapBlockedByWebhook"
    assert "webhook gate (PrePromotion) said no" in progressing.message
    assert "HTTP 403: no" in progressing.message
    assert conditions.is_true(status.conditions, "Ready"), "the old color serves meanwhile"
    asked = len(receiver.said("gate"))
    assert asked >= 2, "asked again at each pass"
    [body, *_] = receiver.said("gate")
    assert body["type"] == "PrePromotion"
    assert body["kind"] == "SwapWebhook"
    assert (body["plugin"], body["fromVersion"], body["toVersion"]) == ("kv", "1.0.0", "1.1.0")
    assert (body["fromColor"], body["toColor"]) == ("blue", "green")

    receiver.answers["gate"] = [200]
    status = await kv.settle("kv", passes=2)
    assert status.active_color is models.Color.GREEN
    assert status.active_version == "1.1.0"


async def test_a_promote_while_a_hook_says_no_is_refused_with_why(
    kv: World, receiver: Receiver
) -> None:
    receiver.answers["gate"] = [412]
    more = "    autoPromote: false\n" + hooks(receiver, "PrePromotion gate")
    swap_to(kv, "1.1.0", more)
    await kv.settle("kv")
    assert receiver.said("gate") == [], "not asked before the promotion is"
    asked = kv.reconciler.request("kv", "promote")
    status = await kv.settle("kv", passes=1)
    answer = kv.store.request(asked.id)
    assert answer is not None
    assert answer.outcome == "Refused"
    assert "HTTP 412" in answer.message
    assert status.active_color is models.Color.BLUE
    assert status.swap is not None


async def test_each_post_is_signed_with_the_secret(kv: World, receiver: Receiver) -> None:
    swap_to(kv, "1.1.0", hooks(receiver, "PrePromotion gate"))
    await kv.settle("kv")
    assert receiver.received
    for _, body, headers in receiver.received:
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers[webhooks.SIGNATURE_HEADER], expected)
        assert headers[webhooks.DELIVERY_HEADER] == json.loads(body)["id"]
        wrong = "sha256=" + hmac.new(b"another-secret-16b", body, hashlib.sha256).hexdigest()
        assert headers[webhooks.SIGNATURE_HEADER] != wrong


async def test_unsigned_without_a_secret(receiver: Receiver) -> None:
    sender = webhooks.Sender()
    hook = models.Webhook(name="a", type="Rollback", url=f"{receiver.url}/a")
    try:
        [outcome] = await sender.send([hook], "Rollback", {"plugin": "kv"})
    finally:
        await sender.close()
    assert outcome.ok
    [(_, _, headers)] = receiver.received
    assert webhooks.SIGNATURE_HEADER not in headers


async def test_failures_are_tried_again_with_backoff_and_a_4xx_is_an_answer(
    receiver: Receiver,
) -> None:
    sender = webhooks.Sender(SECRET)
    receiver.answers = {"flaky": [503, 502, 200], "short": [503, 503, 200], "no": [404, 200]}
    flaky = models.Webhook(name="flaky", type="PrePromotion", url=f"{receiver.url}/flaky")
    short = models.Webhook(
        name="short", type="PrePromotion", url=f"{receiver.url}/short", retries=1
    )
    no = models.Webhook(name="no", type="PrePromotion", url=f"{receiver.url}/no", retries=5)
    try:
        outcomes = await sender.send([flaky, short, no], "PrePromotion", {"plugin": "kv"})
    finally:
        await sender.close()
    found = {o.hook.name: (o.ok, o.attempts) for o in outcomes}
    assert found == {"flaky": (True, 3), "short": (False, 2), "no": (False, 1)}
    assert "HTTP 503" in next(o.message for o in outcomes if o.hook.name == "short")
    assert len(receiver.said("flaky")) == 3
    ids = {b["id"] for b in receiver.said("flaky")}
    assert len(ids) == 1, "one delivery, tried again"


async def test_no_answer_at_all_is_tried_again_then_fails(receiver: Receiver) -> None:
    sender = webhooks.Sender()
    closed = receiver.url.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
    hook = models.Webhook(name="gone", type="PrePromotion", url=f"{closed}/x", retries=1)
    try:
        [outcome] = await sender.send([hook], "PrePromotion", {})
    finally:
        await sender.close()
    assert (outcome.ok, outcome.attempts) == (False, 2)
    assert outcome.message.startswith("not reached")


async def test_a_hook_set_to_roll_back_rolls_back_and_the_rollback_hook_is_told(
    kv: World, receiver: Receiver
) -> None:
    receiver.answers["gate"] = [500]
    more = hooks(receiver, "PrePromotion gate RollBack 0", "Rollback told")
    swap_to(kv, "1.1.0", more)
    status = await kv.settle("kv")
    assert status.active_color is models.Color.BLUE
    assert status.swap is None
    assert status.last_swap is not None
    assert (status.last_swap.result, status.last_swap.reason) == (
        "RolledBack",
        "SwapFailedWebhook",
    )
    assert set(kv.runtime.instances) == {"bh-kv-blue"}
    [told] = receiver.said("told")
    assert told["type"] == "Rollback"
    assert (told["reason"], told["result"]) == ("SwapFailedWebhook", "RolledBack")
    assert "webhook gate (PrePromotion) said no" in told["message"]
    value = kv.reconciler.metrics.registry.get_sample_value(
        "blackhole_swap_webhooks_total", {"plugin": "kv", "type": "Rollback", "result": "Passed"}
    )
    assert value == 1


async def test_a_post_promotion_hook_that_says_no_returns_to_the_old_color(
    kv: World, receiver: Receiver
) -> None:
    receiver.answers["after"] = [409]
    more = hooks(receiver, "PostPromotion after", "Rollback told")
    swap_to(kv, "1.1.0", more)
    status = await kv.settle("kv")
    assert status.active_color is models.Color.GREEN, "promoted"
    assert receiver.said("after") == [], "asked when the scale-down window has passed"
    kv.plugins.states["bh-kv-green"] = b'{"a": 2}'
    kv.clock.offset += 31
    status = await kv.settle("kv", passes=1)
    assert len(receiver.said("after")) == 1
    assert status.active_color is models.Color.BLUE
    assert status.last_swap is not None
    assert status.last_swap.reason == "SwapFailedWebhook"
    assert kv.plugins.states["bh-kv-blue"] == b'{"a": 2}', "what the new color wrote came back"
    assert len(receiver.said("told")) == 1


async def test_a_post_promotion_hook_that_blocks_keeps_the_old_color(
    kv: World, receiver: Receiver
) -> None:
    receiver.answers["after"] = [503]
    swap_to(kv, "1.1.0", hooks(receiver, "PostPromotion after Block 0"))
    await kv.settle("kv")
    kv.clock.offset += 31
    status = await kv.settle("kv", passes=2)
    assert set(kv.runtime.instances) == {"bh-kv-blue", "bh-kv-green"}, "both kept"
    assert status.swap is not None
    progressing = conditions.find(status.conditions, "Progressing")
    assert progressing is not None
    assert progressing.reason == "SwapBlockedByWebhook"
    assert "bh-kv-blue is kept meanwhile" in progressing.message
    receiver.answers["after"] = [204]
    status = await kv.settle("kv", passes=1)
    assert status.swap is None
    assert set(kv.runtime.instances) == {"bh-kv-green"}


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://169.254.169.254/latest/meta-data", "link-local or metadata"),
        ("http://[fe80::1]:80/", "link-local or metadata"),
        ("http://[fd00:ec2::254]/", "link-local or metadata"),
        ("http://metadata.google.internal/", "link-local or metadata"),
        ("file:///etc/passwd", "not an http or https URL"),
        ("gopher://example.com/", "not an http or https URL"),
        ("https://user:pw@example.com/", "credentials in the URL"),
    ],
)
def test_urls_that_may_not_be_called_are_refused_naming_the_field(url: str, said: str) -> None:
    with pytest.raises(ValidationError) as raised:
        models.HotSwap.model_validate(
            {"webhooks": [{"name": "a", "type": "PrePromotion", "url": url}]}
        )
    assert said in str(raised.value)
    assert "webhooks.0.url" in str(raised.value)


def test_hook_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="a Rollback hook only tells"):
        models.Webhook.model_validate(
            {"name": "a", "type": "Rollback", "url": "http://x/", "onFailure": "Block"}
        )
    with pytest.raises(ValidationError, match="a more than once"):
        models.HotSwap.model_validate(
            {"webhooks": [{"name": "a", "type": "Rollback", "url": "http://x/"}] * 2}
        )
    hook = models.Webhook.model_validate({"name": "a", "type": "PostPromotion", "url": "http://x"})
    assert hook.failure == "RollBack"


def test_the_secret_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o644)
    with pytest.raises(webhooks.WebhookSecretError, match="chmod 600"):
        webhooks.read_secret(path)
    path.chmod(0o600)
    assert webhooks.read_secret(path) == SECRET
    path.write_bytes(b"short")
    with pytest.raises(webhooks.WebhookSecretError, match="at least 16"):
        webhooks.read_secret(path)
