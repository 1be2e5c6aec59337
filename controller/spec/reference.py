"""The spec reference, generated from the models: the docs site's page and ``bhctl explain``.

Every field of ``kind: Plugin`` with its type, limits, default and docstring,
read from the pydantic models in :mod:`controller.spec.models`, so the text
can never fall behind them. :func:`spec_reference` gives the docs page's
Markdown (an mkdocs hook writes it at build time); :func:`explain` gives
one object's fields, by path (``plugin.spec.hotSwap``), for a terminal.
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

from controller.errors import ControllerError


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


def explain(path: str) -> str:
    """The fields of the object at ``path`` (``plugin``, ``plugin.spec.hotSwap``, ...), as
    plain text: what ``bhctl explain`` prints. Raises ControllerError for an unknown path."""
    parts = path.split(".")
    if not parts or parts[0].lower() != "plugin":
        raise ControllerError(f"{path!r}: paths start at plugin, e.g. plugin.spec.hotSwap")
    model: type[BaseModel] = _models().Plugin
    walked = ["plugin"]
    for part in parts[1:]:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part)
        child = _nested(field.annotation) if field is not None else None
        if field is None or child is None:
            known = ", ".join(k for k, f in fields.items() if _nested(f.annotation)) or "none"
            where = ".".join(walked)
            raise ControllerError(
                f"{path!r}: {where} has no object field {part!r} (its object fields: {known})"
            )
        walked.append(part)
        model = child
    lines = [f"{'.'.join(walked)}: {_text(model.__doc__)}", "", "FIELDS:"]
    for name, field in model.model_fields.items():
        kind = _type_name(field.annotation)
        limits = _limits(field)
        default = _default(field).replace("`", "")
        lines.append(f"  {field.alias or name}  <{kind}{', ' + limits if limits else ''}>  "
                     f"default: {default}")  # fmt: skip
        text = _text(field.description).replace("\\|", "|")
        if text:
            lines.append(f"      {text}")
    return "\n".join(lines) + "\n"
