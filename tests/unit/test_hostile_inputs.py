"""Hostile spec files, applied specs, manifests, policies and indexes: each ends in the
controller's own error, naming the file, line and field, and reads nothing past its limits."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml
from aiohttp import ClientSession, UnixConnector

from controller.admin import server
from controller.errors import BundleRefusedError, RegistryError, SpecError
from controller.gateway import auth
from controller.registry import manifest, policy, remote
from controller.runtimes import memory
from controller.sources.directory import DirectorySource
from controller.sources.store import Store
from controller.spec import loader, safe_yaml
from tests import fuzzing

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata:
  name: {name}
spec:
  image: blackhole/example-echo:0.1.0
  version: 0.1.0
"""

# Each of these made the loader raise something other than SpecError, or hang.
HOSTILE = {
    "bad-date": (
        "  config: {when: !!timestamp 2024-13-01}\n",
        8,
        "spec.config.when",
        "!!timestamp",
    ),
    "int-tag": ("  config: {n: !!int abc}\n", 8, "spec.config.n", "not a valid int"),
    "nul": ('  config: {s: "a\\0b"}\n', 8, "spec.config.s", "U+0000"),
    "control": ('  config: {s: "\\x1b[31m"}\n', 8, "spec.config.s", "U+001B"),
    "raw-control": ("  config: {s: a\x07b}\n", 8, "", "control characters are not allowed"),
    "unhashable": ("  config: {[1, 2]: x}\n", 8, "spec.config", "a key must be a string"),
    "escape": ('  config: {s: "\\U99999999"}\n', 8, "", "invalid Unicode character escape"),
    "deep": ("  config: " + "[" * 500 + "]" * 500 + "\n", 8, "spec.config", "deeper than 64"),
    "alias": ("  config: {a: &x [1], b: *x}\n", 8, "spec.config.b", "aliases (*x)"),
    "binary": ("  config: {b: !!binary aGk=}\n", 8, "spec.config.b", "!!binary"),
    "python": ("  config: {p: !!python/name:os.system x}\n", 8, "spec.config.p", "!!python"),
    "duplicate": ("  version: 0.2.0\n", 8, "spec", 'duplicate key "version" (first on line 7)'),
}


def spec(name: str, tail: str = "") -> str:
    return SPEC.format(name=name) + tail


