"""The web dashboard (``bhctl run --dashboard-addr``) in a real Chromium, against a real
controller on Docker: the plugin list, a swap seen live on a plugin's page, the swap
actions behind the gateway's tokens, and the catalog. The screenshots of the docs
(``docs/assets/dashboard-*.png``) are taken by these tests.

Needs Debian's chromium (``scripts/engines.sh browser``) and the ``playwright`` package,
which drives it; no browser is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from controller.runtimes import base, container
from tests import bundles

from .conftest import SESSION, ControllerProcess, _remove, get_engine, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "plugins"
ASSETS = ROOT / "docs" / "assets"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ADMIN_TOKEN = "dashboard-admin-token-0123456789"
CALLER_TOKEN = "plain-caller-token-0123456789ab"
REPOSITORY = f"blackhole/dashboard-test-{SESSION}"
WAIT_MS = 120_000
"""How long the browser waits for what a swap shows, on a loaded machine."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium as playwright drives it, with a fresh profile; fails when it is missing."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/engines.sh browser (make setup)")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="bh-chromium-")
    with sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1100, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    opened = browser.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    try:
        yield opened
    finally:
        opened.close()
    assert problems == [], f"the page's script failed: {problems}"


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[ControllerProcess]:
    """A controller on Docker running the example plugins, with its dashboard and two
    tokens: one with ``dashboard: admin``, one without."""
    engine = get_engine(container.Engine.DOCKER)
    process = ControllerProcess(engine, tmp_path)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        f"  - {{name: operator, token: {ADMIN_TOKEN}, plugins: ['*'], dashboard: admin}}\n"
        f"  - {{name: caller, token: {CALLER_TOKEN}, plugins: ['*']}}\n"
    )
    tokens.chmod(0o600)
    for spec in EXAMPLES.glob("*.yaml"):
        shutil.copy(spec, process.specs / spec.name)
    process.extra_args = ["--dashboard-addr", "127.0.0.1:0", "--gateway-tokens", str(tokens)]
    try:
        yield process
    finally:
        process.end()
        _remove(engine.client, f"{base.LABEL_CONTROLLER}={process.controller_id}")
        for found in engine.client.images.list():
            for tag in found.tags:
                if tag.startswith(REPOSITORY):
                    with contextlib.suppress(docker.errors.APIError):
                        engine.client.images.remove(tag, force=True)


def address(controller: ControllerProcess) -> str:
    """The dashboard's URL, once the controller wrote where it listens."""
    path = controller.data / "addresses.json"

    def written() -> str | None:
        return json.loads(path.read_text()).get("dashboard") if path.exists() else None

    return "http://" + str(wait_for(written, 60, "the dashboard's address"))


def edit_kv_store(controller: ControllerProcess, *, auto_promote: bool = True) -> None:
    """kv-store's example spec with another log level: a new instance, so a swap (that
    waits for bhctl swap promote unless ``auto_promote``)."""
    text = (EXAMPLES / "kv-store.yaml").read_text()
    text = text.replace("LOG_LEVEL: info", "LOG_LEVEL: debug")
    if not auto_promote:
        text = text.replace("autoPromote: true", "autoPromote: false")
    staged = controller.specs / "kv-store.tmp"
    staged.write_text(text)
    staged.rename(controller.specs / "kv-store.yaml")


def shot(page: Any, name: str) -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ASSETS / f"dashboard-{name}.png"), full_page=True)


