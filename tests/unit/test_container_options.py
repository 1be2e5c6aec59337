"""Host-path checks and Unix socket addresses of the container backend, without an engine."""

from __future__ import annotations

import socket
from pathlib import Path

from controller.runtimes import base, container
from controller.spec import models


def spec_with(host_path: str) -> models.PluginSpec:
    return models.PluginSpec.model_validate(
        {
            "image": "blackhole/x:1",
            "version": "1.0.0",
            "volumes": [{"name": "v", "mountPath": "/v", "hostPath": host_path}],
        }
    )


def test_host_paths_must_resolve_to_a_directory_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    assert container.check_host_paths(spec_with(f"{root}/ok"), root) == []
    [outside] = container.check_host_paths(spec_with("/etc"), root)
    assert outside.path == "spec.volumes[0].hostPath"
    assert "outside the allowed host-path root" in outside.message
    [symlink] = container.check_host_paths(spec_with(f"{root}/escape"), root)
    assert "symlink" in symlink.message
    [missing] = container.check_host_paths(spec_with(f"{root}/missing"), root)
    assert "does not exist" in missing.message
    [no_root] = container.check_host_paths(spec_with(f"{root}/ok"), None)
    assert "--host-path-root" in no_root.message


def test_deep_socket_paths_are_reached_through_their_directory(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["d" * 30] * 4)
    deep.mkdir(parents=True)
    path = deep / "x.sock"
    assert len(str(path)) > base.SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX) as server, base.unix_address(path) as address:
        server.bind(address)
        server.listen()
        with socket.socket(socket.AF_UNIX) as client, base.unix_address(path) as again:
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
