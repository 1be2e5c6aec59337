"""The dashboard's pieces that need no controller: the tokens' ``dashboard: admin``, the
escaping of what documents carry, which actions apply, and the charts."""

from __future__ import annotations

import html.parser
from pathlib import Path
from typing import Any

import pytest

from controller.dashboard import charts, history, pages
from controller.gateway import auth

HOSTILE = '<script>alert("x")</script>'


def write_tokens(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_only_a_token_marked_dashboard_admin_may_act(tmp_path):
    path = write_tokens(
        tmp_path,
        "tokens:\n"
        "  - {name: ops, token: aaaaaaaaaaaaaaaa1, plugins: ['*'], dashboard: admin}\n"
        "  - {name: app, token: bbbbbbbbbbbbbbbb2, plugins: [kv]}\n",
    )
    tokens = auth.Tokens.load(path)
    ops, app = tokens.find("aaaaaaaaaaaaaaaa1"), tokens.find("bbbbbbbbbbbbbbbb2")
    assert ops is not None
    assert ops.dashboard_admin
    assert app is not None
    assert not app.dashboard_admin


@pytest.mark.parametrize("value", ["true", "read", "[admin]"])
def test_a_dashboard_value_other_than_admin_is_refused(tmp_path, value):
    path = write_tokens(
        tmp_path, f"tokens:\n  - {{name: ops, token: aaaaaaaaaaaaaaaa1, plugins: ['*'], "
        f"dashboard: {value}}}\n",
    )  # fmt: skip
    with pytest.raises(auth.TokensFileError, match=r"tokens\[0\]\.dashboard"):
        auth.Tokens.load(path)


def plugin(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "kv"},
        "spec": {"image": HOSTILE, "version": "1.0.0", "resources": {"cpu": "250m"}},
        "status": {"phase": "Running", **status},
    }


