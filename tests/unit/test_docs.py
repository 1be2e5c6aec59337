"""The docs site's generated pages and runbooks keep up with the code they describe."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType

import typer
import yaml
from pydantic import BaseModel

from controller.cli import main
from controller.spec import models

TOP = Path(__file__).resolve().parents[2]
DOCS = TOP / "docs"


def _reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "hooks" / "reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fields(path: str, model: type[BaseModel]) -> typing.Iterator[tuple[str, str, str]]:
    """(section path, field name as written, docstring) of every field, depth first."""
    for name, field in model.model_fields.items():
        key = field.alias or name
        yield path, key, field.description or ""
        for arg in [field.annotation, *typing.get_args(field.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from _fields(f"{path}.{key}", inner)


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r"^## `([^`]+)`$", page, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_the_spec_reference_has_every_field_with_its_text_and_default() -> None:
    sections = _sections(_reference().spec_reference())
    fields = list(_fields("plugin", models.Plugin))
    assert len(fields) > 80
    for path, key, doc in fields:
        assert path in sections, f"no section for {path}"
        rows = [r for r in sections[path].splitlines() if r.startswith(f"| `{key}` |")]
        assert len(rows) == 1, f"{path}.{key}: {rows}"
        first_words = " ".join(doc.split()[:6]).replace("|", "\\|")
        assert first_words in rows[0], f"{path}.{key}: its docstring is missing"
    hot_swap = _sections(_reference().spec_reference())["plugin.spec.hotSwap"]
    assert "| `maxPauseMilliseconds` | integer (>= 1, <= 60000) | `200` |" in hot_swap
    assert '| `strategy` | "BlueGreen" \\| "Recreate" \\| "Canary" | `BlueGreen` |' in hot_swap
    resources = _sections(_reference().spec_reference())["plugin.spec.resources"]
    assert "| `memory` | quantity | `128Mi` |" in resources


def test_the_cli_reference_has_every_command_and_option() -> None:
    page = _reference().cli_reference()
    root = typer.main.get_command(main.app)
    seen = 0

    def walk(name: str, command: typing.Any) -> None:
        nonlocal seen
        assert f"## `{name}`" in page, name
        seen += 1
        body = page.split(f"## `{name}`\n", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("-"):
                    assert flag in body, f"{name}: {flag}"
        if hasattr(command, "list_commands"):
            context = command.context_class(command, info_name=name)
            for sub in command.list_commands(context):
                walk(f"{name} {sub}", command.get_command(context, sub))

    walk("bhctl", root)
    assert seen > 20


def test_every_alert_has_a_runbook() -> None:
    rules = yaml.safe_load((TOP / "deploy" / "prometheus" / "rules.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    page = (DOCS / "operate" / "metrics.md").read_text()
    runbooks = re.findall(r"^### (\w+)$", page, flags=re.M)
    assert sorted(runbooks) == sorted(alerts)


def test_every_page_is_in_the_navigation() -> None:
    config = yaml.safe_load((TOP / "mkdocs.yml").read_text())

    def pages(items: typing.Any) -> typing.Iterator[str]:
        for item in items:
            for value in item.values():
                yield from ([value] if isinstance(value, str) else pages(value))

    listed = set(pages(config["nav"]))
    written = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    generated = {"reference/spec.md", "reference/cli.md"}
    assert listed == written | generated


def test_the_sdk_readme_example_passes_its_own_tests(tmp_path: Path) -> None:
    """The README's worked example, as written: plugin.py and test_plugin.py, under pytest."""
    text = (TOP / "sdk" / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, flags=re.S))
    assert sorted(blocks) == ["plugin.py", "test_plugin.py"]
    for name, body in blocks.items():
        (tmp_path / name).write_text(body)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_plugin.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
