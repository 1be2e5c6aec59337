"""The API stand-in against the Kubernetes API's documented behaviour, one test per behaviour.

Each test names the documentation it follows (``DOCS``), so how faithful the
stand-in (``apiserver.py``) is can be read here at a glance; with ``-m cluster``
and ``KUBECONFIG`` the same tests run against a real cluster, which is how a
test is known to state the real behaviour. The EndpointSlices the stand-in's
kubelet keeps are checked in ``test_kubernetes.py``
(``test_endpoint_slices_list_every_pod_a_service_selects``).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from tests.unit import test_chart

from .conftest import TIME_SCALE, wait_for
from .test_kubernetes import CRD, GROUP, NAMESPACE, PLURAL, VERSION, Api, _json, api, install_crd

__all__ = ["api"]

API = "https://kubernetes.io/docs/reference/using-api/api-concepts/"
CRDS = "https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/"
NAMES = "https://kubernetes.io/docs/concepts/overview/working-with-objects/names/"
DOCS = {
    "schema": CRDS + "#validation",
    "cel": CRDS + "#validation-rules",
    "pruning": CRDS + "#field-pruning",
    "defaulting": CRDS + "#defaulting",
    "status": CRDS + "#status-subresource",
    "served": CRDS + "#create-a-customresourcedefinition",
    "upgrade": "https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definition-versioning/",
    "names": NAMES + "#dns-subdomain-names",
    "service-names": NAMES + "#rfc-1035-label-names",
    "labels": "https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set",
    "namespaces": "https://kubernetes.io/docs/concepts/overview/working-with-objects/namespaces/",
    "gc": "https://kubernetes.io/docs/concepts/architecture/garbage-collection/#background-deletion",
    "orphan": "https://kubernetes.io/docs/concepts/architecture/garbage-collection/#orphaned-dependents",
    "owners": "https://kubernetes.io/docs/concepts/overview/working-with-objects/owners-dependents/#owner-references-in-object-specifications",
    "claims": "https://kubernetes.io/docs/concepts/storage/persistent-volumes/#expanding-persistent-volumes-claims",
    "events": "https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/event-v1/",
    "finalizers": "https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/",
    "selector": "https://kubernetes.io/docs/concepts/workloads/controllers/deployment/#selector",
    "cluster-ip": "https://kubernetes.io/docs/reference/networking/virtual-ips/#ip-address-assignment",
    "versions": API + "#resource-versions",
    "conflicts": API + "#conflicts",
    "watch": API + "#semantics-for-watch",
    "timeout": "https://kubernetes.io/docs/reference/kubernetes-api/common-parameters/common-parameters/#timeoutSeconds",
    "bookmarks": API + "#watch-bookmarks",
    "gone": API + "#410-gone-responses",
}


def doc(key: str) -> pytest.MarkDecorator:
    """Marks a test with the documentation it follows (shown with ``pytest -v``'s ids)."""
    assert key in DOCS
    return pytest.mark.parametrize("follows", [DOCS[key]], ids=[key])


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _plugin(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Plugin",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"image": "example/echo:1.0.0", "version": "1.0.0", **spec},
    }


def _create_plugin(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return _json(
        api.objects.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, body, _preload_content=False
        )
    )


def _refused(call: Any, *args: Any, **kwargs: Any) -> ApiException:
    with pytest.raises(ApiException) as caught:
        call(*args, _preload_content=False, **kwargs)
    return caught.value


def _causes(error: ApiException) -> list[str]:
    assert error.status == 422, error.body
    body = json.loads(error.body or "{}")
    assert body["kind"] == "Status", body
    assert body["reason"] == "Invalid", body
    return [c.get("field", "") for c in body["details"]["causes"]]


def _body(metadata: dict[str, Any], spec: dict[str, Any]) -> Any:
    return {"metadata": metadata, "spec": spec}


def _secret(name: str, **more: Any) -> Any:
    return {"metadata": {"name": name, **more}, "stringData": {"k": "v"}}


# CustomResourceDefinitions: the Plugin CRD as the server applies it.


@doc("schema")
def test_a_plugin_of_the_wrong_types_is_refused_naming_the_fields(api: Api, follows: str):
    error = _refused(
        api.objects.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
        _plugin(_name("types"), image=123, runtime="vm"),
    )  # fmt: skip
    assert set(_causes(error)) >= {"spec.image", "spec.runtime"}


@doc("cel")
def test_a_plugin_breaking_a_cel_rule_is_refused(api: Api, follows: str):
    body = _plugin(_name("cel"))
    del body["spec"]["image"], body["spec"]["version"]
    error = _refused(
        api.objects.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, body
    )
    assert _causes(error) == ["spec"]
    error = _refused(
        api.objects.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
        _plugin(_name("cel"), restart={"backoffSeconds": 10, "maxBackoffSeconds": 5}),
    )  # fmt: skip
    assert _causes(error) == ["spec.restart"]


@doc("pruning")
def test_unknown_fields_are_pruned(api: Api, follows: str):
    body = _plugin(_name("prune"), colour="red", resources={"cpu": "250m", "shade": 3})
    stored = _create_plugin(api, body)
    assert "colour" not in stored["spec"]
    assert stored["spec"]["resources"] == {"cpu": "250m", "pids": 64}  # pids: its default


@doc("defaulting")
def test_defaults_are_filled_in_objects_that_are_there(api: Api, follows: str):
    stored = _create_plugin(api, _plugin(_name("defaults"), restart={"maxRestarts": 2}))
    assert stored["spec"]["restart"] == {
        "maxRestarts": 2, "windowSeconds": 300, "backoffSeconds": 1.0, "maxBackoffSeconds": 60.0,
        "standby": False,
    }  # fmt: skip
    assert "health" not in stored["spec"]  # an object left out is not made to hold defaults


@pytest.mark.parametrize("api", ["kmock"], indirect=True)  # on a cluster: deletes every Plugin
@doc("served")
def test_a_custom_resource_is_not_found_until_its_crd_exists(api: Api, follows: str):
    extensions = k8s_client.ApiextensionsV1Api(api.client)
    extensions.delete_custom_resource_definition(
        yaml.safe_load(CRD.read_text())["metadata"]["name"]
    )
    error = _refused(api.objects.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL)
    assert error.status == 404
    install_crd(api.client)
    api.objects.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)


