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
from tests import kubeschema
from tests.integration import apiserver

ROOT = Path(__file__).resolve().parents[2]
CHART_CRD = ROOT / "charts" / "blackhole" / "files" / "crds" / "plugins.blackhole.dev.yaml"
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
        "Ready",
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


def _with(path: str, value: Any) -> dict[str, Any]:
    """The first example with ``value`` at the dotted ``path`` (``None``: removed)."""
    (document,) = documents(EXAMPLES[0])[:1]
    node = document
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return document


# One table through both the models and the CRD as a server applies it (schema, list types,
# CEL rules): (path, value, refused).
CROSS_FIELD = [
    ("spec.permissions", {"network": "none", "egress": ["api.example.com:443"]}, True),
    ("spec.permissions", {"network": "egress", "egress": ["api.example.com:443"]}, False),
    ("spec.permissions", {"network": "egress", "egress": ["a.example.com:0"]}, True),
    ("spec.permissions", {"network": "egress", "egress": ["a.example.com:65536"]}, True),
    ("spec.permissions", {"network": "egress", "egress": ["a.example.com:65535"]}, False),
    ("spec.permissions", {"network": "egress", "egress": ["a.b:1", "a.b:1"]}, True),
    ("spec.permissions", {"network": "none", "peers": ["db"]}, True),
    ("spec.permissions", {"network": "private"}, True),
    ("spec.permissions", {"network": "private", "peers": ["db"]}, False),
    ("spec.permissions", {"network": "private", "peers": ["db", "db"]}, True),
    ("spec.permissions", {"callPlugins": ["kv", "kv"]}, True),
    ("spec.permissions", {"callPlugins": [f"p{i}" for i in range(65)]}, True),
    ("spec.restart", {"backoffSeconds": 10, "maxBackoffSeconds": 5}, True),
    ("spec.restart", {"backoffSeconds": 100}, True),  # the default maxBackoffSeconds is 60
    ("spec.restart", {"backoffSeconds": 5, "maxBackoffSeconds": 5}, False),
    ("spec.volumes", [{"name": "a", "mountPath": "/d"}, {"name": "a", "mountPath": "/e"}], True),
    ("spec.volumes", [{"name": "a", "mountPath": "/d"}, {"name": "b", "mountPath": "/d"}], True),
    ("spec.volumes", [{"name": "a", "mountPath": "/d"}, {"name": "b", "mountPath": "/e"}], False),
    ("spec.volumes", [{"name": "a", "mountPath": "/tmp"}], True),
    ("spec.volumes", [{"name": "a", "mountPath": "/"}], True),
    ("spec.volumes", [{"name": "a", "mountPath": "data"}], True),
    ("spec.volumes", [{"name": "a", "mountPath": "/data/../etc"}], True),
    ("spec.volumes", [{"name": "a", "mountPath": "/d", "hostPath": "rel"}], True),
    ("spec.env", {"BLACKHOLE_TOKEN": "x"}, True),
    ("spec.env", {"blackhole_token": "x"}, True),
    ("spec.env", {"MY_BLACKHOLE_TOKEN": "x"}, False),
    ("spec.provides", ["storage.kv", "storage.kv"], True),
    ("spec.dependsOn", [{"name": "kv"}, {"name": "kv"}], True),
    ("spec.image", None, True),
    ("spec.image", 123, True),
    ("spec.version", None, True),
    ("spec.runtime", "vm", True),
    (
        "spec.hotSwap",
        {
            "webhooks": [
                {"name": "h", "type": "Rollback", "url": "https://x.example/", "onFailure": "Block"}
            ]
        },
        True,
    ),
    (
        "spec.hotSwap",
        {
            "webhooks": [
                {
                    "name": "h",
                    "type": "Rollback",
                    "url": "https://x.example/",
                    "onFailure": "Ignore",
                }
            ]
        },
        False,
    ),
    (
        "spec.hotSwap",
        {
            "webhooks": [
                {"name": "h", "type": "Rollback", "url": "https://x.example/"},
                {"name": "h", "type": "Rollback", "url": "https://y.example/"},
            ]
        },
        True,
    ),
    ("metadata.name", "Bad_Name", True),
    ("metadata.name", "a" * 64, True),
    ("metadata.name", "a" * 63, False),
]


LOOSER = [
    ("spec.env", {"BlackHole_TOKEN": "x"}, True),
    ("metadata.name", "a.b", True),
]
"""What the models refuse and the CRD lets through, knowingly (the controller then reports
InvalidSpec): rules a server's CEL cost estimator could not bound."""


