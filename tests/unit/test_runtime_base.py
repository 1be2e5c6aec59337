"""What every backend shares (controller/runtimes/base.py), without an engine.

Host-path rules, the plugin's environment and user, the started instance,
Unix socket addresses, names and hashes.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from controller import unix
from controller.runtimes import base, container, process
from controller.spec import models


def spec_with(host_path: str) -> models.PluginSpec:
    return models.PluginSpec.model_validate(
        {
            "image": "blackhole/x:1",
            "version": "1.0.0",
            "volumes": [{"name": "v", "mountPath": "/v", "hostPath": host_path}],
        }
    )


def host_path_issues(path: str, root: Path | None) -> list[tuple[str, str]]:
    return [(i.path, i.message) for i in base.check_host_paths(spec_with(path), root)]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A host-path root with a directory, a file, links out and a link to it from outside."""
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "file").write_text("x")
    (root / "escape").symlink_to("/etc")
    (root / "inner").symlink_to(root / "ok")
    (tmp_path / "into-root").symlink_to(root / "ok")
    (tmp_path / "root-link").symlink_to(root)
    return tmp_path


def test_host_paths_under_the_root_that_are_directories_are_allowed(tree: Path) -> None:
    root = tree / "root"
    assert host_path_issues(f"{root}/ok", root) == []
    assert host_path_issues(f"{root}/inner", root) == [], "a link that stays inside the root"
    assert host_path_issues(f"{root}", root) == [], "the root itself"
    assert host_path_issues(f"{root}/ok", tree / "root-link") == [], "a root given as a link"
    assert host_path_issues(f"{tree}/root-link/ok", tree / "root-link") == []


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("/etc", "outside the allowed host-path root"),
        ("{root}/escape", "resolves through a symlink to /etc"),
        ("{root}/escape/ssl", "resolves through a symlink to /etc/ssl"),
        ("{root}/missing", "does not exist or is not a directory"),
        ("{root}/file", "does not exist or is not a directory"),
        # Where the process runtime used to differ from the container one: it
        # looked only at where a path leads, so a link outside the root into it
        # was allowed there. Both refuse it now: the path must be written under the root.
        ("{tree}/into-root", "outside the allowed host-path root"),
    ],
)
def test_host_paths_are_refused_naming_the_field(tree: Path, written: str, why: str) -> None:
    path = written.format(root=tree / "root", tree=tree)
    [(field, message)] = host_path_issues(path, tree / "root")
    assert field == "spec.volumes[0].hostPath"
    assert why in message


def test_no_host_path_root_refuses_every_host_path(tree: Path) -> None:
    [(_, message)] = host_path_issues(f"{tree}/root/ok", None)
    assert "--host-path-root" in message


def test_the_container_and_process_backends_apply_the_same_host_path_rules(tree: Path) -> None:
    root = tree / "root"
    docker = container.ContainerRuntime(
        container.Settings(engine=container.Engine.DOCKER, data_dir=tree, host_path_root=root)
    )
    processes = process.ProcessRuntime(
        process.Settings(data_dir=tree, plugin_root=tree, host_path_root=root)
    )
    for path in (f"{root}/ok", f"{tree}/into-root", f"{root}/escape", f"{root}/missing", "/etc"):
        desired = base.InstanceSpec(
            "p", models.Color.BLUE, spec_with(path), {base.LABEL_SPEC_HASH: "h"}
        )
        found = [
            [(i.path, i.message) for i in runtime.validate(desired) if "hostPath" in i.path]
            for runtime in (docker, processes)
        ]
        assert found[0] == found[1] == host_path_issues(path, root), path


def test_every_backend_gives_a_plugin_the_same_environment() -> None:
    spec = spec_with("/srv").model_copy(update={"config": {"b": 1, "a": [2]}})
    desired = base.InstanceSpec("kv", models.Color.GREEN, spec, {}, namespace="team")
    assert base.plugin_environment(desired) == {
        "BLACKHOLE_SOCKET": "/run/blackhole/plugin.sock",
        "BLACKHOLE_PLUGIN": "kv",
        "BLACKHOLE_VERSION": "1.0.0",
        "BLACKHOLE_COLOR": "green",
        "BLACKHOLE_CONFIG": json.dumps({"a": [2], "b": 1}),
        "BLACKHOLE_GATEWAY_SOCKET": "/run/blackhole/gateway.sock",
    }


