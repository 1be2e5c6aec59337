"""The one YAML reader for outside input: spec files, applied specs, manifests, policy files.

It reads only what JSON can say (mappings, sequences, strings, numbers,
booleans, null), in bounded time and memory, and turns every failure into a
:class:`~controller.errors.SpecError` naming the source, the document, the
line and the field path:

- at most :data:`MAX_BYTES` per input (the limit is in the error);
- aliases (``*name``) are refused: an anchor expanded at each use is how a
  few hundred bytes become gigabytes, and Kubernetes refuses them too;
- at most :data:`MAX_DEPTH` levels of nesting and :data:`MAX_NODES` values;
- no explicit tags but the JSON ones (``!!str``, ``!!int``, ``!!float``,
  ``!!bool``, ``!!null``, ``!!map``, ``!!seq``); a plain ``2024-01-01`` is a
  string, as in Kubernetes, not a timestamp;
- keys are scalars and appear once per mapping; no merge keys (``<<``);
- no NUL or other control characters but tab, newline and carriage return,
  in keys and values.

Events come from libyaml when PyYAML was built with it, else from PyYAML's
own parser; the nodes are composed here, so that nothing is ever expanded.
Its users: :mod:`controller.spec.loader` (specs), and the registry's
manifest and policy readers (:func:`validate` checks a document against a
model and names each bad field with its line).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pydantic
import yaml

from controller.errors import SpecError, SpecIssue

MAX_BYTES = 1 << 20
"""Largest input accepted, in bytes (1 MiB, about a Kubernetes object's limit)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences accepted."""
MAX_NODES = 100_000
"""Most values (keys, items and scalars) one document may hold: a bound on the time it takes."""
MAX_ISSUES = 50
"""Most problems reported for one document; the last says how many more there were."""

M = TypeVar("M", bound=pydantic.BaseModel)
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_TAG}{t}" for t in ("str", "int", "float", "bool", "null")}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class _Resolver(yaml.resolver.Resolver):
    """YAML 1.1's implicit types, without timestamps (strings, as in Kubernetes)."""


_Resolver.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != f"{_TAG}timestamp"]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}


