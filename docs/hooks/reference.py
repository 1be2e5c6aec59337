"""The generated pages of the docs site: the spec reference and the CLI reference.

Both are written at build time from the code itself (an mkdocs hook), so they
can never fall behind it: the spec reference from the pydantic models in
``controller/spec/models.py`` (every field, its type, limits, default and
docstring), the CLI reference from the typer app of ``bhctl``. The functions
``spec_reference()`` (from :mod:`controller.spec.reference`, which ``bhctl
explain`` reads too) and ``cli_reference()`` return the pages' Markdown; the
tests call them directly.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from controller.spec.reference import spec_reference

__all__ = ["cli_reference", "on_files", "spec_reference"]

SPEC_PAGE = "reference/spec.md"
CLI_PAGE = "reference/cli.md"


# --- the CLI reference --------------------------------------------------------------------


# Typer may bring its own copy of click: the commands are read through click's
# methods (help records, usage pieces), never by their classes.


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().replace("|", "\\|")


def _command_section(name: str, command: Any, out: list[str]) -> None:
    context = command.context_class(command, info_name=name)
    out += [f"## `{name}`", ""]
    help_text = inspect.cleandoc(command.help or "")
    if help_text:
        out += [help_text.replace("\b\n", "").replace("\b", ""), ""]
    pieces = " ".join(command.collect_usage_pieces(context))
    out += ["```text", f"{name} {pieces}".rstrip(), "```", ""]
    rows = []
    for param in command.params:
        record = param.get_help_record(context)
        if record is None or getattr(param, "hidden", False):
            continue
        flags, text = record
        rows.append(f"| `{_cell(flags)}` | {_cell(text)} |")
    if rows:
        out += ["| argument or option | meaning |", "| --- | --- |"]
        out += [*rows, ""]
    if hasattr(command, "list_commands"):
        for sub_name in command.list_commands(context):
            sub = command.get_command(context, sub_name)
            if sub is not None and not sub.hidden:
                _command_section(f"{name} {sub_name}", sub, out)


def cli_reference() -> str:
    """The CLI reference page: every ``bhctl`` command, argument and option."""
    import typer

    from controller.cli import main

    root = typer.main.get_command(main.app)
    out = [
        "# CLI reference",
        "",
        "<!-- Generated at build time from the bhctl commands; edit their help, not this page. -->",
        "",
        "Every `bhctl` command with its arguments and options, generated from the commands "
        "themselves; `bhctl COMMAND --help` prints the same.",
        "",
    ]
    _command_section("bhctl", root, out)
    return "\n".join(out).rstrip() + "\n"


# --- the mkdocs hook ----------------------------------------------------------------------


def on_files(files: Any, config: Any) -> Any:
    """Add the generated pages to the site, replacing any file of the same name."""
    from mkdocs.structure.files import File

    for page, render in ((SPEC_PAGE, spec_reference), (CLI_PAGE, cli_reference)):
        existing = files.get_file_from_path(page)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, page, content=render()))
    return files