@doc("status")
def test_status_and_spec_are_written_each_through_its_own_endpoint(api: Api, follows: str):
    name = _name("status")
    created = _create_plugin(api, {**_plugin(name), "status": {"phase": "Running"}})
    assert "status" not in created  # dropped on create
    assert created["metadata"]["generation"] == 1
    after = _json(
        api.objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, NAMESPACE, PLURAL, name,
            {"spec": {"version": "9.9.9"}, "status": {"phase": "Running"}},
            _preload_content=False,
        )
    )  # fmt: skip
    assert after["status"] == {"phase": "Running"}
    assert after["spec"]["version"] == "1.0.0"  # /status ignores spec
    assert after["metadata"]["generation"] == 1
    after = _json(
        api.objects.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name,
            {"spec": {"version": "2.0.0"}, "status": {"phase": "Failed"}},
            _preload_content=False,
        )
    )  # fmt: skip
    assert after["status"] == {"phase": "Running"}  # the object ignores status
    assert after["spec"]["version"] == "2.0.0"
    assert after["metadata"]["generation"] == 2


@pytest.mark.parametrize("api", ["kmock"], indirect=True)  # on a cluster: prunes live Plugins
@doc("upgrade")
def test_a_field_added_by_a_newer_charts_crd_survives_the_upgrade(
    api: Api, follows: str, tmp_path: Path
):
    """The chart's CRD as an older and the current chart version render it (`helm template`),
    applied in turn as `helm upgrade` applies them: the old schema prunes the new field, the
    new one keeps it."""
    helm = test_chart.Helm(tmp_path / "helm")
    old = test_chart.older_chart(tmp_path)
    rendered = []
    for chart in (old, test_chart.CHART):
        result = helm("template", "bh", str(chart), *test_chart.ci("default"))
        assert result.returncode == 0, result.stderr
        documents = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
        rendered.append(test_chart.find(documents, "CustomResourceDefinition", test_chart.CRD_NAME))
    for index, crd in enumerate(rendered):
        (tmp_path / f"crd-{index}.yaml").write_text(yaml.safe_dump(crd))
    install_crd(api.client, tmp_path / "crd-0.yaml")
    name = _name("upgrade")
    wanted = [{"name": "kv-store", "version": "^1"}]
    created = _create_plugin(api, _plugin(name, dependsOn=wanted))
    assert "dependsOn" not in created["spec"]  # pruned by the old schema
    install_crd(api.client, tmp_path / "crd-1.yaml")
    api.objects.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": {"dependsOn": wanted}}
    )
    assert api.plugin(name)["spec"]["dependsOn"] == wanted  # type: ignore[index]


