"""Loading ``Plugin`` objects from YAML text and files, with errors a person can act on.

Each problem is reported as a :class:`~controller.errors.SpecIssue` naming the
file, the document, the line, the field path, the bad value and what is
allowed. All problems of all files are collected before anything is raised,
so one run of ``bhctl validate`` shows them all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from controller.errors import SpecError, SpecIssue
from controller.spec import models, safe_yaml


@dataclass(frozen=True)
class LoadedPlugin:
    """A valid plugin and where it was read from."""

    plugin: models.Plugin
    source: str
    document: int


def _allowed_fields(loc: Sequence[str | int]) -> list[str] | None:
    """The field names the model at ``loc`` (a path into a Plugin) accepts."""
    model: Any = models.Plugin
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            return None
        field = next(
            (f for n, f in model.model_fields.items() if (f.alias or n) == part),
            None,
        )
        if field is None:
            return None
        model = _model_of(field.annotation)
    if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return None


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _issues_from(
    error: pydantic.ValidationError,
    source: str,
    document: int,
    node: yaml.Node,
) -> list[SpecIssue]:
    issues = []
    errors = error.errors(include_url=False)
    for err in errors[: safe_yaml.MAX_ISSUES]:
        loc = list(err["loc"])
        kind = err["type"]
        message = err["msg"]
        has_value = True
        if kind == "extra_forbidden":
            allowed = _allowed_fields(loc[:-1])
            message = "unknown field"
            if allowed:
                message += f"; allowed here: {', '.join(allowed)}"
        elif kind == "missing":
            message = "required field is missing"
            has_value = False
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        elif kind == "string_pattern_mismatch":
            message = _pattern_help(loc, message)
        if isinstance(err.get("input"), dict | list) and kind not in {"dict_type", "list_type"}:
            has_value = False
        issues.append(
            SpecIssue(
                source=source,
                document=document,
                path=safe_yaml.field_path(loc),
                message=message,
                value=err.get("input"),
                has_value=has_value,
                line=safe_yaml.line_of(node, loc),
            )
        )
    return safe_yaml.capped(issues, len(errors), source, document)


_PATTERN_HELP = {
    "name": "use a DNS-1123 label: lower-case letters, digits and '-', starting and ending "
    "with a letter or digit, at most 63 characters (e.g. kv-store)",
    "namespace": "use a DNS-1123 label (e.g. plugins)",
    "peers": "use plugin names (DNS-1123 labels, e.g. auth)",
    "callPlugins": "use plugin names (DNS-1123 labels, e.g. auth)",
    "image": "use an image reference such as blackhole/example-storage:1.2.0 or "
    "registry.example/team/plugin@sha256:<64 hex digits>",
    "provides": "use a dotted lower-case capability such as storage.kv",
    "egress": "use host:port, e.g. api.example.com:443 or *.example.com:443",
    "env": "use a variable name of letters, digits and '_' not starting with a digit",
    "type": "use a CamelCase condition type such as Ready",
    "reason": "use a CamelCase reason such as InstanceHealthy",
}


def _pattern_help(loc: Sequence[str | int], default: str) -> str:
    for part in reversed(loc):
        if isinstance(part, str) and part in _PATTERN_HELP:
            return f"invalid value; {_PATTERN_HELP[part]}"
    return default


def load_text(text: str | bytes, source: str = "<input>") -> list[LoadedPlugin]:
    """Parse every ``Plugin`` document in ``text``; raise :class:`SpecError` listing all issues.

    The YAML is read by :mod:`controller.spec.safe_yaml`: bounded in size,
    depth and time, without aliases.
    """
    issues: list[SpecIssue] = []
    loaded: list[LoadedPlugin] = []
    try:
        for item in safe_yaml.documents(text, source):
            if isinstance(item, SpecIssue):
                issues.append(item)
                continue
            if not isinstance(item.value, dict):
                issues.append(
                    SpecIssue(
                        source,
                        item.index,
                        "",
                        "a document must be a mapping with apiVersion, kind, metadata and spec",
                        line=item.node.start_mark.line + 1,
                    )
                )
                continue
            _validate_document(item.value, source, item.index, item.node, issues, loaded)
    except SpecError as e:
        issues.extend(e.issues)
    if issues:
        issues.sort(key=lambda i: (i.document or 0, i.line or 0))
        raise SpecError(issues)
    return loaded


def _validate_document(
    document: dict[str, Any],
    source: str,
    index: int,
    node: yaml.Node,
    issues: list[SpecIssue],
    loaded: list[LoadedPlugin],
) -> None:
    header = _check_header(document, source, index, node)
    if header:
        issues.extend(header)
        return
    try:
        plugin = models.Plugin.model_validate(document, by_alias=True, by_name=False)
    except pydantic.ValidationError as e:
        issues.extend(_issues_from(e, source, index, node))
        return
    loaded.append(LoadedPlugin(plugin, source, index))


def _check_header(
    document: Mapping[str, Any], source: str, index: int, node: yaml.Node
) -> list[SpecIssue]:
    """Refuse documents that are not Plugins before reporting field errors of the wrong kind."""
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if kind == models.KIND and api_version == models.API_VERSION:
        return []
    if kind == models.KIND or api_version == models.API_VERSION or kind is None:
        return []  # a Plugin with a typo: let the model name the field
    return [
        SpecIssue(
            source,
            index,
            "kind",
            f"not a Plugin; expected apiVersion: {models.API_VERSION}, kind: {models.KIND}",
            value=f"{api_version}/{kind}",
            has_value=True,
            line=safe_yaml.line_of(node, ("kind",)),
        )
    ]


def load_file(path: Path) -> list[LoadedPlugin]:
    """Load every ``Plugin`` in one YAML file."""
    try:
        with path.open("rb") as handle:
            data = handle.read(safe_yaml.MAX_BYTES + 1)
    except OSError as e:
        raise SpecError([SpecIssue(str(path), None, "", f"cannot read: {e}")]) from e
    return load_text(data, str(path))


def spec_files(directory: Path) -> list[Path]:
    """The YAML files directly in ``directory``, sorted, hidden files skipped."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix in {".yaml", ".yml"} and not p.name.startswith(".") and p.is_file()
    )


def load_paths(paths: Iterable[Path]) -> list[LoadedPlugin]:
    """Load files and directories of files; names must be unique across all of them.

    Raises :class:`SpecError` with the issues of every file.
    """
    issues: list[SpecIssue] = []
    loaded: list[LoadedPlugin] = []
    for path in paths:
        files = spec_files(path) if path.is_dir() else [path]
        for file in files:
            try:
                loaded.extend(load_file(file))
            except SpecError as e:
                issues.extend(e.issues)
    first: dict[str, LoadedPlugin] = {}
    for item in loaded:
        seen = first.setdefault(item.plugin.key, item)
        if seen is not item:
            issues.append(
                SpecIssue(
                    item.source,
                    item.document,
                    "metadata.name",
                    f"plugin declared twice; first in {seen.source} (document {seen.document})",
                    value=item.plugin.key,
                    has_value=True,
                )
            )
    if issues:
        raise SpecError(issues)
    return loaded
