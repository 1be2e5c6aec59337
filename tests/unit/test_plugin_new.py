"""bhctl plugin new: a scaffold whose own tests pass as generated, a valid spec and manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from controller.cli import main
from controller.registry import manifest
from controller.spec import loader


def test_a_new_plugin_passes_its_own_tests_as_generated(tmp_path: Path) -> None:
    target = tmp_path / "greeter"
    result = CliRunner().invoke(main.app, ["plugin", "new", "greeter", "--dir", str(target)])
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["Dockerfile", "plugin.py", "plugin.yaml", "spec.yaml", "tests/test_plugin.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
    [loaded] = loader.load_file(target / "spec.yaml")
    assert loaded.plugin.name == "greeter"
    assert loaded.plugin.spec.state is not None
    assert loaded.plugin.spec.state.version == 2
    assert manifest.parse((target / "plugin.yaml").read_bytes()).name == "greeter"
    assert "compileall" in (target / "Dockerfile").read_text()


def test_a_bad_name_or_a_used_directory_is_refused(tmp_path: Path) -> None:
    bad = CliRunner().invoke(main.app, ["plugin", "new", "Bad_Name", "--dir", str(tmp_path / "x")])
    assert bad.exit_code != 0
    assert "lower-case letters" in bad.output
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    taken = CliRunner().invoke(main.app, ["plugin", "new", "greeter", "--dir", str(used)])
    assert taken.exit_code == 1
    assert (used / "keep.txt").read_text() == "mine"
    assert not (used / "plugin.py").exists()
