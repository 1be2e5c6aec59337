"""What the controller writes is its own from the first moment: 0600 files, 0700 directories.

And a directory it is pointed at that is not its own (``/tmp``, a home
directory) is refused, never made private under its users' feet.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller import database
from controller.cli import control, main, run


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_and_its_journal_files_are_private_from_the_start(tmp_path: Path):
    path = tmp_path / "data" / "state.db"
    db = database.connect(path, "CREATE TABLE IF NOT EXISTS t (x INTEGER);")
    try:
        db.execute("INSERT INTO t VALUES (1)")
        journal = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
        assert all(p.exists() for p in journal), "WAL mode keeps both while the file is open"
        assert {p.name: mode(p) for p in [path, *journal]} == {
            "state.db": 0o600,
            "state.db-wal": 0o600,
            "state.db-shm": 0o600,
        }
    finally:
        db.close()


def test_an_old_database_left_readable_is_made_private(tmp_path: Path):
    path = tmp_path / "state.db"
    database.connect(path, "CREATE TABLE IF NOT EXISTS t (x INTEGER);").close()
    path.chmod(0o644)
    database.connect(path, "").close()
    assert mode(path) == 0o600


class ExportingAdmin:
    def state_export(self, name: str, snapshot: int | None) -> dict[str, Any]:
        meta = {"size": 6, "stateVersion": 1, "sha256": "ab" * 32, "id": 7, "plugin": "kv"}
        return {"data": base64.b64encode(b"secret").decode(), "snapshot": meta}


@pytest.mark.parametrize("existing", [False, True])
def test_state_export_writes_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
):
    monkeypatch.setattr(control, "client", lambda data_dir: ExportingAdmin())
    output = tmp_path / "state.bin"
    if existing:
        output.write_bytes(b"older and longer")
        output.chmod(0o644)
    result = CliRunner().invoke(
        main.app, ["state", "export", "kv", "--raw", "--output-file", str(output)]
    )
    assert result.exit_code == 0, result.output
    assert output.read_bytes() == b"secret"
    assert mode(output) == 0o600


def test_a_new_data_dir_is_created_private(tmp_path: Path):
    data = tmp_path / "new" / "data"
    with run._lock(data):
        assert mode(data) == 0o700
        assert mode(data / "controller.lock") == 0o600


def test_the_controllers_own_data_dir_is_made_private_again(tmp_path: Path):
    data = tmp_path / "data"
    with run._lock(data):
        pass
    data.chmod(0o755)
    with run._lock(data):
        assert mode(data) == 0o700


def test_an_empty_directory_of_its_own_is_taken(tmp_path: Path):
    data = tmp_path / "empty"
    data.mkdir(mode=0o755)
    with run._lock(data):
        assert mode(data) == 0o700


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        (lambda d: d.chmod(0o1777), "writable by others"),
        (lambda d: (d / "notes.txt").write_text("mine"), "not a controller's data directory"),
    ],
    ids=["shared like /tmp", "someone's files"],
)
def test_a_directory_that_is_not_the_controllers_is_refused_and_left_alone(
    tmp_path: Path, setup: Any, why: str
):
    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(0o755)
    setup(data)
    before = mode(data)
    with pytest.raises(run.DataDirError, match=why), run._lock(data):
        pass
    assert mode(data) == before
    assert not (data / "controller.lock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path):
    data = tmp_path / "theirs"
    data.mkdir(mode=0o755)
    os.chown(data, 4242, 4242)
    with pytest.raises(run.DataDirError, match="uid 4242"), run._lock(data):
        pass
    assert mode(data) == 0o755


def test_a_relative_data_dir_stops_bhctl_run_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main.app, ["run", "--data-dir", "data", "--runtime", "process"])
    assert result.exit_code != 0
    assert "is a relative path" in result.output
    assert str(tmp_path / "data") in result.output  # the absolute path it would take
    assert not (tmp_path / "data").exists(), "nothing is made under a relative path"
