"""Preview calls through the real gateway to a real swap's new color, on Docker and Podman:
they reach only the new color, never the active one, and end with the swap."""

from __future__ import annotations

from .conftest import ControllerProcess, bhctl, wait_for

STORAGE = "blackhole/example-storage:{}"
KV = """\
  state: {version: 2}
  hotSwap: {autoPromote: false, scaleDownDelaySeconds: 0}
"""
PREVIEW = {"X-Blackhole-Preview": "true"}


def write_kv(controller: ControllerProcess, version: str) -> None:
    controller.write("kv", KV, version=version, image=STORAGE.format(version))


def step(controller: ControllerProcess) -> str | None:
    swap = controller.status("kv").get("swap")
    return swap["step"] if swap else None


def test_preview_calls_reach_only_the_new_color(controller):
    write_kv(controller, "1.1.0")
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv 1.1.0 Ready")
    assert controller.call("kv", "put", {"key": "k", "value": 1})[0] == 200
    status, answer, _ = controller.call("kv", "get", {"key": "k"}, headers=PREVIEW)
    assert (status, answer["reason"]) == (409, "NoPreview"), "no swap: nothing to preview"

    write_kv(controller, "1.2.0")
    wait_for(lambda: step(controller) == "AwaitingPromotion", timeout=90, what="1.2.0 waiting")
    for n in range(50):
        status, _, _ = controller.call("kv", "put", {"key": f"p-{n}", "value": n}, headers=PREVIEW)
        assert status == 200
    assert controller.call("kv", "put", {"key": "k", "value": 99}, headers=PREVIEW)[0] == 200
    assert controller.call("kv", "get", {"key": "k"}, headers=PREVIEW)[1]["value"] == 99
    assert controller.call("kv", "get", {"key": "k"})[1]["value"] == 1, (
        "the active color is as it was"
    )
    listed = controller.call("kv", "list", {"prefix": "p-"})[1]["keys"]
    assert listed == [], "no preview call reached the active color"
    previewed = controller.call("kv", "list", {"prefix": "p-"}, headers=PREVIEW)[1]["keys"]
    assert len(previewed) == 50
    assert controller.status("kv")["activeVersion"] == "1.1.0"

    aborted = bhctl(controller, "swap", "abort", "kv", "--wait")
    assert aborted.returncode == 0, aborted.stderr
    wait_for(lambda: step(controller) is None, timeout=60, what="the abort")
    status, answer, _ = controller.call("kv", "get", {"key": "k"}, headers=PREVIEW)
    assert (status, answer["reason"]) == (409, "NoPreview"), "the preview ended with the swap"
    assert controller.call("kv", "get", {"key": "k"})[1]["value"] == 1