# Names and labels.


@doc("names")
def test_names_must_be_dns_subdomains(api: Api, follows: str):
    for bad in ("Bad_Name", "a" * 254, "-lead"):
        error = _refused(api.core.create_namespaced_secret, NAMESPACE, _secret(bad))
        assert _causes(error) == ["metadata.name"], bad
    error = _refused(
        api.objects.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
        _plugin("Bad_Name"),
    )  # fmt: skip
    assert "metadata.name" in _causes(error)


@doc("service-names")
def test_service_names_are_dns_1035_labels_of_at_most_63(api: Api, follows: str):
    ports = {"ports": [{"port": 80}]}
    for bad in ("a" * 64, "1abc", "a.b"):
        error = _refused(
            api.core.create_namespaced_service,
            NAMESPACE,
            {"metadata": {"name": bad}, "spec": ports},
        )
        assert _causes(error) == ["metadata.name"], bad
    name = "a" + uuid.uuid4().hex[:6] + "b" * 56
    api.core.create_namespaced_service(NAMESPACE, _body({"name": name}, ports))


@doc("labels")
def test_label_values_are_at_most_63_characters(api: Api, follows: str):
    error = _refused(
        api.core.create_namespaced_secret, NAMESPACE, _secret(_name("l"), labels={"a": "v" * 64})
    )
    assert _causes(error) == ["metadata.labels"]


@doc("namespaces")
def test_objects_are_created_only_in_namespaces_that_exist(api: Api, follows: str):
    error = _refused(api.core.create_namespaced_secret, _name("nowhere"), _secret("s"))
    assert error.status == 404
    namespace = _json(api.core.read_namespace(NAMESPACE, _preload_content=False))
    assert namespace["metadata"]["labels"]["kubernetes.io/metadata.name"] == NAMESPACE


# Built-in kinds' rules.


def _deployment(name: str, selector: dict[str, str], labels: dict[str, str]) -> Any:
    return {
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "example/echo:1.0.0"}]},
            },
        },
    }


@doc("selector")
def test_a_deployments_selector_matches_its_template_and_never_changes(api: Api, follows: str):
    name = _name("sel")
    error = _refused(
        api.apps.create_namespaced_deployment, NAMESPACE, _deployment(name, {"a": "1"}, {"a": "2"})
    )
    assert _causes(error) == ["spec.template.metadata.labels"]
    api.apps.create_namespaced_deployment(NAMESPACE, _deployment(name, {"a": "1"}, {"a": "1"}))
    change = {"spec": {"selector": {"matchLabels": {"a": "1", "b": "2"}}}}
    error = _refused(api.apps.patch_namespaced_deployment, name, NAMESPACE, change)
    assert "spec.selector" in _causes(error)
    api.apps.delete_namespaced_deployment(name, NAMESPACE)


@doc("cluster-ip")
def test_a_service_gets_a_cluster_ip_that_never_changes(api: Api, follows: str):
    name = _name("ip")
    body = _body({"name": name}, {"selector": {"a": "1"}, "ports": [{"port": 80}]})
    created = _json(api.core.create_namespaced_service(NAMESPACE, body, _preload_content=False))
    address = created["spec"]["clusterIP"]
    assert address
    assert address != "None"
    assert created["spec"]["ports"][0]["targetPort"] == 80
    moved = {"spec": {"selector": {"a": "2"}}}
    after = _json(api.core.patch_namespaced_service(name, NAMESPACE, moved, _preload_content=False))
    assert after["spec"]["clusterIP"] == address
    replaced: Any = copy.deepcopy(after)
    del replaced["spec"]["clusterIP"], replaced["spec"]["clusterIPs"]
    after = _json(
        api.core.replace_namespaced_service(name, NAMESPACE, replaced, _preload_content=False)
    )
    assert after["spec"]["clusterIP"] == address  # left out of an update: carried over
    other = "10.96.0.3" if address != "10.96.0.3" else "10.96.0.4"
    error = _refused(
        api.core.patch_namespaced_service, name, NAMESPACE, {"spec": {"clusterIP": other}}
    )
    assert _causes(error) == ["spec.clusterIP"]
    headless = _body({"name": _name("hl")}, {"clusterIP": "None", "ports": [{"port": 80}]})
    created = _json(api.core.create_namespaced_service(NAMESPACE, headless, _preload_content=False))
    assert created["spec"]["clusterIP"] == "None"


# Versions, concurrency, deletion.


