"""What ``bhctl`` prints, in one style: tables without box characters (so that they read
the same on a terminal, piped or in a log), colour only on a terminal and never with
``NO_COLOR`` set, errors on stderr as ``error: ...``, documents as JSON or YAML.

Every command prints through here; nothing else in the CLI makes a console.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr) as it is now, ``NO_COLOR`` as it is now."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(
        file=stream,
        highlight=False,
        soft_wrap=True,
        # Piped output keeps whole lines (scripts, CI logs) and carries no escape codes.
        width=None if terminal else 250,
        no_color=bool(os.environ.get("NO_COLOR")) or None,
        force_terminal=None if terminal else False,
    )


class _Lazy:
    """A console made on first use, on the streams as they are then (tests swap them)."""

    def __init__(self, stderr: bool) -> None:
        self.stderr = stderr

    def __getattr__(self, name: str) -> Any:
        return getattr(console(self.stderr), name)


out: Console = _Lazy(stderr=False)  # type: ignore[assignment]
err: Console = _Lazy(stderr=True)  # type: ignore[assignment]


def table(*columns: str, title: str | None = None, headers: bool = True) -> Table:
    """A table in the one style: no box, no padding on the left, bold-free headers."""
    return Table(
        *columns,
        box=None,
        title=title,
        title_justify="left",
        show_header=headers,
        pad_edge=False,
        header_style="",
        title_style="",
    )


def rows(columns: Sequence[str], values: Iterable[Sequence[str]], headers: bool = True) -> None:
    """Print a table of plain text cells (escaped here)."""
    grid = table(*columns, headers=headers)
    for row in values:
        grid.add_row(*(escape(str(c)) for c in row))
    out.print(grid)


def document(value: Any, fmt: str) -> None:
    """Print ``value`` as JSON (indented) or YAML."""
    if fmt == "json":
        sys.stdout.write(json.dumps(value, indent=2) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(value, sort_keys=False))
    sys.stdout.flush()


def error(message: str) -> None:
    err.print(f"[red]error[/]: {escape(message)}")


def fail(message: str, code: int = 1) -> NoReturn:
    error(message)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"[yellow]warning[/]: {escape(message)}")