def post(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_list_shows_the_example_plugins_and_filters_them(dashboard, page):
    dashboard.start()
    wait_for(lambda: dashboard.ready("kv-store", "analytics", "echo"), 120, "the examples Ready")
    page.goto(address(dashboard) + "/")
    rows = page.locator("#plugins tbody tr")
    assert sorted(rows.locator("td:first-child").all_inner_texts()) == [
        "analytics",
        "echo",
        "kv-store",
    ]
    assert page.locator("#plugins thead th").all_inner_texts() == [
        "NAME", "VERSION", "PHASE", "READY", "RESTARTS", "ACTIVE", "AGE",
    ]  # fmt: skip
    kv = page.locator("#plugins tbody tr", has_text="kv-store")
    assert kv.locator("td").all_inner_texts()[1:6] == ["1.2.0", "Running", "True", "0", "blue"]
    shot(page, "plugins")
    page.get_by_label("Filter plugins").fill("kv")
    assert rows.locator("visible=true").count() == 1
    assert rows.locator("visible=true").inner_text().startswith("kv-store")
    # The same filter without the script: the server filters ?q=.
    page.goto(address(dashboard) + "/?q=analytics")
    assert rows.locator("td:first-child").all_inner_texts() == ["analytics"]
    page.get_by_role("link", name="analytics").click()
    page.wait_for_url("**/plugins/analytics")
    assert page.locator("h1").inner_text().startswith("analytics")


def test_a_swap_from_a_spec_edit_shows_live_and_ends_promoted(dashboard, page):
    dashboard.start()
    wait_for(lambda: dashboard.ready("kv-store"), 120, "kv-store Ready")
    page.goto(address(dashboard) + "/plugins/kv-store")
    page.wait_for_selector("#stream-state:text-is('live')")
    assert page.locator("#swap [data-color='blue'] .mark.active").count() == 1
    assert page.locator("[data-result]").count() == 0
    page.evaluate("window.loadedOnce = true")  # gone if the page were loaded again
    edit_kv_store(dashboard)
    page.wait_for_selector("#event-log td:text-is('SwapStarted')", timeout=WAIT_MS)
    page.wait_for_selector("[data-result='Promoted']", timeout=WAIT_MS)
    assert page.evaluate("window.loadedOnce") is True, "the page was reloaded, not updated"
    assert page.locator("#event-log td:text-is('SwapPromoted')").count() >= 1
    green = page.locator("#swap [data-color='green']")
    assert "revision 2" in green.inner_text()
    assert green.locator(".mark.active").count() == 1
    assert page.locator("#summary").inner_text().startswith("Running")
    assert dashboard.status("kv-store")["lastSwap"]["result"] == "Promoted"
    # The pause of that swap is charted, beside the bound of maxPauseMilliseconds.
    page.wait_for_selector("#charts circle.pause.promoted", timeout=WAIT_MS)
    page.wait_for_selector("#charts polyline.series.green", timeout=WAIT_MS)
    shot(page, "plugin")


def test_promote_of_a_paused_swap_needs_an_admin_token(dashboard, page):
    dashboard.start()
    wait_for(lambda: dashboard.ready("kv-store"), 120, "kv-store Ready")
    url = address(dashboard)
    page.goto(url + "/plugins/kv-store")
    page.wait_for_selector("#stream-state:text-is('live')")
    edit_kv_store(dashboard, auto_promote=False)
    page.wait_for_selector("[data-step='AwaitingPromotion']", timeout=WAIT_MS)
    assert page.locator("#swap [data-color='green'] .mark.preview").count() == 1
    promote = page.get_by_role("button", name="Promote")
    page.wait_for_function("!document.querySelector('[data-action=promote]').disabled")
    shot(page, "swap")
    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    # Without a token: read-only.
    promote.click()
    page.wait_for_selector("#outcome.refused")
    assert "Refused (401)" in page.locator("#outcome").inner_text()
    assert dialogs == ["Promote the swap of kv-store?"]
    # A token that the gateway knows, but with no dashboard: admin.
    page.get_by_label("Token").fill(CALLER_TOKEN)
    page.get_by_role("button", name="Use").click()
    promote.click()
    page.wait_for_selector("#outcome.refused:has-text('Refused (403)')")
    assert dashboard.status("kv-store")["swap"]["step"] == "AwaitingPromotion"
    # No GET acts, and no other origin may POST, whatever its token.
    status, _ = post(
        f"{url}/api/plugins/kv-store/swap/promote",
        {"Authorization": f"Bearer {ADMIN_TOKEN}", "Origin": "http://elsewhere.example"},
    )
    assert status == 403
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{url}/api/plugins/kv-store/swap/promote", timeout=30)
    assert caught.value.code == 405
    assert dashboard.status("kv-store")["swap"]["step"] == "AwaitingPromotion"
    # With the admin's token: the controller's pass answers, and the swap ends Promoted.
    page.get_by_label("Token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Use").click()
    promote.click()
    page.wait_for_selector("#outcome.done", timeout=WAIT_MS)
    assert page.locator("#outcome").inner_text().startswith("promote: Done")
    page.wait_for_selector("[data-result='Promoted']", timeout=WAIT_MS)
    assert dashboard.status("kv-store")["lastSwap"]["result"] == "Promoted"
    assert "operator asked promote of kv-store" in dashboard.log_text()


def test_the_catalog_lists_and_searches_the_installed_bundles(dashboard, page, tmp_path):
    keys = bundles.Keys(tmp_path / "keys", trust=dashboard.data / "registry" / "trusted")
    installed = tmp_path / "bundles"
    installed.mkdir()
    offered: list[tuple[str, str, dict[str, Any]]] = [
        ("kv-store", "1.2.0", {"provides": ["storage.kv"], "author": "Storage Team",
                               "category": "storage", "description": "A key-value store"}),
        ("analytics", "1.0.0", {"provides": ["analytics.events"], "author": "Data Team",
                                "category": "analytics", "description": "Counts events"}),
    ]  # fmt: skip
    for name, version, fields in offered:
        made = bundles.make_bundle(
            tmp_path / "work",
            name,
            version,
            key=keys.private,
            image=f"{REPOSITORY}-{name}:{version}",
            **fields,
        )
        shutil.move(made, installed / made.name)
    dashboard.extra_args += ["--plugins-dir", str(installed)]
    dashboard.start()
    page.goto(address(dashboard) + "/catalog")
    names = page.locator("#catalog tbody td:first-child")
    assert sorted(names.all_inner_texts()) == ["analytics", "kv-store"]
    assert (
        page.locator("#catalog tbody tr", has_text="kv-store").locator("td").all_inner_texts()[-1]
        == keys.key_id
    )
    shot(page, "catalog")
    page.get_by_label("Search the catalog").fill("storage.kv")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**/catalog?q=storage.kv")
    assert names.all_inner_texts() == ["kv-store"]