@doc("versions")
def test_a_write_that_changes_nothing_makes_no_new_version(api: Api, follows: str):
    name = _name("noop")
    created = _json(
        api.core.create_namespaced_secret(NAMESPACE, _secret(name), _preload_content=False)
    )
    same = {"metadata": {"labels": None}}
    after = _json(api.core.patch_namespaced_secret(name, NAMESPACE, same, _preload_content=False))
    assert after["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


@doc("conflicts")
def test_a_write_from_a_stale_read_is_a_conflict(api: Api, follows: str):
    name = _name("stale")
    created = _json(
        api.core.create_namespaced_secret(NAMESPACE, _secret(name), _preload_content=False)
    )
    api.core.patch_namespaced_secret(name, NAMESPACE, {"metadata": {"labels": {"a": "1"}}})
    stale = {
        "metadata": {
            "labels": {"a": "2"},
            "resourceVersion": created["metadata"]["resourceVersion"],
        }
    }
    error = _refused(api.core.patch_namespaced_secret, name, NAMESPACE, stale)
    assert error.status == 409


@doc("gc")
def test_dependents_are_deleted_in_the_background_once_their_owner_is_gone(api: Api, follows: str):
    owner = _create_plugin(api, _plugin(_name("owner")))
    ref = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Plugin", "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"], "controller": True,
    }  # fmt: skip
    child = _name("child")
    api.core.create_namespaced_secret(NAMESPACE, _secret(child, ownerReferences=[ref]))
    api.objects.delete_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, owner["metadata"]["name"]
    )
    wait_for(lambda: child not in _secret_names(api), timeout=30 * TIME_SCALE)


@doc("orphan")
def test_an_owner_deleted_with_orphan_leaves_its_dependents(api: Api, follows: str):
    owner = _json(
        api.core.create_namespaced_secret(NAMESPACE, _secret(_name("o")), _preload_content=False)
    )
    ref = {"apiVersion": "v1", "kind": "Secret", "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"]}  # fmt: skip
    child = _name("kept")
    api.core.create_namespaced_secret(NAMESPACE, _secret(child, ownerReferences=[ref]))
    api.core.delete_namespaced_secret(
        owner["metadata"]["name"],
        NAMESPACE,
        body=k8s_client.V1DeleteOptions(propagation_policy="Orphan"),
    )
    wait_for(
        lambda: (
            not _json(api.core.read_namespaced_secret(child, NAMESPACE, _preload_content=False))[
                "metadata"
            ].get("ownerReferences")
        ),
        timeout=30 * TIME_SCALE,
    )


def _secret_names(api: Api) -> set[str]:
    listing = _json(api.core.list_namespaced_secret(NAMESPACE, _preload_content=False))
    return {i["metadata"]["name"] for i in listing["items"]}


@doc("finalizers")
def test_an_object_with_finalizers_is_only_marked_until_they_are_removed(api: Api, follows: str):
    name = _name("fin")
    api.core.create_namespaced_secret(NAMESPACE, _secret(name, finalizers=["blackhole.dev/test"]))
    api.core.delete_namespaced_secret(name, NAMESPACE)
    marked = _json(api.core.read_namespaced_secret(name, NAMESPACE, _preload_content=False))
    assert marked["metadata"]["deletionTimestamp"]
    api.core.patch_namespaced_secret(name, NAMESPACE, {"metadata": {"finalizers": None}})
    assert name not in _secret_names(api)


# Watches.


def _events(api: Api, **kwargs: Any) -> list[dict[str, Any]]:
    """The events of a watch of Secrets, read as sent until the server ends it."""
    response: Any = api.core.list_namespaced_secret(
        NAMESPACE, watch=True, _preload_content=False, **kwargs
    )
    try:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]
    finally:
        response.release_conn()


@doc("watch")
def test_a_watch_from_a_version_sends_only_what_came_after(api: Api, follows: str):
    before = _name("before")
    api.core.create_namespaced_secret(NAMESPACE, _secret(before))
    listing = _json(api.core.list_namespaced_secret(NAMESPACE, _preload_content=False))
    version = listing["metadata"]["resourceVersion"]
    after = _name("after")
    api.core.create_namespaced_secret(NAMESPACE, _secret(after))
    events = _events(api, resource_version=version, timeout_seconds=2)
    names = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
    assert names == [("ADDED", after)]


