"""The ``plugins.blackhole.dev`` CustomResourceDefinition, generated from the models.

Pydantic's JSON Schema is rewritten into a Kubernetes *structural* schema:
references inlined, ``Optional`` unwrapped, ``const`` as ``enum``, numeric
exclusive bounds in OpenAPI v3.0 form, quantities as int-or-string, free-form
maps as ``x-kubernetes-preserve-unknown-fields``. The CRD is never written by
hand: ``bhctl crd`` prints it and the chart's copy is checked against it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from controller.spec import models

PLURAL = "plugins"
NAME = f"{PLURAL}.{models.API_GROUP}"
SERVED_VERSION = models.API_VERSION.split("/", 1)[1]

_DROP = {"title", "additionalProperties", "patternProperties", "$defs", "propertyNames"}


def openapi_schema() -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` for the ``Plugin`` kind."""
    source = models.Plugin.model_json_schema(by_alias=True, mode="validation")
    defs = source.get("$defs", {})
    schema = _structural(source, defs)
    props = schema["properties"]
    props["apiVersion"] = {
        "type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an "
        "object: blackhole.dev/v1alpha1.",
    }
    props["kind"] = {
        "type": "string",
        "description": "Kind is a string value representing the REST resource this object "
        "represents: Plugin.",
    }
    props["metadata"] = {"type": "object"}
    schema["required"] = [r for r in schema.get("required", []) if r not in {"apiVersion", "kind"}]
    return schema


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[1]]
        merged = {**copy.deepcopy(target), **node}  # the field's description wins
        return _structural(merged, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {branches} in a structural schema")
        if "default" in node and node["default"] is None:
            del node["default"]
        return _structural({**branches[0], **node}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "description":
            out[key] = _clean_text(value)
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "anyOf":  # int-or-string: the pattern belongs to the node, not a branch
            out[key] = [{"type": b["type"]} for b in value]
            patterns = [b["pattern"] for b in value if "pattern" in b]
            if patterns:
                out["pattern"] = patterns[0]
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if "type" not in out and "anyOf" not in out:  # Any: a JSON value of any kind
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "object" and "properties" not in out:
        values = node.get("additionalProperties")
        if isinstance(values, dict) and values.get("type") not in {None, "object"}:
            out["additionalProperties"] = _structural(values, defs)
        elif "patternProperties" in node:
            (values,) = node["patternProperties"].values()
            out["additionalProperties"] = _structural(values, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _clean_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def definition() -> dict[str, Any]:
    """The whole ``apiextensions.k8s.io/v1`` CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": NAME,
            "labels": {"app.kubernetes.io/part-of": "blackhole"},
        },
        "spec": {
            "group": models.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": "plugin",
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "shortNames": ["pl"],
                "categories": ["blackhole"],
            },
            "versions": [
                {
                    "name": SERVED_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                            "description": "Whether the plugin serves calls.",
                        },
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
                        {
                            "name": "Active",
                            "type": "string",
                            "jsonPath": ".status.activeColor",
                            "description": "The color receiving calls.",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render() -> str:
    """The CRD as YAML, exactly as committed in the chart (``files/crds/``) and ``deploy/``."""
    header = "# Generated by `bhctl crd` from controller/spec/models.py. Do not edit.\n"
    return header + yaml.safe_dump(definition(), sort_keys=False, width=1000)