@pytest.fixture(params=["libyaml", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both of PyYAML's parsers: libyaml when PyYAML has it, its own Python one otherwise."""
    if request.param == "python":
        monkeypatch.setattr(safe_yaml, "_Events", safe_yaml._PythonEvents)
    else:
        assert yaml.__with_libyaml__, "the tests' PyYAML is built with libyaml"
    return str(request.param)


# The Python parser's words for two of them.
PYTHON_MESSAGES = {
    "escape": "int too large",
    "raw-control": "special characters are not allowed",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_each_hostile_spec_is_a_spec_error_with_its_line_and_field(case: str, parser: str) -> None:
    tail, line, field, message = HOSTILE[case]
    if parser == "python":
        message = PYTHON_MESSAGES.get(case, message)
    with pytest.raises(SpecError) as caught:
        loader.load_text(spec("bad", tail), "bad.yaml")
    (issue,) = caught.value.issues
    assert issue.source == "bad.yaml"
    assert issue.line == line
    assert issue.path == field or (case == "deep" and issue.path.startswith("spec.config[0][0]"))
    assert message in issue.message


def test_a_plain_date_is_a_string_as_in_kubernetes() -> None:
    (item,) = loader.load_text(spec("dated", "  config: {since: 2024-01-01, bad: 2024-13-01}\n"))
    assert item.plugin.spec.config == {"since": "2024-01-01", "bad": "2024-13-01"}
    json.dumps(item.plugin.to_document())  # what is stored must be JSON


def test_an_alias_bomb_is_refused_without_expanding_it() -> None:
    text = fuzzing.alias_bomb(7)
    assert len(text.encode()) < 1024
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match=r"aliases \(\*l0\) are not accepted") as caught:
            loader.load_text(text, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.issues[0].line == 9
    assert caught.value.issues[0].path == "spec.config.l1[0]"
    assert peak < 1 << 20, f"{peak} bytes allocated: something was expanded"


def test_a_spec_file_over_one_mebibyte_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as handle:
        handle.write(spec("huge", "  config:\n"))
        for i in range(50 << 20 >> 5):
            handle.write(f"    k{i:08}: {'x' * 16}\n")
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match=r"over the limit of 1048576 bytes \(1 MiB\)"):
            loader.load_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated for a 50 MB file"


def test_one_bad_document_does_not_hide_the_others_problems() -> None:
    text = spec("one", "  config: {n: !!int abc}\n") + "---\n" + spec("two", "  replicas: 0\n")
    with pytest.raises(SpecError) as caught:
        loader.load_text(text)
    assert [(i.document, i.path) for i in caught.value.issues] == [
        (1, "spec.config.n"),
        (2, "spec.replicas"),
    ]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_bad_file_beside_good_ones_leaves_the_good_ones_declared(
    tmp_path: Path, case: str
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "good.yaml").write_text(spec("good"))
    (specs / "bad.yaml").write_bytes(spec("bad", HOSTILE[case][0]).encode())
    source = DirectorySource(specs, Store(tmp_path / "state.db"), lambda key: None)
    assert source.rescan() == {"good"}
    assert source.declared_keys() == ["good"]
    assert list(source.errors) == [str(specs / "bad.yaml")]


async def test_an_unreadable_spec_directory_keeps_the_last_specs(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "good.yaml").write_text(spec("good"))
    source = DirectorySource(specs, Store(tmp_path / "state.db"), lambda key: None)
    source.rescan()
    (specs / "good.yaml").unlink()
    specs.rmdir()
    specs.write_text("not a directory any more")
    assert source.rescan() == set()
    assert source.declared_keys() == ["good"]
    assert "cannot list" in str(source.errors[str(specs)])


@pytest.fixture
async def admin(tmp_path: Path):
    specs = tmp_path / "specs"
    specs.mkdir()
    source = DirectorySource(specs, Store(tmp_path / "state.db"), lambda key: None)
    source.rescan()
    api = server.AdminServer(source, memory.MemoryRuntime(), tmp_path / "admin.sock")
    await api.start()
    async with ClientSession(connector=UnixConnector(path=str(tmp_path / "admin.sock"))) as http:
        yield http
    await api.stop()


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (b"\xff\xfe not UTF-8", 422, "not UTF-8 text"),
        (spec("x", "  config: {n: !!int abc}\n").encode(), 422, "spec.config.n"),
        (fuzzing.alias_bomb(7).encode(), 422, "aliases"),
        (spec("x", "  config: {a: " + "x" * (2 << 20) + "}\n").encode(), 413, "1 MiB"),
    ],
    ids=["not-utf8", "int-tag", "alias-bomb", "too-large"],
)
async def test_apply_answers_every_bad_body_with_json(admin, body, status, expected) -> None:
    async with admin.post("http://localhost/v1/plugins", data=io.BytesIO(body)) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        assert expected in json.dumps(await response.json())


async def test_an_unknown_admin_route_is_answered_with_json(admin) -> None:
    async with admin.get("http://localhost/v2/nothing") as response:
        assert response.status == 404
        assert (await response.json())["error"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_validate_prints_the_problem_never_a_traceback(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(spec("bad", HOSTILE[case][0]).encode())
    done = subprocess.run(
        [str(Path(sys.executable).parent / "bhctl"), "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{path}:{HOSTILE[case][1]}" in done.stderr


# Manifests, policies, indexes.

MANIFEST = fuzzing.VALID_MANIFEST


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MANIFEST + "name: other\n", 'plugin.yaml:13 (document 1): duplicate key "name"'),
        (MANIFEST + "extra: &a [1]\nmore: *a\n", "plugin.yaml:14 (document 1): more: aliases"),
        (MANIFEST.replace("stateVersion: 2", "stateVersion: !!int x"), "plugin.yaml:10"),
        (MANIFEST.replace("1.2.0\n", "1.2\n", 1), "plugin.yaml:2: version:"),
        (MANIFEST + "---\nname: x\n", "a manifest is one YAML document"),
        ("x: " + "y" * (1 << 20), "over the limit of 1048576 bytes"),
    ],
    ids=["duplicate", "alias", "int-tag", "field", "two-documents", "too-large"],
)
def test_a_bad_manifest_is_refused_naming_its_line(text: str, expected: str) -> None:
    with pytest.raises(BundleRefusedError) as caught:
        manifest.parse(text.encode(), "plugin.yaml")
    assert caught.value.reason == "InvalidBundle"
    assert expected in str(caught.value)


def test_a_manifest_that_parses_is_a_manifest() -> None:
    assert manifest.parse(MANIFEST.encode()).ref == "kv-store@1.2.0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fuzzing.VALID_POLICY + "allowUnsigned: true\n", 'duplicate key "allowUnsigned"'),
        ("permissions: &p {callPlugins: false}\nmaxResources: *p\n", "aliases (*p)"),
        ("allowUnsigned: !!bool maybe\n", "policy.yaml:1 (document 1): allowUnsigned"),
        ("maxResources: {pids: 0}\n", "policy.yaml:1: maxResources.pids"),
    ],
    ids=["duplicate", "alias", "bool-tag", "field"],
)
def test_a_bad_policy_file_is_a_registry_error(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError) as caught:
        policy.Policy.load(path)
    assert expected in str(caught.value)