class _PythonEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, _Resolver):
    """PyYAML's own parser, for a PyYAML built without libyaml."""

    def __init__(self, text: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _Resolver.__init__(self)


_Events: type[Any] = _PythonEvents
if yaml.__with_libyaml__:
    from yaml import _yaml

    class _LibyamlEvents(_yaml.CParser, _Resolver):
        """libyaml's parser (C): the same events, several times faster."""

        def __init__(self, text: str) -> None:
            _yaml.CParser.__init__(self, text)
            _Resolver.__init__(self)

    _Events = _LibyamlEvents


_Path = tuple[str | int, ...]


class _Refused(Exception):
    """Raised inside this module only; becomes a SpecIssue."""

    def __init__(self, message: str, mark: Any, path: _Path = ()) -> None:
        super().__init__(message)
        self.message, self.mark, self.path = message, mark, path


_SCALAR = yaml.constructor.SafeConstructor()


@dataclass(frozen=True)
class Document:
    """One YAML document: its value, and its node tree for line numbers."""

    value: Any
    node: yaml.Node
    index: int
    """1-based index of the document in its input."""


def documents(text: str | bytes, source: str) -> Iterator[Document | SpecIssue]:
    """Every non-empty document of ``text``, or the problem of a document that has one.

    A problem of one document's values (a bad tag, a duplicate key) is
    yielded and the next document is read; a problem of the text itself (its
    size, its syntax, an alias, its depth) raises :class:`SpecError` after
    the documents before it were yielded.
    """
    text = _decode(text, source)
    events = None
    index = 0
    try:
        events = _Events(text)  # the Python reader checks every character here
        events.get_event()  # StreamStart
        while not events.check_event(yaml.StreamEndEvent):
            index += 1
            events.get_event()  # DocumentStart
            node = _Composer(events).compose()
            events.get_event()  # DocumentEnd
            try:
                value = _construct(node, [])
            except _Refused as e:
                yield _issue(source, index, e.message, e.mark, e.path)
                continue
            if value is not None:
                yield Document(value, node, index)
    except _Refused as e:
        raise SpecError([_issue(source, index, e.message, e.mark, e.path)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or str(e)
        context = f" ({e.context})" if e.context else ""
        raise _error(source, index or None, f"invalid YAML: {problem}{context}", mark) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        issue = SpecIssue(source, index or None, "", f"invalid YAML: {e.reason}", line=line)
        raise SpecError([issue]) from None
    except yaml.YAMLError as e:
        raise _error(source, index or None, f"invalid YAML: {e}", None) from None
    except (ValueError, OverflowError) as e:  # PyYAML's own parser, on a bad escape
        mark = events.get_mark() if isinstance(events, _PythonEvents) else None
        raise _error(source, index or None, f"invalid YAML: {e}", mark) from None
    finally:
        if events is not None:
            events.dispose()


def load_all(text: str | bytes, source: str) -> list[Document]:
    """Every non-empty document of ``text``; raises :class:`SpecError` at the first problem."""
    found = []
    for item in documents(text, source):
        if isinstance(item, SpecIssue):
            raise SpecError([item])
        found.append(item)
    return found


def load_one(text: str | bytes, source: str) -> Any:
    """The value of the single document of ``text`` (None when empty); more are refused."""
    found = load_all(text, source)
    if len(found) > 1:
        raise _error(source, found[1].index, "expected one YAML document", found[1].node.start_mark)
    return found[0].value if found else None


def _decode(text: str | bytes, source: str) -> str:
    size = len(text)  # a character is at least a byte
    if isinstance(text, str) and size <= MAX_BYTES:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise _error(
                source, None, f"not valid Unicode text: {e.reason} at character {e.start}", None
            ) from None
    if size > MAX_BYTES:
        raise _error(
            source,
            None,
            f"is at least {size} bytes, over the limit of {MAX_BYTES} bytes (1 MiB)",
            None,
        )
    if isinstance(text, str):
        return text
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _error(source, None, f"not UTF-8 text: {e.reason} at byte {e.start}", None) from None


def _issue(
    source: str, document: int | None, message: str, mark: Any, path: _Path = ()
) -> SpecIssue:
    line = mark.line + 1 if mark is not None else None
    return SpecIssue(source, document, field_path(path), message, line=line)


def _error(source: str, document: int | None, message: str, mark: Any) -> SpecError:
    return SpecError([_issue(source, document, message, mark)])


def field_path(path: Sequence[str | int]) -> str:
    """``spec.volumes[0].name`` for ``("spec", "volumes", 0, "name")``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return _shorten(text)


def line_of(node: yaml.Node, loc: Sequence[str | int]) -> int:
    """The 1-based line of the field at ``loc`` in ``node``'s document, or of the nearest
    field around it that is there (a missing field: its mapping's line)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(
                (
                    (key, value)
                    for key, value in node.value
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part)
                ),
                None,
            )
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def capped(
    issues: list[SpecIssue], total: int, source: str, document: int | None
) -> list[SpecIssue]:
    """The issues built for the first :data:`MAX_ISSUES` of ``total`` problems, and one
    saying how many more there were."""
    if total <= MAX_ISSUES:
        return issues
    line = max((i.line for i in issues if i.line is not None), default=None)  # sorted last
    more = SpecIssue(source, document, "", f"and {total - MAX_ISSUES} more problems", line=line)
    return [*issues, more]


def validate(model: type[M], document: Document | None, source: str) -> M:
    """``document`` as ``model``; raises :class:`SpecError` with each problem's line and field."""
    if document is None or not isinstance(document.value, dict):
        line = document.node.start_mark.line + 1 if document is not None else None
        raise SpecError([SpecIssue(source, None, "", "must be a mapping of fields", line=line)])
    try:
        return model.model_validate(document.value)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
        issues = [
            SpecIssue(
                source,
                None,
                field_path([p for p in error["loc"] if isinstance(p, str | int)]),
                error["msg"].removeprefix("Value error, "),
                value=error.get("input"),
                has_value=not isinstance(error.get("input"), dict | list),
                line=line_of(document.node, error["loc"]),
            )
            for error in errors[:MAX_ISSUES]
        ]
        raise SpecError(capped(issues, len(errors), source, None)) from None


class _Composer:
    """Builds one document's node tree from events, refusing aliases, depth and size.

    The field path is one list, pushed and popped as the tree is walked, so
    that a node costs the same at any depth; it is copied only into an error.
    """

    def __init__(self, events: Any) -> None:
        self.events = events
        self.path: list[str | int] = []
        self.nodes = 0

    def refuse(self, message: str, mark: Any) -> _Refused:
        return _Refused(message, mark, tuple(self.path))

    def compose(self) -> yaml.Node:
        event = self.events.get_event()
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.refuse(
                f"more than {MAX_NODES} values (keys, items and scalars) in one document",
                event.start_mark,
            )
        if isinstance(event, yaml.AliasEvent):
            raise self.refuse(
                f"aliases (*{event.anchor}) are not accepted; write the value out",
                event.start_mark,
            )
        if isinstance(event, yaml.ScalarEvent):
            tag = event.tag
            if tag is None or tag == "!":
                tag = self.events.resolve(yaml.ScalarNode, event.value, event.implicit)
            start, end = cast(yaml.Mark, event.start_mark), cast(yaml.Mark, event.end_mark)
            return yaml.ScalarNode(tag, event.value, start, end, event.style)
        if len(self.path) >= MAX_DEPTH:
            raise self.refuse(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        if isinstance(event, yaml.SequenceStartEvent):
            return self._sequence(event)
        assert isinstance(event, yaml.MappingStartEvent), event
        return self._mapping(event)

    def _sequence(self, event: Any) -> yaml.Node:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.events.resolve(yaml.SequenceNode, None, event.implicit)
        items: list[yaml.Node] = []
        start = cast(yaml.Mark, event.start_mark)
        sequence = yaml.SequenceNode(tag, items, start, None, event.flow_style)
        self.path.append(0)
        while not self.events.check_event(yaml.SequenceEndEvent):
            self.path[-1] = len(items)
            items.append(self.compose())
        self.path.pop()
        sequence.end_mark = self.events.get_event().end_mark
        return sequence

    def _mapping(self, event: Any) -> yaml.Node:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.events.resolve(yaml.MappingNode, None, event.implicit)
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        start = cast(yaml.Mark, event.start_mark)
        mapping = yaml.MappingNode(tag, pairs, start, None, event.flow_style)
        self.path.append("<key>")
        while not self.events.check_event(yaml.MappingEndEvent):
            self.path[-1] = "<key>"
            key = self.compose()
            self.path[-1] = key.value if isinstance(key, yaml.ScalarNode) else "<key>"
            pairs.append((key, self.compose()))
        self.path.pop()
        mapping.end_mark = self.events.get_event().end_mark
        return mapping


def _construct(node: yaml.Node, path: list[str | int]) -> Any:
    """The value of ``node``; ``path`` (its field path) is pushed and popped in place."""
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node, path)
    if isinstance(node, yaml.SequenceNode):
        if node.tag != f"{_TAG}seq":
            raise _Refused(_tag_help(node.tag), node.start_mark, tuple(path))
        items = []
        path.append(0)
        for index, item in enumerate(node.value):
            path[-1] = index
            items.append(_construct(item, path))
        path.pop()
        return items
    if node.tag != f"{_TAG}map":
        raise _Refused(_tag_help(node.tag), node.start_mark, tuple(path))
    mapping: dict[Any, Any] = {}
    first: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise _Refused(
                "a key must be a string or another scalar, not a mapping or a list",
                key_node.start_mark,
                tuple(path),
            )
        if key_node.tag == f"{_TAG}merge":
            raise _Refused("merge keys (<<) are not accepted", key_node.start_mark, tuple(path))
        key = _scalar(key_node, path)
        if key in first:
            raise _Refused(
                f'duplicate key "{key}" (first on line {first[key]})',
                key_node.start_mark,
                tuple(path),
            )
        first[key] = key_node.start_mark.line + 1
        path.append(str(key))
        mapping[key] = _construct(value_node, path)
        path.pop()
    return mapping


def _scalar(node: yaml.ScalarNode, path: list[str | int]) -> Any:
    found = _CONTROL.search(node.value)
    if found:
        raise _Refused(
            f"control character U+{ord(found.group()):04X} is not allowed",
            node.start_mark,
            tuple(path),
        )
    kind = node.tag.removeprefix(_TAG)
    if node.tag not in _SCALAR_TAGS:
        raise _Refused(_tag_help(node.tag), node.start_mark, tuple(path))
    try:
        if kind == "str":
            return node.value
        if kind == "int":
            return _SCALAR.construct_yaml_int(node)
        if kind == "float":
            return _SCALAR.construct_yaml_float(node)
        if kind == "bool":
            if node.value.lower() not in _SCALAR.bool_values:
                raise ValueError(node.value)
            return _SCALAR.construct_yaml_bool(node)
        return None
    except (ValueError, OverflowError):
        raise _Refused(
            f'"{_shorten(node.value)}" is not a valid {kind}', node.start_mark, tuple(path)
        ) from None


def _tag_help(tag: str) -> str:
    shown = "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag
    return (
        f"the tag {_shorten(shown)} is not accepted; only what JSON can say "
        "(strings, numbers, booleans, null, mappings and lists)"
    )


def _shorten(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."
