"""Metrics scraped by a real Prometheus (Debian's), and resource violations, on Docker and Podman.

Prometheus runs on loopback with a 1 s scrape interval and the alert rules
of ``deploy/prometheus``; the test queries it as an operator's dashboard
would.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ControllerProcess, bhctl, wait_for

TOP = Path(__file__).resolve().parents[2]
RULES = TOP / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = TOP / "deploy" / "grafana" / "blackhole-dashboard.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(controller: ControllerProcess) -> str:
    with urllib.request.urlopen(f"http://{controller.gateway('metrics')}/metrics") as answer:
        return str(answer.read().decode())


class Prometheus:
    def __init__(self, root: Path, target: str, address: str | None = None) -> None:
        if shutil.which("prometheus") is None:
            pytest.fail("prometheus is missing: run scripts/engines.sh prometheus")
        self.address = address or f"127.0.0.1:{_free_port()}"
        config = root / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            f"  - {{job_name: blackhole, static_configs: [{{targets: [{json.dumps(target)}]}}]}}\n"
        )
        self.log = root / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                 f"--web.listen-address={self.address}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(self._ready, what=f"Prometheus to be ready (log: {self.log})")
        wait_for(
            lambda: self.get("/api/v1/query", query='up{job="blackhole"} == 1')["result"],
            what="Prometheus' first scrape of the controller",
        )

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def get(self, path: str, **query: str) -> Any:
        url = f"http://{self.address}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            document = json.loads(answer.read())
        assert document["status"] == "success", document
        return document["data"]

    def value(self, expr: str) -> dict[str, float]:
        """An instant query; each series' value by its plugin label."""
        return {
            r["metric"].get("plugin", ""): float(r["value"][1])
            for r in self.get("/api/v1/query", query=expr)["result"]
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@contextlib.contextmanager
def scraping(controller: ControllerProcess, root: Path) -> Iterator[Prometheus]:
    server = Prometheus(root, controller.gateway("metrics"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prometheus(controller: ControllerProcess, tmp_path: Path) -> Iterator[Prometheus]:
    controller.write("busy")
    controller.write("idle")
    controller.start()
    wait_for(lambda: controller.ready("busy", "idle"), what="busy and idle Ready")
    with scraping(controller, tmp_path) as server:
        yield server


def test_prometheus_sees_cpu_memory_and_calls_and_loads_the_rules(controller, prometheus):
    exposition = scrape(controller)
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    spun: list[int] = []
    spinning = threading.Thread(
        target=lambda: spun.append(controller.call("busy", "spin", {"seconds": 6})[0])
    )
    spinning.start()
    calls = 60
    for i in range(calls):
        assert controller.call("idle", "echo", {"i": i})[0] == 200
        time.sleep(0.05)
    spinning.join()
    assert spun == [200]

    def seen() -> dict[str, float]:
        cpu = prometheus.value("increase(blackhole_container_cpu_usage_seconds_total[20s])")
        return cpu if {"busy", "idle"} <= set(cpu) and cpu["busy"] > 1.0 else {}

    # 6 s of spinning under a 500m CPU limit is up to 3 CPU seconds.
    cpu = wait_for(seen, what="the busy plugin's CPU seconds in Prometheus")
    assert cpu["busy"] > 5 * cpu["idle"], cpu
    memory = prometheus.value("blackhole_container_memory_working_set_bytes")
    limit = prometheus.value("blackhole_container_spec_memory_limit_bytes")
    for plugin in ("busy", "idle"):
        assert 0 < memory[plugin] < limit[plugin], (plugin, memory, limit)

    def counted() -> float:
        found = prometheus.value(
            'sum by (plugin) (blackhole_gateway_requests_total{plugin="idle"})'
        )
        return float(found.get("idle", 0.0))

    wait_for(lambda: counted() >= calls * 0.9, what="the gateway's count of the calls")
    assert abs(counted() - calls) <= calls * 0.1

    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {
        "PluginDown", "PluginCrashLooping", "PluginMemoryNearLimit", "PluginCPUThrottled",
        "PluginOOMKilled", "PluginSwapFailed", "PluginSwapAnalysisFailing",
        "PluginSwapWebhookFailing", "PluginCanaryStalled", "PluginStateRestored",
        "PluginCheckpointsFailing", "ControllerReconcileErrors", "ControllerStoreErrors",
        "GatewayErrorRate",
    }  # fmt: skip
    wait_for(
        lambda: all(
            r["health"] == "ok"
            for g in prometheus.get("/api/v1/rules")["groups"]
            for r in g["rules"]
        ),
        what="every rule evaluated without error",
    )


def test_the_dashboard_queries_only_metrics_the_controller_exports(controller, prometheus):
    exported = set(re.findall(r"^# TYPE (\w+) (\w+)", scrape(controller), re.MULTILINE))
    names = set()
    for name, kind in exported:
        names |= {name, f"{name}_total"} if kind == "counter" else {name}
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "plugin" in variables
    used = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\b(blackhole_\w+)", target["expr"]))
    assert used, "the dashboard queries something"
    assert used <= names, sorted(used - names)
    rule_names = set(re.findall(r"\b(blackhole_\w+)", RULES.read_text()))
    assert rule_names <= names, sorted(rule_names - names)


def dashboard_queries(plugins: str, rate_interval: str = "15s") -> list[str]:
    """Every query of the dashboard, its variables set as Grafana would (``plugins``: a regex)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"].replace("$plugin", plugins).replace("$__rate_interval", rate_interval)
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


UNDEFINED_UNTIL_OBSERVED = (
    "histogram_quantile(",
    "blackhole_state_restored_checkpoint_age_seconds",
)
"""Queries whose answer is NaN until there is something to measure: quantiles of a histogram
that observed nothing in the window, the age of a restore that never happened."""


def test_every_dashboard_query_returns_a_value_on_a_fresh_controller(controller, prometheus):
    queries = dashboard_queries("busy|idle")
    assert len(queries) >= 28

    def results() -> dict[str, list[dict[str, Any]]]:
        return {q: prometheus.get("/api/v1/query", query=q)["result"] for q in queries}

    def all_answered() -> dict[str, list[dict[str, Any]]]:
        answered = results()
        return answered if all(answered.values()) else {}

    try:
        answered = wait_for(all_answered, timeout=60, what="every dashboard query to answer")
    except pytest.fail.Exception:
        empty = [q for q, found in results().items() if not found]
        pytest.fail(f"{len(empty)} of {len(queries)} dashboard queries return nothing: {empty}")
    for query, found in answered.items():
        per_plugin = '{plugin=~"busy|idle"' in query or "by (plugin" in query
        if per_plugin:
            plugins = {r["metric"].get("plugin") for r in found}
            assert plugins == {"busy", "idle"}, (query, plugins)
        values = [float(r["value"][1]) for r in found]
        if not any(marker in query for marker in UNDEFINED_UNTIL_OBSERVED):
            assert all(math.isfinite(v) for v in values), (query, values)


STATEFUL = "  state: {{version: 1}}\n  env: {{STATE_VERSION: '1', BUILD: '{build}'}}\n"
STATEFUL += "  hotSwap: {{scaleDownDelaySeconds: 1}}\n"
MUTE = "  state: {version: 1}\n  env: {STATE_VERSION: '1', MODE: mute}\n"
MUTE += "  health: {startupDeadlineSeconds: 3}\n"


def last_swap(controller: ControllerProcess, result: str, version: str) -> bool:
    status = controller.status("kv")
    last = status.get("lastSwap") or {}
    return status.get("swap") is None and (last.get("result"), last.get("to")) == (
        result,
        version,
    )


def scraped(prometheus: Prometheus, expr: str) -> dict[str, float]:
    return wait_for(lambda: prometheus.value(expr), what=f"Prometheus to have {expr}")


def test_the_swap_pause_quantiles_are_numbers_after_swaps(controller, tmp_path):
    controller.write("kv", STATEFUL.format(build=1))
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    with scraping(controller, tmp_path) as prometheus:
        # The histogram is there, empty, before the first swap: its first one counts.
        scraped(prometheus, 'blackhole_swap_pause_seconds_count{plugin="kv"} == 0')
        for n, version in enumerate(("1.1.0", "1.2.0"), start=2):
            controller.write("kv", STATEFUL.format(build=n), version=version)
            wait_for(
                lambda v=version: last_swap(controller, "Promoted", v),  # type: ignore[misc]
                timeout=90,
                what=f"the swap to {version}",
            )
        scraped(prometheus, 'blackhole_swap_pause_seconds_count{plugin="kv"} == 2')
        pauses = [q for q in dashboard_queries("kv") if "blackhole_swap_pause_seconds" in q]
        assert len(pauses) == 2
        for query in pauses:
            [pause] = prometheus.value(query).values()
            assert math.isfinite(pause), (query, pause)
            assert 0 < pause <= 5, (query, pause)


def test_a_real_rollback_fires_plugin_swap_failed(controller, tmp_path):
    controller.write("kv", STATEFUL.format(build=1))
    controller.start()
    wait_for(lambda: controller.ready("kv"), what="kv Ready")
    with scraping(controller, tmp_path) as prometheus:
        controller.write("kv", MUTE, version="1.1.0")
        wait_for(
            lambda: last_swap(controller, "RolledBack", "1.1.0"),
            timeout=90,
            what="the swap to 1.1.0 rolled back",
        )

        def firing() -> list[dict[str, Any]]:
            return [
                a
                for a in prometheus.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "PluginSwapFailed" and a["state"] == "firing"
            ]

        [alert] = wait_for(firing, timeout=60, what="PluginSwapFailed to fire")
        assert alert["labels"]["plugin"] == "kv"
        assert alert["labels"]["reason"] == "SwapFailedNotReady"
        rollbacks = 'blackhole_swap_rollbacks_total{plugin="kv",reason="SwapFailedNotReady"}'
        assert prometheus.value(rollbacks) == {"kv": 1.0}


def test_a_plugin_past_its_memory_limit_is_oom_killed_and_reported(controller):
    controller.write("hungry", "  resources: {memory: 64Mi}\n  restart: {backoffSeconds: 30}\n")
    controller.start()
    wait_for(lambda: controller.ready("hungry"), what="hungry Ready")
    status, _, _ = controller.call("hungry", "allocate", {"mib": 200})
    assert status == 502, "the call dies with the instance"

    def reported() -> dict[str, Any]:
        condition = controller.condition("hungry", "OOMKilled")
        return condition if condition.get("status") == "True" else {}

    condition = wait_for(reported, what="the OOMKilled condition")
    assert "killed for memory" in condition["message"]

    def crashed() -> dict[str, Any]:
        records = controller.status("hungry").get("instances") or [{}]
        return dict(records[0]) if records[0].get("lastExitCode") == 137 else {}

    record = wait_for(crashed, what="the instance's crash in its status")
    assert record["oomKilled"] is True
    events = [e["reason"] for e in controller.admin.get("hungry")["events"]]
    assert "OOMKilled" in events
    assert re.search(
        r'^blackhole_resource_violations_total\{kind="OOMKilled",plugin="hungry"\} 1\.0$',
        scrape(controller),
        re.MULTILINE,
    )
    # Counted by the controller, once, though the kernel and the engine both tell of it.
    assert re.search(
        r'^blackhole_instance_oom_kills_total\{plugin="hungry"\} 1\.0$',
        scrape(controller),
        re.MULTILINE,
    )


def test_the_shipped_prometheus_config_and_alert_rules_pass_promtool():
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: run scripts/engines.sh prometheus")
    folder = TOP / "deploy" / "prometheus"
    for command in (["check", "config", "prometheus.yml"], ["test", "rules", "rules.test.yml"]):
        done = subprocess.run(["promtool", *command], cwd=folder, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_bhctl_top_shows_each_instance(controller):
    controller.write("alpha", "  resources: {memory: 96Mi}\n")
    controller.start()
    wait_for(lambda: controller.ready("alpha"), what="alpha Ready")
    shown = bhctl(controller, "top")
    assert shown.returncode == 0, shown.stderr
    [row] = [line for line in shown.stdout.splitlines() if "alpha" in line]
    assert "blue" in row
    assert "96.0Mi" in row