@doc("timeout")
def test_a_watch_ends_after_its_timeout_seconds(api: Api, follows: str):
    listing = _json(api.core.list_namespaced_secret(NAMESPACE, _preload_content=False))
    began = time.monotonic()
    assert (
        _events(api, resource_version=listing["metadata"]["resourceVersion"], timeout_seconds=2)
        == []
    )
    took = time.monotonic() - began
    assert 1.5 <= took <= 2 + 10 * TIME_SCALE, took


@doc("bookmarks")
def test_a_watch_that_allows_bookmarks_gets_them_with_the_current_version(api: Api, follows: str):
    listing = _json(api.core.list_namespaced_secret(NAMESPACE, _preload_content=False))
    server = api.cluster.server if api.cluster is not None else None
    seconds = int(server.bookmark_seconds * 3) + 1 if server is not None else 90  # real: ~1/min
    events = _events(
        api, resource_version=listing["metadata"]["resourceVersion"], timeout_seconds=seconds,
        allow_watch_bookmarks=True,
    )  # fmt: skip
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks
    assert int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) >= int(
        listing["metadata"]["resourceVersion"]
    )


@pytest.mark.parametrize("api", ["kmock"], indirect=True)
@doc("gone")
def test_a_watch_from_a_compacted_version_is_gone(api: Api, follows: str):
    assert api.cluster is not None  # a real server compacts on its own schedule
    listing = _json(api.core.list_namespaced_secret(NAMESPACE, _preload_content=False))
    api.core.create_namespaced_secret(NAMESPACE, _secret(_name("g")))
    api.cluster.expire_watches()
    events = _events(
        api, resource_version=listing["metadata"]["resourceVersion"], timeout_seconds=5
    )
    assert [e["object"].get("code") for e in events if e["type"] == "ERROR"] == [410]


@doc("owners")
def test_an_owner_in_another_namespace_counts_as_absent(api: Api, follows: str):
    from .test_kubernetes import SYSTEM

    owner = _json(
        api.core.create_namespaced_secret(SYSTEM, _secret(_name("far")), _preload_content=False)
    )
    ref = {"apiVersion": "v1", "kind": "Secret", "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"]}  # fmt: skip
    child = _name("near")
    api.core.create_namespaced_secret(NAMESPACE, _secret(child, ownerReferences=[ref]))
    wait_for(lambda: child not in _secret_names(api), timeout=60 * TIME_SCALE)
    api.core.delete_namespaced_secret(owner["metadata"]["name"], SYSTEM)


@doc("owners")
def test_owner_references_name_their_owner_and_one_controller(api: Api, follows: str):
    ref = {"apiVersion": "v1", "kind": "Secret", "name": "o", "uid": ""}
    error = _refused(
        api.core.create_namespaced_secret, NAMESPACE, _secret(_name("r"), ownerReferences=[ref])
    )
    assert _causes(error) == ["metadata.ownerReferences.uid"]
    refs = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "name": n,
            "uid": str(uuid.uuid4()),
            "controller": True,
        }
        for n in ("a", "b")
    ]
    error = _refused(
        api.core.create_namespaced_secret, NAMESPACE, _secret(_name("r"), ownerReferences=refs)
    )
    assert _causes(error) == ["metadata.ownerReferences"]


@doc("claims")
def test_a_claims_spec_is_immutable_but_for_a_larger_request(api: Api, follows: str):
    name = _name("pvc")
    body = _body(
        {"name": name},
        {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    )
    api.core.create_namespaced_persistent_volume_claim(NAMESPACE, body)
    change = {"spec": {"accessModes": ["ReadWriteMany"]}}
    error = _refused(api.core.patch_namespaced_persistent_volume_claim, name, NAMESPACE, change)
    assert _causes(error) == ["spec"]
    smaller = {"spec": {"resources": {"requests": {"storage": "512Mi"}}}}
    error = _refused(api.core.patch_namespaced_persistent_volume_claim, name, NAMESPACE, smaller)
    assert _causes(error) == ["spec.resources.requests.storage"]
    api.core.delete_namespaced_persistent_volume_claim(name, NAMESPACE)


@doc("events")
def test_an_events_object_is_in_its_own_namespace(api: Api, follows: str):
    event: Any = {
        "metadata": {"name": _name("ev")},
        "involvedObject": {"kind": "Secret", "name": "s", "namespace": "elsewhere"},
        "reason": "Test",
        "message": "m",
        "type": "Normal",
    }
    error = _refused(api.core.create_namespaced_event, NAMESPACE, event)
    assert _causes(error) == ["involvedObject.namespace"]
