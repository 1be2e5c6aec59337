"""A CRD's structural schema applied as a Kubernetes API server applies it to a write.

In the API server's order (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/):

1. **pruning**: fields the schema does not name are dropped, except under
   ``x-kubernetes-preserve-unknown-fields``; ``null`` where the schema is not
   ``nullable`` is dropped too (before defaulting);
2. **defaulting**: a ``default`` fills a missing field of an object that is there;
3. **validation**: types (``integer`` is a whole number, ``number`` any;
   ``x-kubernetes-int-or-string``), ``enum``, ``pattern``, string lengths, item and
   property counts, bounds, ``required``, ``format: date-time``, list types
   (``set``: no duplicates, ``map``: no two items with the same keys);
4. **CEL rules** (``x-kubernetes-validations``) with ``self`` bound to the node,
   evaluated by ``celpy`` (cel-python), numbers of ``type: number`` as doubles as
   the server's CEL sees them.

Errors come as ``(field path, reason, message)`` in the shape of the server's
Status causes (``FieldValueInvalid``, ``FieldValueRequired``,
``FieldValueNotSupported``, ``FieldValueDuplicate``, ``FieldValueTooLong``,
``FieldValueTooMany``, ``FieldValueTypeInvalid``).

Only what the Plugin CRD uses is here: no ``oldSelf`` transition rules, no
``allOf``/``oneOf``/``not``, no ``x-kubernetes-embedded-resource``.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError


@dataclass(frozen=True)
class Cause:
    """One reason a write is invalid, as a Status cause."""

    field: str
    reason: str
    message: str


_ROOT_KEPT = {"apiVersion", "kind", "metadata"}


def prune(schema: dict[str, Any], value: Any, *, root: bool = True) -> Any:
    """``value`` without the fields ``schema`` does not name (and unwanted nulls)."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return value
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, sub in value.items():
            if root and key in _ROOT_KEPT and key == "metadata":
                out[key] = sub
                continue
            if props is not None and key in props:
                if sub is None and not props[key].get("nullable"):
                    continue
                out[key] = prune(props[key], sub, root=False)
            elif isinstance(extra, dict):
                out[key] = prune(extra, sub, root=False)
            elif schema.get("x-kubernetes-preserve-unknown-fields"):
                out[key] = sub
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], item, root=False) for item in value]
    return value


def pruned_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The paths of the fields :func:`prune` drops from ``value``."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return []
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        found = []
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if not path and key == "metadata":
                continue
            if props is not None and key in props:
                if sub is None and not props[key].get("nullable"):
                    continue  # a null is dropped as a removal, not a loss
                found += pruned_fields(props[key], sub, where)
            elif isinstance(extra, dict):
                found += pruned_fields(extra, sub, f"{path}[{key}]")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(where)
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [
            p
            for i, item in enumerate(value)
            for p in pruned_fields(schema["items"], item, f"{path}[{i}]")
        ]
    return []


def default(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in where objects lack a field."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = default(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                value[key] = default(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [default(schema["items"], item) for item in value]
    return value


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _render(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, dict | list) else _type_of(value)


def _typed(schema: dict[str, Any], value: Any, path: str) -> Cause | None:
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, int | str):
            message = f"{path} in body must be of type int-or-string"
            return Cause(
                path,
                "FieldValueTypeInvalid",
                f'{path}: Invalid value: "{_type_of(value)}": {message}',
            )
        return None
    wanted = schema.get("type")
    if wanted is None:
        return None
    got = _type_of(value)
    if got == wanted or (wanted == "number" and got == "integer"):
        return None
    if wanted == "integer" and isinstance(value, float) and value.is_integer():
        return None
    message = f'{path} in body must be of type {wanted}: "{got}"'
    return Cause(path, "FieldValueTypeInvalid", f'{path}: Invalid value: "{got}": {message}')


def _date_time(text: str) -> bool:
    try:
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in text or " " in text


def _invalid(here: str, value: Any, message: str) -> Cause:
    return Cause(here, "FieldValueInvalid", f"{here}: Invalid value: {_render(value)}: {message}")


def _string(schema: dict[str, Any], value: str, here: str) -> list[Cause]:
    causes = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        limit = schema["maxLength"]
        causes.append(
            Cause(
                here, "FieldValueTooLong", f"{here}: Too long: may not be more than {limit} bytes"
            )
        )
    if "minLength" in schema and len(value) < schema["minLength"]:
        causes.append(
            _invalid(
                here, value, f"{here} in body should be at least {schema['minLength']} chars long"
            )
        )
    if "pattern" in schema and not re.search(schema["pattern"], value):
        causes.append(_invalid(here, value, f"{here} in body should match '{schema['pattern']}'"))
    if schema.get("format") == "date-time" and not _date_time(value):
        causes.append(_invalid(here, value, f"{here} in body must be of type date-time"))
    return causes


def _number(schema: dict[str, Any], value: float, here: str) -> list[Cause]:
    causes = []
    for bound, exclusive, above in (
        ("minimum", "exclusiveMinimum", False),
        ("maximum", "exclusiveMaximum", True),
    ):
        if bound not in schema:
            continue
        limit = schema[bound]
        strict = bool(schema.get(exclusive))
        beyond = value > limit if above else value < limit
        if beyond or (strict and value == limit):
            word = ("less than" if above else "greater than") + ("" if strict else " or equal to")
            causes.append(_invalid(here, value, f"{here} in body should be {word} {limit}"))
    return causes


