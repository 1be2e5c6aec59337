"""The generated pages of the docs site: the spec reference and the CLI reference.

Both are written at build time from the code itself (an mkdocs hook), so they
can never fall behind it: the spec reference from the pydantic models in
``controller/spec/models.py`` (every field, its type, limits, default and
docstring), the CLI reference from the typer app of ``bhctl``. The functions
``spec_reference()`` and ``cli_reference()`` return the pages' Markdown; the
tests call them directly.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

SPEC_PAGE = "reference/spec.md"
CLI_PAGE = "reference/cli.md"


# --- the spec reference -------------------------------------------------------------------


def _models() -> Any:
    from controller.spec import models

    return models


_NAMED = {
    "Quantity": "quantity",
    "Version": "semantic version",
    "VersionRange": "version range",
    "datetime": "time (RFC 3339)",
}


def _type_name(annotation: Any) -> str:
    """A reader's name for a field's type: ``list[string]``, ``"none" | "egress"``, ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " | ".join(_type_name(a) for a in kept)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    if annotation is typing.Any:
        return "any JSON value"
    if isinstance(annotation, type):
        if annotation.__name__ in _NAMED:
            return _NAMED[annotation.__name__]
        if issubclass(annotation, enum.Enum):
            return " | ".join(f'"{m.value}"' for m in annotation)
        if issubclass(annotation, BaseModel):
            return f"object ({annotation.__name__})"
        return {
            str: "string",
            int: "integer",
            float: "number",
            bool: "boolean",
        }.get(annotation, annotation.__name__)
    return str(annotation)


def _limits(field: FieldInfo) -> str:
    """The bounds pydantic checks on a field, from its metadata."""
    marks = (
        (annotated_types.Ge, "ge", ">= {}"),
        (annotated_types.Gt, "gt", "> {}"),
        (annotated_types.Le, "le", "<= {}"),
        (annotated_types.Lt, "lt", "< {}"),
        (annotated_types.MinLen, "min_length", "at least {} long"),
        (annotated_types.MaxLen, "max_length", "at most {} long"),
    )
    words = []
    for item in field.metadata:
        for kind, attribute, text in marks:
            if isinstance(item, kind):
                words.append(text.format(getattr(item, attribute)))
    return ", ".join(words)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined or value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "the defaults below"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value in ([], {}):
        return "empty"
    return f"`{value}`"


def _text(doc: str | None) -> str:
    """A docstring as one Markdown paragraph that fits in a table cell."""
    return re.sub(r"\s+", " ", inspect.cleandoc(doc or "")).strip().replace("|", "\\|")


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (directly, in a list or as an optional value), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def _section(path: str, model: type[BaseModel], out: list[str]) -> None:
    out += [f"## `{path}`", "", _text(model.__doc__), ""]
    out += ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    children = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        kind = _type_name(field.annotation)
        limits = _limits(field)
        if limits:
            kind += f" ({limits})"
        kind = kind.replace("|", "\\|")
        out.append(f"| `{key}` | {kind} | {_default(field)} | {_text(field.description)} |")
        child = _nested(field.annotation)
        if child is not None:
            children.append((f"{path}.{key}", child))
    out.append("")
    for child_path, child in children:
        _section(child_path, child, out)


def spec_reference() -> str:
    """The spec reference page: every field of ``kind: Plugin``, from the models."""
    models = _models()
    out = [
        "# Spec reference",
        "",
        "<!-- Generated at build time from controller/spec/models.py; edit the models' "
        "docstrings, not this page. -->",
        "",
        f"Every field of a `{models.KIND}` object (`apiVersion: {models.API_VERSION}`), "
        "generated from the models that validate it; `kubectl explain plugin.spec` shows "
        "the same text once the CRD is installed. Names are camelCase as written in YAML. "
        "Unknown fields are errors. Quantities are Kubernetes quantities (`500m`, `0.5`, "
        "`256Mi`, `1Gi`); names are DNS-1123 labels (lower-case letters, digits and `-`, "
        "at most 63 characters); versions are semantic versions; version ranges look like "
        "`>=1.0,<2`, `^1.2`, `~1.2.3`, `1.x` or `a || b`. Labels under `blackhole.dev/` are "
        "the controller's and are refused in specs.",
        "",
    ]
    _section("plugin", models.Plugin, out)
    return "\n".join(out).rstrip() + "\n"


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