def _server_causes(document: dict[str, Any]) -> list[Any]:
    """What a server says of ``document``: its name (``apiserver``) and the CRD's schema."""
    _, causes = kubeschema.admit(crd.openapi_schema(), document)
    return apiserver.name_causes(crd.PLURAL, document["metadata"]["name"]) + causes


@pytest.mark.parametrize(("path", "value", "refused"), CROSS_FIELD, ids=lambda v: str(v)[:40])
def test_the_crds_rules_refuse_what_the_models_refuse(path, value, refused):
    document = _with(path, value)
    causes = _server_causes(document)
    try:
        loader.load_text(yaml.safe_dump(document))
        model_refused = False
    except SpecError:
        model_refused = True
    assert model_refused is refused, f"the models {'accepted' if refused else 'refused'} it"
    assert bool(causes) is refused, f"the CRD {'accepted' if refused else 'refused'} it: {causes}"


@pytest.mark.parametrize(("path", "value", "refused"), LOOSER, ids=lambda v: str(v)[:40])
def test_what_the_crd_knowingly_lets_through_the_models_refuse(path, value, refused):
    document = _with(path, value)
    assert _server_causes(document) == []
    with pytest.raises(SpecError):
        loader.load_text(yaml.safe_dump(document))


def test_every_cel_rule_compiles_and_says_why():
    found = kubeschema.rules(crd.openapi_schema())
    assert len(found) >= 10
    for path, rule in found:
        kubeschema.program(rule["rule"])
        assert rule.get("message"), path


def test_every_list_and_map_is_bounded_for_the_servers_cost_estimator():
    """A real server refuses CEL rules whose estimated cost is unbounded: every list and map
    the rules can reach has maxItems/maxProperties, and every string in a list maxLength."""
    unbounded = []

    def walk(node: dict[str, Any], path: str, in_list: bool) -> None:
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
        if (
            node.get("type") == "string"
            and in_list
            and "maxLength" not in node
            and "enum" not in node
        ):
            unbounded.append(path)
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}", in_list)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]", True)
        if isinstance(node.get("additionalProperties"), dict):
            if "maxProperties" not in node and node.get("x-kubernetes-validations"):
                unbounded.append(path)
            walk(node["additionalProperties"], f"{path}[*]", in_list)

    walk(crd.openapi_schema()["properties"]["spec"], "spec", False)
    assert unbounded == []


def test_lists_declare_their_type():
    spec = crd.openapi_schema()["properties"]["spec"]["properties"]
    assert spec["volumes"]["x-kubernetes-list-type"] == "map"
    assert spec["volumes"]["x-kubernetes-list-map-keys"] == ["name"]
    assert spec["dependsOn"]["x-kubernetes-list-map-keys"] == ["name"]
    assert spec["provides"]["x-kubernetes-list-type"] == "set"
    for field in ("egress", "peers", "callPlugins"):
        assert spec["permissions"]["properties"][field]["x-kubernetes-list-type"] == "set"


def test_the_ready_column_reads_the_ready_condition():
    (version,) = crd.definition()["spec"]["versions"]
    (ready,) = [c for c in version["additionalPrinterColumns"] if c["name"] == "Ready"]
    assert ready["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


def test_the_schema_is_applied_as_a_server_applies_it():
    """Pruning, then defaults, then validation: unknown fields and nulls go, missing fields of
    objects that are there get their defaults, and duplicates in list types are refused."""
    document = _with("spec.restart", {"maxRestarts": 2, "shade": "red", "backoffSeconds": None})
    document["spec"]["colour"] = "red"
    stored, causes = kubeschema.admit(crd.openapi_schema(), document)
    assert causes == []
    assert "colour" not in stored["spec"]
    assert stored["spec"]["restart"] == {
        "maxRestarts": 2,
        "windowSeconds": 300,
        "backoffSeconds": 1.0,
        "maxBackoffSeconds": 60.0,
        "standby": False,
    }
    assert kubeschema.pruned_fields(crd.openapi_schema(), document) == [
        "spec.restart.shade",
        "spec.colour",
    ]
    _, causes = kubeschema.admit(crd.openapi_schema(), _with("spec.provides", ["a.b", "a.b"]))
    assert [(c.field, c.reason) for c in causes] == [("spec.provides[1]", "FieldValueDuplicate")]
