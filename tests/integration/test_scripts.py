"""The set-up scripts tell a user who cannot install or start an engine what to do."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can read (pytest's own tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="bh-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_engines_script_says_what_an_unprivileged_user_must_do(shared_dir: Path) -> None:
    scripts = shared_dir / "scripts"
    shutil.copytree(ROOT / "scripts", scripts)
    run_dir = shared_dir / "run"
    run_dir.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(run_dir, nobody.pw_uid, nobody.pw_gid)
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", f"BLACKHOLE_RUN_DIR={run_dir}",
         "DOCKER_HOST=unix:///var/run/docker.sock", "bash", str(scripts / "engines.sh"), "docker"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    # dockerd runs (the engine fixture needs it), but nobody may not use its socket.
    assert "does not answer you (nobody)" in message
    assert "docker' group" in message
