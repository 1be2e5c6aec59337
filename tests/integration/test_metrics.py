"""Metrics scraped by a real Prometheus (Debian's), and resource violations, on Docker and Podman.

Prometheus runs on loopback with a 1 s scrape interval and the alert rules
of ``deploy/prometheus``; the test queries it as an operator's dashboard
would.
"""

from __future__ import annotations

import json
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
    def __init__(self, root: Path, target: str) -> None:
        if shutil.which("prometheus") is None:
            pytest.fail("prometheus is missing: run scripts/engines.sh prometheus")
        self.address = f"127.0.0.1:{_free_port()}"
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


@pytest.fixture
def prometheus(controller: ControllerProcess, tmp_path: Path) -> Iterator[Prometheus]:
    controller.write("busy")
    controller.write("idle")
    controller.start()
    wait_for(lambda: controller.ready("busy", "idle"), what="busy and idle Ready")
    server = Prometheus(tmp_path, controller.gateway("metrics"))
    try:
        yield server
    finally:
        server.stop()


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
        "PluginSwapFailed", "PluginStateRestored", "PluginCheckpointsFailing",
        "ControllerReconcileErrors", "GatewayErrorRate",
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