def test_plugins_run_as_an_unprivileged_numeric_user() -> None:
    assert base.user_ids(base.DEFAULT_USER) == (65532, 65532)
    assert base.user_ids("1000") == (1000, 1000)
    assert base.user_ids("1000:2000") == (1000, 2000)
    for root in ("0", "0:0", "0:1000"):
        with pytest.raises(ValueError, match="never run as root"):
            base.user_ids(root)
    for name in ("root", "nobody", "1000:staff"):
        with pytest.raises(ValueError, match="is not uid:gid"):
            base.user_ids(name)


def test_a_started_instance_is_running_with_the_labels_it_was_given() -> None:
    labels = {base.LABEL_SPEC_HASH: "abc", base.LABEL_PLUGIN: "kv"}
    desired = base.InstanceSpec("kv", models.Color.BLUE, spec_with("/srv"), labels, "team")
    instance = base.started_instance(desired, "id-1", {**labels, "x": "y"}, pid=42)
    assert (instance.name, instance.key, instance.id, instance.pid) == (
        "bh-team-kv-blue",
        "team/kv",
        "id-1",
        42,
    )
    assert instance.state is base.InstanceState.RUNNING
    assert instance.started_at is not None
    assert (instance.version, instance.spec_hash, instance.labels["x"]) == ("1.0.0", "abc", "y")
    assert base.key_of(instance.labels) == "kv", "labels without a namespace name no namespace"
    assert base.key_of({}) == ""


def test_deep_socket_paths_are_reached_through_their_directory(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["d" * 30] * 4)
    deep.mkdir(parents=True)
    path = deep / "x.sock"
    assert len(str(path)) > unix.SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as server, unix.unix_address(path) as address:
        server.bind(address)
        server.listen()
        with socket.socket(socket.AF_UNIX) as client, unix.unix_address(path) as again:
            client.connect(again)
    assert path.exists()


def test_names_are_scoped_by_namespace_and_controller() -> None:
    blue = models.Color.BLUE
    assert base.instance_name("kv", blue) == "bh-kv-blue"
    assert base.instance_name("kv", blue, "team") == "bh-team-kv-blue"
    assert base.instance_name("kv", blue, None, "ci") == "bh-ci-kv-blue"
    assert base.volume_name("kv", "data") == "bh-kv-data"


def test_instance_hash_ignores_what_the_instance_does_not_read() -> None:
    spec = spec_with("/srv/x")
    assert base.instance_hash(spec) == base.instance_hash(
        spec.model_copy(update={"restart": models.Restart(max_restarts=9)})
    )
    assert base.instance_hash(spec) != base.instance_hash(
        spec.model_copy(update={"env": {"A": "1"}})
    )


def resourced(resources: dict[str, str]) -> models.PluginSpec:
    return models.PluginSpec.model_validate(
        {"image": "x/y:1", "version": "1.0.0", "resources": resources}
    )


@pytest.mark.parametrize(
    ("resources", "default", "millis"),
    [
        ({"cpu": "500m"}, 2000, 2000),
        ({"cpu": "500m", "startCpu": "1"}, 2000, 1000),
        ({"cpu": "500m", "startCpu": "3"}, 0, 3000),
        ({"cpu": "500m", "startCpu": "0"}, 2000, None),
        ({"cpu": "500m", "startCpu": "500m"}, 2000, None),
        ({"cpu": "2500m"}, 2000, None),
        ({"cpu": "500m"}, 0, None),
    ],
)
def test_the_start_cpu_is_the_specs_else_the_controllers_and_only_above_the_limit(
    resources: dict[str, str], default: int, millis: int | None
) -> None:
    assert base.start_cpu_millis(resourced(resources), default) == millis


def test_a_negative_start_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        resourced({"startCpu": "-1"})


def test_changing_the_start_cpu_replaces_no_instance() -> None:
    assert base.instance_hash(resourced({"cpu": "500m"})) == base.instance_hash(
        resourced({"cpu": "500m", "startCpu": "0"})
    )
    assert base.instance_hash(resourced({"cpu": "500m"})) != base.instance_hash(
        resourced({"cpu": "400m"})
    )


@pytest.mark.parametrize(("label", "shown"), [("2000", "2"), ("1500", "1500m"), ("x", None)])
def test_the_start_cpu_an_instance_started_with_is_shown_as_a_quantity(
    label: str, shown: str | None
) -> None:
    spec = resourced({})
    labels = {base.LABEL_VERSION: "1.0.0", base.LABEL_SPEC_HASH: base.instance_hash(spec)}
    desired = base.InstanceSpec("p", models.Color.BLUE, spec, labels)
    instance = base.started_instance(desired, "id", {base.LABEL_START_CPU: label})
    assert base.start_cpu_of(instance) == shown
    assert base.start_cpu_of(base.started_instance(desired, "id", {})) is None