def test_the_example_policy_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(fuzzing.VALID_POLICY)
    assert policy.Policy.load(path).permissions.egress == ["*.example.com:443"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"[" * 100_000, "not JSON"),
        (b"\xff", "not JSON"),
        (b"{" + b" " * (17 << 20) + b"}", "over the limit of 16777216 bytes"),
        (
            json.dumps(
                {
                    "apiVersion": "blackhole.dev/v1alpha1",
                    "kind": "PluginIndex",
                    "plugins": [
                        {"name": "a", "version": "1.0.0", "url": "http://[::1", "sha256": "a" * 64}
                    ],
                }
            ).encode(),
            "a@1.0.0: url",
        ),
    ],
    ids=["deep", "binary", "too-large", "bad-url"],
)
def test_a_bad_marketplace_index_is_a_registry_error(
    tmp_path: Path, data: bytes, expected: str
) -> None:
    path = tmp_path / "index.json"
    path.write_bytes(data)
    with pytest.raises(RegistryError, match=expected.replace("[", r"\[")):
        asyncio.run(remote.fetch_index(str(path), tmp_path / "cache"))


def test_safe_yaml_reads_what_json_can_say() -> None:
    (document,) = safe_yaml.load_all(
        "a: [1, 2.5, true, null, '2024-01-01', 0x10, -.inf]\nb: {c: d}\n", "x"
    )
    assert document.value == {
        "a": [1, 2.5, True, None, "2024-01-01", 16, float("-inf")],
        "b": {"c": "d"},
    }
    assert yaml.safe_load(yaml.safe_dump(document.value)) == document.value


async def test_an_applied_spec_with_characters_beyond_the_bmp_stays_declared(
    tmp_path: Path,
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    source = DirectorySource(specs, Store(tmp_path / "state.db"), lambda key: None)
    await source.apply(spec("emoji", '  config: {greeting: "héllo 😀"}\n').encode())
    source.rescan()  # what was stored is read back by the same loader
    assert source.errors == {}
    desired = source.get("emoji")
    assert desired is not None
    assert desired.plugin.spec.config == {"greeting": "héllo 😀"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tokens: [{name: a, token: !!int abc, plugins: ['*']}]\n", "tokens[0].token"),
        ("x: &x [1]\ntokens: *x\n", "aliases (*x)"),
        ("tokens: []\ntokens: []\n", 'duplicate key "tokens"'),
    ],
    ids=["int-tag", "alias", "duplicate"],
)
def test_a_bad_gateway_tokens_file_is_a_tokens_file_error(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(auth.TokensFileError) as caught:
        auth.Tokens.load(path)
    assert expected in str(caught.value)
    assert f"{path}:" in str(caught.value)


def test_a_document_of_more_than_the_node_limit_is_refused_where_it_passes_it() -> None:
    text = spec("many", "  config:\n    l: [" + ",".join(["0"] * safe_yaml.MAX_NODES) + "]\n")
    with pytest.raises(SpecError, match="more than 100000 values") as caught:
        loader.load_text(text, "many.yaml")
    (issue,) = caught.value.issues
    assert (issue.line, issue.path.startswith("spec.config.l[")) == (9, True)


def test_at_most_fifty_problems_are_listed_then_how_many_more() -> None:
    env = "".join(f"    '{i}bad': v\n" for i in range(500))
    with pytest.raises(SpecError) as caught:
        loader.load_text(spec("noisy", "  env:\n" + env), "noisy.yaml")
    issues = caught.value.issues
    assert len(issues) == safe_yaml.MAX_ISSUES + 1
    assert issues[-1].message == "and 450 more problems"
    assert [i.line for i in issues[:3]] == [9, 10, 11]


def test_an_applied_spec_stored_with_json_escapes_still_loads(tmp_path: Path) -> None:
    """Rows written before applied specs were stored unescaped hold surrogate pairs."""
    specs = tmp_path / "specs"
    specs.mkdir()
    store = Store(tmp_path / "state.db")
    document = yaml.safe_load(spec("legacy", '  config: {greeting: "😀"}\n'))
    store.put_applied("legacy", json.dumps(document))
    assert "\\ud83d" in store.applied()["legacy"]
    source = DirectorySource(specs, store, lambda key: None)
    assert source.rescan() == {"legacy"}
    assert source.errors == {}
    desired = source.get("legacy")
    assert desired is not None
    assert desired.plugin.spec.config == {"greeting": "😀"}
