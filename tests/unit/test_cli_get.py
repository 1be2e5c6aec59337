"""bhctl get: VERSION is what runs; DECLARED appears when the declared one differs; a swap
waiting for promotion shows in the list."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from controller.cli import control, main


def plugin(
    name: str, declared: str, running: str | None, step: str | None = None
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running", "activeColor": "blue", "conditions": []}
    if running is not None:
        status["activeVersion"] = running
    if step is not None:
        status["phase"] = "Swapping"
        status["swap"] = {"step": step}
    return {
        "metadata": {"name": name},
        "spec": {"version": declared, "image": f"blackhole/{name}:1"},
        "status": status,
    }


class Admin:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def list(self) -> dict[str, Any]:
        return {"items": self.items, "errors": []}


def table(monkeypatch: pytest.MonkeyPatch, items: list[dict[str, Any]]) -> list[list[str]]:
    monkeypatch.setattr(control, "client", lambda data_dir: Admin(items))
    result = CliRunner().invoke(main.app, ["get"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return [line.split() for line in result.output.splitlines() if line.strip()]


def test_version_is_what_runs_and_declared_shows_when_it_differs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = table(monkeypatch, [plugin("kv", "1.1.0", "1.0.0"), plugin("echo", "0.1.0", "0.1.0")])
    header, kv, echo = rows
    assert header[:3] == ["NAME", "VERSION", "DECLARED"]
    assert kv[:3] == ["kv", "1.0.0", "1.1.0"]
    assert echo[:3] == ["echo", "0.1.0", "Running"]  # no declared version: the same one runs


def test_no_declared_column_when_every_plugin_runs_its_declared_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    header, echo = table(monkeypatch, [plugin("echo", "0.1.0", "0.1.0")])
    assert "DECLARED" not in header
    assert echo[:2] == ["echo", "0.1.0"]


def test_a_plugin_that_never_ran_shows_no_version(monkeypatch: pytest.MonkeyPatch) -> None:
    _, echo = table(monkeypatch, [plugin("echo", "0.1.0", None)])
    assert echo[:2] == ["echo", "-"]


def test_a_swap_waiting_for_promotion_shows_in_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, kv = table(
        monkeypatch,
        [plugin("echo", "0.1.0", "0.1.0"), plugin("kv", "1.1.0", "1.0.0", "AwaitingPromotion")],
    )
    assert " ".join(kv).startswith("kv 1.0.0 1.1.0 Swapping (awaiting promotion)")
