"""``bhctl plugin trust``: a key into the trust directory, which exists by default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from controller.cli import main


def bhctl(*args: str) -> Any:
    return CliRunner().invoke(main.app, list(args), env={"COLUMNS": "200"})


def test_trust_adds_a_key_once_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = bhctl("plugin", "keygen", "author", "--dir", str(tmp_path))
    assert made.exit_code == 0, made.output
    assert f"bhctl plugin trust {tmp_path / 'author.pub'}" in made.stdout
    ident = made.stdout.split("key id ")[1].split(")")[0]

    added = bhctl("plugin", "trust", str(tmp_path / "author.pub"), "--data-dir", str(data))
    assert added.exit_code == 0, added.output
    trusted = data / "registry" / "trusted" / f"{ident}.pub"
    assert added.stdout.strip() == f"key {ident} trusted ({trusted})"
    assert trusted.read_bytes() == (tmp_path / "author.pub").read_bytes()
    assert os.stat(trusted.parent).st_mode & 0o777 == 0o700

    again = bhctl("plugin", "trust", str(tmp_path / "author.pub"), "--data-dir", str(data))
    assert again.stdout.strip() == f"key {ident} trusted already ({trusted})"

    private = bhctl("plugin", "trust", str(tmp_path / "author.key"), "--data-dir", str(data))
    assert private.exit_code == 1
    assert "not a PEM public key" in private.stderr
    assert sorted(p.name for p in trusted.parent.iterdir()) == [f"{ident}.pub"]


def test_the_default_trust_directory_exists_once_the_registry_is_used(tmp_path: Path) -> None:
    data = tmp_path / "data"
    listed = bhctl("plugin", "list", "--data-dir", str(data))
    assert listed.exit_code == 0, listed.output
    assert (data / "registry" / "trusted").is_dir()