class Texts(html.parser.HTMLParser):
    """Every element and text of a page, to find what a browser would run."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_what_documents_carry_is_escaped_everywhere():
    answer = {
        "plugin": plugin(
            conditions=[
                {"type": "Ready", "status": "False", "reason": "X", "message": HOSTILE,
                 "lastTransitionTime": "2026-01-01T00:00:00+00:00"}
            ],
            instances=[{"color": "blue", "version": HOSTILE, "state": "running", "ready": True}],
            activeColor="blue",
        ),
        "origin": HOSTILE,
        "events": [
            {"type": "Warning", "reason": "R", "message": HOSTILE, "count": 1,
             "lastTimestamp": "2026-01-01T00:00:00+00:00"}
        ],
    }  # fmt: skip
    page = pages.layout(
        HOSTILE,
        pages.plugin_page(answer, [], [], "", "ctl")
        + pages.plugin_list({"items": [answer["plugin"]], "errors": []}, HOSTILE),
    )
    parsed = Texts()
    parsed.feed(page)
    assert parsed.tags.count("script") == 1, "only the dashboard's own script"
    assert sum(HOSTILE in t for t in parsed.text) >= 5, "shown as text"


def test_the_actions_that_apply_follow_the_swap():
    assert pages.allowed_actions(plugin()) == dict.fromkeys(pages.ACTIONS, False)
    paused = plugin(swap={"step": "AwaitingPromotion"})
    assert pages.allowed_actions(paused) == {
        "promote": True, "abort": True, "undo": False, "retry": False,
    }  # fmt: skip
    promoted = plugin(lastSwap={"result": "Promoted", "fromHash": "abc"})
    assert pages.allowed_actions(promoted)["undo"] is True
    rolled_back = plugin(lastSwap={"result": "RolledBack"})
    assert pages.allowed_actions(rolled_back) == {
        "promote": False, "abort": False, "undo": False, "retry": True,
    }  # fmt: skip


def test_the_swap_tree_marks_the_active_and_the_preview_color():
    document = plugin(
        activeColor="blue",
        instances=[
            {"color": "blue", "version": "1.0.0", "state": "running", "ready": True},
            {"color": "green", "version": "1.1.0", "state": "running", "ready": True},
        ],
        swap={"step": "AwaitingPromotion", "fromColor": "blue", "toColor": "green",
              "fromVersion": "1.0.0", "toVersion": "1.1.0", "fromHash": "h1", "toHash": "h2",
              "started": "2026-01-01T00:00:00+00:00"},
    )  # fmt: skip
    revisions = [{"revision": 1, "specHash": "h1"}, {"revision": 2, "specHash": "h2"}]
    tree = pages.swap_tree(document, revisions, "default")
    blue, green = tree.split('data-color="green"')
    assert "revision 1" in blue
    assert 'mark active"' in blue
    assert "preview" not in blue
    assert "revision 2" in green
    assert 'mark preview"' in green
    assert "active" not in green
    assert "bh-kv-green" in green


def test_the_swap_tree_shows_a_canarys_weights_its_replicas_and_its_analysis():
    document = plugin(
        activeColor="blue",
        instances=[
            {"color": "blue", "version": "1.0.0", "state": "running", "ready": True},
            {"color": "blue", "version": "1.0.0", "state": "running", "ready": True,
             "replica": 1},
            {"color": "green", "version": "1.1.0", "state": "running", "ready": True},
            {"color": "green", "version": "1.1.0", "state": "exited", "ready": False,
             "replica": 1},
        ],
        swap={"step": "Canary", "fromColor": "blue", "toColor": "green", "weight": 30,
              "fromVersion": "1.0.0", "toVersion": "1.1.0", "fromHash": "h1", "toHash": "h2",
              "started": "2026-01-01T00:00:00+00:00",
              "analysis": {"at": "step 2 of 3", "phase": "Running", "measurements": [
                  {"name": "success", "phase": "Running", "measured": 2, "failures": 1,
                   "value": 0.8}]}},
    )  # fmt: skip
    revisions = [{"revision": 1, "specHash": "h1"}, {"revision": 2, "specHash": "h2"}]
    tree = pages.swap_tree(document, revisions, "default")
    blue, green = tree.split('data-color="green"')
    assert 'data-weight="70"' in blue
    assert "70% of calls" in blue
    assert "bh-kv-blue</code>" in blue
    assert "bh-kv-blue-1</code>" in blue
    assert 'data-weight="30"' in green
    assert 'mark canary"' in green
    assert "bh-kv-green-1</code>: exited, not ready" in green
    assert "analysis step 2 of 3" in green
    assert "success: Running, 2 measured, 1 failed, last 0.8" in green
    assert "30% of calls to the new color" in tree


def test_charts_scale_to_the_limit_and_tell_their_numbers():
    drawn = charts.lines("CPU", {"blue": [(0.0, 0.1), (5.0, 0.2)]}, limit=0.5, unit=" cores")
    assert "<polyline" in drawn
    assert 'class="limit"' in drawn
    assert "latest: blue 0.2 cores; limit 0.5 cores" in drawn
    assert "no readings yet" in charts.lines("CPU", {})
    pauses = charts.dots("Pauses", [(0.0, 12.0, True), (1.0, 300.0, False)], bound=200)
    assert pauses.count("<circle") == 2
    assert "rolled-back" in pauses
    assert "the last held calls 300 ms" in pauses


async def test_history_keeps_each_color_and_each_swap_once():
    rows = [{"plugin": "kv", "color": "blue", "cpuCores": 0.1, "memoryWorkingSetBytes": 10,
             "memoryLimitBytes": 100}]  # fmt: skip
    listing = {
        "items": [plugin(lastSwap={"pauseMilliseconds": 7.5, "time": "2026-01-01T00:00:00+00:00",
                                   "result": "Promoted", "to": "1.1.0"})]
    }  # fmt: skip

    async def top() -> list[dict[str, Any]]:
        return rows

    async def listed() -> dict[str, Any]:
        return listing

    kept = history.History(top, listed)
    await kept.sample()
    await kept.sample()
    assert [u.memory_bytes for u in kept.usage_of("kv")["blue"]] == [10, 10]
    assert [(p.milliseconds, p.result) for p in kept.pauses_of("kv")] == [(7.5, "Promoted")]
