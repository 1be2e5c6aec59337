"""The spec models and the YAML loader: defaults, and errors that name field, value and fix."""

from pathlib import Path

import pytest
import yaml

from controller.errors import SpecError
from controller.spec import loader, models
from controller.spec.semver import Version

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "plugins").glob("*.yaml"))

MINIMAL = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: echo
spec:
  image: blackhole/example-echo:0.1.0
  version: 0.1.0
"""


def issues_of(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        loader.load_text(text, "plugin.yaml")
    return [str(issue) for issue in caught.value.issues]


def with_spec(extra: str) -> str:
    return MINIMAL + "".join(f"  {line}\n" for line in extra.splitlines())


def test_examples_are_valid():
    assert EXAMPLES, "no example specs found"
    loaded = loader.load_paths(EXAMPLES)
    assert {item.plugin.name for item in loaded} >= {"kv-store", "analytics", "echo"}


def test_defaults_are_filled():
    (item,) = loader.load_text(MINIMAL)
    spec = item.plugin.spec
    assert spec.resources.cpu.as_millis() == 500
    assert spec.resources.memory.as_int() == 128 * 2**20
    assert spec.resources.pids == 64
    assert spec.permissions.network is models.NetworkMode.NONE
    assert spec.health.startup_deadline_seconds == 30
    assert spec.restart.max_restarts == 5
    assert spec.hot_swap.strategy == "BlueGreen"
    assert spec.hot_swap.max_pause_milliseconds == 200
    assert spec.hot_swap.state_transfer == "PreCopy"
    assert spec.state is None
    assert spec.runtime is None


def test_quantities_and_ranges_are_parsed():
    (item,) = loader.load_text(
        with_spec(
            'resources: {cpu: "1.5", memory: 1Gi, pids: 10}\n'
            'dependsOn: [{name: auth, version: ">=1.0,<2"}]'
        )
    )
    spec = item.plugin.spec
    assert spec.resources.cpu.as_millis() == 1500
    assert spec.resources.memory.as_int() == 2**30
    (dep,) = spec.depends_on
    assert dep.version.matches(Version.parse("1.4.0"))
    assert not dep.version.matches(Version.parse("2.0.0"))


def test_documents_round_trip():
    for item in loader.load_paths(EXAMPLES):
        text = yaml.safe_dump(item.plugin.to_document())
        (again,) = loader.load_text(text)
        assert again.plugin == item.plugin


def test_several_documents_in_one_file():
    text = MINIMAL + "---\n" + MINIMAL.replace("name: echo", "name: echo-two") + "---\n"
    assert [i.plugin.name for i in loader.load_text(text)] == ["echo", "echo-two"]
    assert [i.document for i in loader.load_text(text)] == [1, 2]


# Each bad input: the error names the field path, the value and the allowed form.
@pytest.mark.parametrize(
    ("extra", "path", "value", "allowed"),
    [
        ("colour: red", "spec.colour", '"red"', "allowed here: image, version"),
        ("resources: {memory: 12XB}", "spec.resources.memory", '"12XB"', '"128Mi"'),
        ("resources: {cpu: -1}", "spec.resources.cpu", "-1", "positive"),
        ("resources: {pids: -1}", "spec.resources.pids", "-1", "greater than or equal to 1"),
        (
            'dependsOn: [{name: auth, version: ">>1"}]',
            "spec.dependsOn[0].version",
            '">>1"',
            '">=1.0,<2"',
        ),
        (
            "volumes: [{name: d, mountPath: /d, hostPath: /srv/../etc}]",
            "spec.volumes[0].hostPath",
            '"/srv/../etc"',
            'must not contain ".."',
        ),
        (
            "permissions: {network: public}",
            "spec.permissions.network",
            '"public"',
            "'none', 'egress' or 'private'",
        ),
        ("health: {periodSeconds: 0}", "spec.health.periodSeconds", "0", ">= 1"),
        ("env: {BLACKHOLE_TOKEN: x}", "spec.env", "", "reserved"),
    ],
)
def test_bad_spec_fields_are_named(extra, path, value, allowed):
    (issue,) = issues_of(with_spec(extra))
    assert f"{path}: " in issue
    if value:
        assert f"(got {value})" in issue
    assert allowed.replace(">= 1", "greater than or equal to 1") in issue
    assert issue.startswith("plugin.yaml:")


def test_invalid_name_is_named_with_the_allowed_form():
    (issue,) = issues_of(MINIMAL.replace("name: echo", "name: Echo_Plugin"))
    assert "plugin.yaml:4 (document 1): metadata.name: " in issue
    assert '(got "Echo_Plugin")' in issue
    assert "DNS-1123 label" in issue


def test_version_must_be_semver_and_a_string():
    (issue,) = issues_of(MINIMAL.replace("version: 0.1.0", "version: 1.0"))
    assert "spec.version: 1.0 is a float; write it as a quoted string" in issue
    (issue,) = issues_of(MINIMAL.replace("version: 0.1.0", "version: v1"))
    assert "MAJOR.MINOR.PATCH" in issue


def test_all_issues_are_reported_with_lines():
    issues = issues_of(with_spec("resources: {cpu: 12XB, memory: 1Gi}\ncolour: red"))
    assert len(issues) == 2
    assert issues[0].startswith("plugin.yaml:8 ")
    assert issues[1].startswith("plugin.yaml:9 ")


def test_cross_field_rules():
    (issue,) = issues_of(with_spec('permissions: {egress: ["api.example.com:443"]}'))
    assert "only allowed with network: egress" in issue
    (issue,) = issues_of(with_spec("permissions: {network: private}"))
    assert "needs at least one plugin in peers" in issue
    (issue,) = issues_of(with_spec("restart: {backoffSeconds: 10, maxBackoffSeconds: 5}"))
    assert "maxBackoffSeconds (5.0) must not be below backoffSeconds (10.0)" in issue
    (issue,) = issues_of(with_spec("volumes: [{name: a, mountPath: /d}, {name: a, mountPath: /e}]"))
    assert "name a used more than once" in issue


def test_reserved_labels_are_refused():
    text = MINIMAL.replace("name: echo", "name: echo\n  labels: {blackhole.dev/color: blue}")
    (issue,) = issues_of(text)
    assert "metadata.labels" in issue
    assert "reserved" in issue


def test_snake_case_is_not_a_spelling_of_camel_case():
    (issue,) = issues_of(with_spec("hot_swap: {strategy: Recreate}"))
    assert "spec.hot_swap: unknown field" in issue


def test_yaml_problems_are_reported():
    (issue,) = issues_of(MINIMAL.replace("metadata:\n  name: echo", "metadata: {name: a, name: b}"))
    assert 'duplicate key "name"' in issue
    (issue,) = issues_of("apiVersion: [unclosed\n")
    assert "invalid YAML" in issue
    (issue,) = issues_of("- just\n- a list\n")
    assert "must be a mapping" in issue
    (issue,) = issues_of("apiVersion: apps/v1\nkind: Deployment\n")
    assert "not a Plugin" in issue


def test_names_are_unique_across_files(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(MINIMAL)
    with pytest.raises(SpecError, match="plugin declared twice"):
        loader.load_paths([tmp_path])