def _array(schema: dict[str, Any], value: list[Any], path: str, here: str) -> list[Cause]:
    causes = []
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        limit = schema["maxItems"]
        causes.append(
            Cause(
                here,
                "FieldValueTooMany",
                f"{here}: Too many: {len(value)}: must have at most {limit} items",
            )
        )
    if "minItems" in schema and len(value) < schema["minItems"]:
        causes.append(
            _invalid(
                here, len(value), f"{here} in body should have at least {schema['minItems']} items"
            )
        )
    causes += _list_type(schema, value, here)
    if isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            causes += validate(schema["items"], item, f"{path}[{index}]")
    return causes


def _object(schema: dict[str, Any], value: dict[str, Any], path: str, here: str) -> list[Cause]:
    causes = []
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        limit = schema["maxProperties"]
        causes.append(
            Cause(
                here,
                "FieldValueTooMany",
                f"{here}: Too many: {len(value)}: must have at most {limit} items",
            )
        )
    for name in schema.get("required") or []:
        if name not in value:
            where = f"{path}.{name}" if path else name
            causes.append(Cause(where, "FieldValueRequired", f"{where}: Required value"))
    props = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    for key, sub in value.items():
        if key in props:
            if not (path == "" and key == "metadata"):  # the server's ObjectMeta checks apply
                causes += validate(props[key], sub, f"{path}.{key}" if path else key)
        elif isinstance(extra, dict):
            causes += validate(extra, sub, f"{path}[{key}]")
    return causes


def validate(schema: dict[str, Any], value: Any, path: str = "") -> list[Cause]:
    """Every cause ``value`` breaks ``schema`` with (types, bounds, list types, CEL rules)."""
    here = path or "<root>"
    if (problem := _typed(schema, value, here)) is not None:
        return [problem]
    causes: list[Cause] = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        message = f"{here}: Unsupported value: {_render(value)}: supported values: {allowed}"
        causes.append(Cause(here, "FieldValueNotSupported", message))
    if isinstance(value, str):
        causes += _string(schema, value, here)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        causes += _number(schema, value, here)
    elif isinstance(value, list):
        causes += _array(schema, value, path, here)
    elif isinstance(value, dict):
        causes += _object(schema, value, path, here)
    if causes:
        return causes  # a node that breaks its schema is not given to its rules
    for rule in schema.get("x-kubernetes-validations") or []:
        if not _holds(rule["rule"], _as_cel_input(schema, value)):
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            causes.append(
                Cause(
                    here,
                    "FieldValueInvalid",
                    f'{here}: Invalid value: "{_type_of(value)}": {message}',
                )
            )
    return causes


def _list_type(schema: dict[str, Any], value: list[Any], here: str) -> list[Cause]:
    kind = schema.get("x-kubernetes-list-type")
    seen: list[Any] = []
    causes = []
    for index, item in enumerate(value):
        if kind == "set":
            key: Any = item
        elif kind == "map":
            key = tuple((item or {}).get(k) for k in schema.get("x-kubernetes-list-map-keys") or [])
        else:
            return []
        if key in seen:
            keys = schema.get("x-kubernetes-list-map-keys") or []
            shown = _render(item) if kind == "set" else _render(dict(zip(keys, key, strict=True)))
            where = f"{here}[{index}]"
            causes.append(Cause(where, "FieldValueDuplicate", f"{where}: Duplicate value: {shown}"))
        seen.append(key)
    return causes


def _as_cel_input(schema: dict[str, Any], value: Any) -> Any:
    """``value`` as the server's CEL sees it: numbers of ``type: number`` are doubles."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        return {
            k: _as_cel_input(props.get(k) or (extra if isinstance(extra, dict) else {}), v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        items = schema.get("items")
        return [_as_cel_input(items if isinstance(items, dict) else {}, v) for v in value]
    return value


@functools.cache
def program(rule: str) -> Any:
    """The compiled CEL rule (a syntax error raises ``celpy.CELParseError``)."""
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def _holds(rule: str, value: Any) -> bool:
    try:
        result = program(rule).evaluate({"self": json_to_cel(value)})
    except CELEvalError:
        return False  # a rule that errors at run time fails, as on the server
    return bool(result) if not isinstance(result, CELEvalError) else False


def rules(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every CEL rule of ``schema`` with the path of the node it applies to."""
    found = [(path or "<root>", r) for r in schema.get("x-kubernetes-validations") or []]
    for key, sub in (schema.get("properties") or {}).items():
        found += rules(sub, f"{path}.{key}" if path else key)
    if isinstance(schema.get("items"), dict):
        found += rules(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += rules(schema["additionalProperties"], f"{path}[*]")
    return found


def admit(schema: dict[str, Any], obj: dict[str, Any]) -> tuple[dict[str, Any], list[Cause]]:
    """``obj`` pruned and defaulted, and what is wrong with it (nothing: it may be stored)."""
    pruned = prune(schema, copy.deepcopy(obj))
    defaulted = default(schema, pruned)
    return defaulted, validate(schema, defaulted)
