"""The CRD: generated from the models, committed in the chart, valid for Kubernetes.

Examples must validate both against the models and against the CRD's
openAPIV3Schema, checked here as ``kubectl apply --validate=strict`` would:
unknown fields are errors.
"""

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.errors import SpecError
from controller.spec import crd, loader

ROOT = Path(__file__).resolve().parents[2]
CHART_CRD = ROOT / "charts" / "blackhole" / "crds" / "plugins.blackhole.dev.yaml"
PLAIN_CRD = ROOT / "deploy" / "kubernetes" / "crd-plugins.blackhole.dev.yaml"
EXAMPLES = sorted((ROOT / "examples" / "plugins").glob("*.yaml"))


def strict_validator() -> jsonschema.Draft4Validator:
    """The CRD's schema as JSON Schema draft 4 (OpenAPI 3.0's base), with strict fields."""
    schema = copy.deepcopy(crd.openapi_schema())

    def tighten(node: dict[str, Any]) -> None:
        if node.pop("x-kubernetes-int-or-string", False):
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for sub in node.get("properties", {}).values():
            tighten(sub)
        if isinstance(node.get("items"), dict):
            tighten(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            tighten(node["additionalProperties"])

    tighten(schema)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("committed", [CHART_CRD, PLAIN_CRD], ids=["chart", "plain"])
def test_committed_crd_is_the_generated_one(committed):
    assert committed.read_text() == crd.render(), f"{committed} is stale: run `make crd`"


def test_crd_passes_kubernetes_validate_strict():
    (definition,) = documents(CHART_CRD)
    kubernetes_validate.validate(definition, "1.37", strict=True)


def test_crd_shape():
    definition = crd.definition()
    spec = definition["spec"]
    assert definition["metadata"]["name"] == "plugins.blackhole.dev"
    assert spec["names"]["shortNames"] == ["pl"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Version",
        "Active",
        "Age",
    ]


def test_every_field_is_described():
    undescribed = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            if name != "metadata" and not sub.get("description"):
                undescribed.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(crd.openapi_schema(), "plugin")
    assert undescribed == []


def test_schema_is_structural():
    """No $ref, no nullable unions, every node typed (or int-or-string / preserved)."""

    def walk(node: dict[str, Any], path: str) -> None:
        assert "$ref" not in node, path
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), path
        assert not ("properties" in node and "additionalProperties" in node), path
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(crd.openapi_schema(), "plugin")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_models_and_crd(path):
    assert loader.load_file(path)
    validator = strict_validator()
    for document in documents(path):
        errors = [e.message for e in validator.iter_errors(document)]
        assert errors == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("colour", "red"),
        ("resources", {"memory": "12XB"}),
        ("resources", {"pids": -1}),
        ("permissions", {"network": "public"}),
        ("version", "1.0"),
        ("hotSwap", {"maxPauseMilliseconds": 0}),
    ],
)
def test_crd_refuses_what_the_models_refuse(field, value):
    (document,) = documents(EXAMPLES[0])[:1]
    document["spec"][field] = value
    assert list(strict_validator().iter_errors(document)), f"CRD accepted spec.{field}={value!r}"
    with pytest.raises(SpecError):
        loader.load_text(yaml.safe_dump(document))
