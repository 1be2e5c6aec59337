"""The process runtime without running anything: cgroup files on fake trees, spec checks."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pydantic
import pytest

from controller.runtimes import base, process
from controller.runtimes.process import cgroups, shim
from controller.spec import models


def resources(**values: object) -> models.Resources:
    return models.Resources.model_validate({"cpu": "250m", "memory": "64Mi", "pids": 32, **values})


def test_cgroup_v2_limits_are_written_and_controllers_enabled_down_the_tree(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    groups = cgroups.Cgroups(tmp_path)
    assert groups.version == 2
    group = groups.create("blackhole/ctl/bh-a-blue", resources())
    leaf = tmp_path / "blackhole" / "ctl" / "bh-a-blue"
    assert group.dirs == (leaf,)
    assert group.oom_file == leaf / "memory.events"
    assert (leaf / "memory.max").read_text() == str(64 << 20)
    assert (leaf / "memory.oom.group").read_text() == "1"
    assert (leaf / "cpu.max").read_text() == "25000 100000"
    assert (leaf / "pids.max").read_text() == "32"
    for parent in (tmp_path, tmp_path / "blackhole", tmp_path / "blackhole" / "ctl"):
        assert (parent / "cgroup.subtree_control").read_text() == "+memory +cpu +pids +io"
    assert not (leaf / "cgroup.subtree_control").exists(), "the leaf holds the processes"


def test_cgroup_v2_without_a_controller_writes_none_of_its_limits(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    cgroups.Cgroups(tmp_path).create("blackhole/ctl/x", resources())
    leaf = tmp_path / "blackhole" / "ctl" / "x"
    assert not (leaf / "cpu.max").exists()
    assert (leaf / "pids.max").read_text() == "32"


def test_cgroup_v1_limits_go_to_each_hierarchy(tmp_path: Path):
    for controller in ("memory", "cpu", "cpuacct", "pids"):
        (tmp_path / controller).mkdir()
    groups = cgroups.Cgroups(tmp_path)
    assert groups.version == 1
    group = groups.create("blackhole/ctl/bh-a-blue", resources())
    assert {d.parent.parent.parent.name for d in group.dirs} == {"memory", "cpu", "cpuacct", "pids"}
    memory = tmp_path / "memory" / "blackhole" / "ctl" / "bh-a-blue"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert not (memory / "memory.memsw.limit_in_bytes").exists(), "only where swap is accounted"
    assert group.oom_file == memory / "memory.oom_control"
    cpu = tmp_path / "cpu" / "blackhole" / "ctl" / "bh-a-blue"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    pids = tmp_path / "pids" / "blackhole" / "ctl" / "bh-a-blue"
    assert (pids / "pids.max").read_text() == "32"


def test_cgroup_v1_swap_is_pinned_to_the_memory_limit(tmp_path: Path):
    group = tmp_path / "memory" / "g"
    group.mkdir(parents=True)
    for directory in (group.parent, group):  # the hierarchy's root says swap is accounted
        (directory / "memory.memsw.limit_in_bytes").write_text("9223372036854771712")
    cgroups.Cgroups(tmp_path).create("g", resources(memory="128Mi"))
    assert (group / "memory.memsw.limit_in_bytes").read_text() == str(128 << 20)


def test_cgroup_v1_plan_is_the_writes_create_makes_in_order(tmp_path: Path):
    for controller in ("memory", "cpu", "pids"):
        (tmp_path / controller).mkdir()
    (tmp_path / "memory" / "memory.memsw.limit_in_bytes").write_text("0")
    groups = cgroups.Cgroups(tmp_path)
    planned = groups.plan("blackhole/ctl/x", resources(), start_cpu_millis=1000)
    assert not (tmp_path / "memory" / "blackhole").exists(), "a plan makes nothing"
    memory = tmp_path / "memory" / "blackhole" / "ctl" / "x"
    cpu = tmp_path / "cpu" / "blackhole" / "ctl" / "x"
    assert [(w.path, w.value, w.optional) for w in planned.writes] == [
        (memory / "memory.memsw.limit_in_bytes", 64 << 20, True),
        (memory / "memory.limit_in_bytes", 64 << 20, False),
        (memory / "memory.memsw.limit_in_bytes", 64 << 20, False),
        (cpu / "cpu.cfs_period_us", 100_000, False),
        (cpu / "cpu.cfs_quota_us", 100_000, False),
        (tmp_path / "pids" / "blackhole" / "ctl" / "x" / "pids.max", 32, False),
    ]
    assert groups.create("blackhole/ctl/x", resources(), start_cpu_millis=1000) == planned.group
    assert (cpu / "cpu.cfs_quota_us").read_text() == "100000"
    assert groups.spare_parents("blackhole/ctl") == [
        tmp_path / c / "blackhole" / "ctl" for c in ("memory", "cpu", "pids")
    ]


def test_spare_groups_are_found_in_any_hierarchy_and_instances_are_not(tmp_path: Path):
    for controller in ("memory", "pids"):
        (tmp_path / controller / "blackhole" / "ctl" / "bh-a-blue").mkdir(parents=True)
    (tmp_path / "pids" / "blackhole" / "ctl" / f"{cgroups.SPARE}12").mkdir()
    (tmp_path / "memory" / "blackhole" / "other" / f"{cgroups.SPARE}13").mkdir(parents=True)
    assert cgroups.Cgroups(tmp_path).spares("blackhole/ctl") == [f"blackhole/ctl/{cgroups.SPARE}12"]


def test_a_spares_groups_are_renamed_to_the_instances_and_limited(tmp_path: Path):
    parents = [tmp_path / "memory" / "ctl", tmp_path / "pids" / "ctl"]
    spare_dirs = [str(p / f"{cgroups.SPARE}7") for p in parents]
    for directory in spare_dirs:
        Path(directory).mkdir(parents=True)
    (parents[1] / "bh-a-blue").mkdir()  # an empty one, left by a start cut short
    spare = shim._Spare(shim._Child(0, -1, -1, None), list(spare_dirs))
    targets = [str(p / "bh-a-blue") for p in parents]
    limit = str(parents[1] / "bh-a-blue" / "pids.max")
    shim._place({"cgroups": targets, "limits": [[limit, 64, False]]}, spare)
    assert spare.dirs == targets, "what is removed if the start fails"
    assert not any(Path(d).exists() for d in spare_dirs)
    assert Path(limit).read_text() == "64"
    elsewhere = shim._Spare(shim._Child(0, -1, -1, None), [str(tmp_path / "x" / ".spare-8")])
    with pytest.raises(OSError, match="not beside"):
        shim._place({"cgroups": [str(tmp_path / "y" / "bh-b")], "limits": []}, elsewhere)


def want(spec: dict[str, object]) -> base.InstanceSpec:
    parsed = models.PluginSpec.model_validate({"image": "x/y:1", "version": "1.0.0", **spec})
    return base.InstanceSpec("alpha", models.Color.BLUE, parsed, {})


@pytest.fixture
def runtime(tmp_path: Path) -> process.ProcessRuntime:
    plugin = tmp_path / "plugins" / "alpha"
    (plugin / "lib").mkdir(parents=True)
    (plugin / "plugin.py").write_text("")
    return process.ProcessRuntime(
        process.Settings(data_dir=tmp_path / "data", plugin_root=tmp_path / "plugins")
    )


def paths(runtime: process.ProcessRuntime, spec: dict[str, object]) -> dict[str, object]:
    return {issue.path: issue.value for issue in runtime.validate(want(spec))}


def test_a_plugin_directory_under_the_root_is_valid(runtime: process.ProcessRuntime):
    assert paths(runtime, {"process": {"path": "alpha", "pythonPath": ["lib"]}}) == {}


def test_a_plugin_directory_under_tmp_is_valid_but_not_tmp_itself(tmp_path: Path):
    runtime = process.ProcessRuntime(
        process.Settings(data_dir=tmp_path / "data", plugin_root=Path("/tmp"))
    )
    plugin = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        (plugin / "plugin.py").write_text("")
        assert paths(runtime, {"process": {"path": plugin.name}}) == {}
        [issue] = runtime.validate(want({"process": {"path": "."}}))
        assert (issue.path, issue.value) == ("spec.process.path", ".")
        assert "private" in issue.message
    finally:
        shutil.rmtree(plugin)


def test_what_the_process_runtime_refuses_names_the_field(
    runtime: process.ProcessRuntime, tmp_path: Path
):
    assert paths(runtime, {}) == {"spec.process": None}
    assert paths(runtime, {"process": {"path": "beta"}}) == {"spec.process.path": "beta"}
    outside = str(tmp_path)
    assert paths(runtime, {"process": {"path": outside}}) == {"spec.process.path": outside}
    (tmp_path / "plugins" / "link").symlink_to(tmp_path)
    assert paths(runtime, {"process": {"path": "link"}}) == {"spec.process.path": "link"}
    assert paths(runtime, {"process": {"path": "alpha", "entrypoint": "main.py"}}) == {
        "spec.process.entrypoint": "main.py"
    }
    assert paths(runtime, {"process": {"path": "alpha", "virtualenv": "venv"}}) == {
        "spec.process.virtualenv": "venv"
    }
    assert paths(runtime, {"process": {"path": "alpha", "pythonPath": ["nowhere"]}}) == {
        "spec.process.pythonPath[0]": "nowhere"
    }
    assert paths(runtime, {"process": {"path": "alpha"}, "runtime": "docker"}) == {
        "spec.runtime": "docker"
    }
    assert paths(runtime, {"process": {"path": "alpha"}, "permissions": {"network": "egress"}}) == {
        "spec.permissions.network": "egress"
    }
    volume = {"name": "etc", "mountPath": "/etc/plugin"}
    assert paths(runtime, {"process": {"path": "alpha"}, "volumes": [volume]}) == {
        "spec.volumes[0].mountPath": "/etc/plugin"
    }
    volume = {"name": "host", "mountPath": "/data", "hostPath": "/srv"}
    assert paths(runtime, {"process": {"path": "alpha"}, "volumes": [volume]}) == {
        "spec.volumes[0].hostPath": "/srv"
    }


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"path": "a/../b"}, 'must not contain ".."'),
        ({"path": "a", "entrypoint": "/etc/passwd"}, "must be relative"),
        ({"path": "a", "pythonPath": ["../lib"]}, 'must not contain ".."'),
        ({"path": "a", "virtualenv": "/opt/venv"}, "must be relative"),
    ],
)
def test_the_spec_refuses_paths_that_leave_the_plugin(source: dict[str, object], message: str):
    with pytest.raises(pydantic.ValidationError, match=message):
        models.PluginSpec.model_validate({"image": "x/y:1", "version": "1.0.0", "process": source})


def test_plugins_never_run_as_root(tmp_path: Path):
    with pytest.raises(ValueError, match="never run as root"):
        process.ProcessRuntime(process.Settings(data_dir=tmp_path, user="0:0"))


def test_a_changed_process_source_needs_a_new_instance():
    first = want({"process": {"path": "alpha"}}).spec
    second = want({"process": {"path": "alpha", "entrypoint": "other.py"}}).spec
    assert base.instance_hash(first) != base.instance_hash(second)


def test_cgroup_stats_are_read_through_the_metrics_reader_on_v2(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    leaf = tmp_path / "blackhole" / "ctl" / "x"
    leaf.mkdir(parents=True)
    (leaf / "cpu.stat").write_text("usage_usec 2500000\nnr_periods 3\n")
    (leaf / "memory.current").write_text("1048576\n")
    (leaf / "memory.max").write_text("67108864\n")
    (leaf / "pids.current").write_text("4\n")
    stats = cgroups.Cgroups(tmp_path).stats("blackhole/ctl/x")
    assert stats == base.Stats(
        cpu_seconds=2.5, memory_bytes=1 << 20, memory_limit_bytes=64 << 20, pids=4
    )


def test_cgroup_stats_on_v1_read_each_hierarchy_and_no_limit_reads_as_none(tmp_path: Path):
    group = "blackhole/ctl/x"
    files = {
        "cpuacct": {"cpuacct.usage": "1500000000"},
        "memory": {"memory.usage_in_bytes": "2048", "memory.limit_in_bytes": "9223372036854771712"},
        "pids": {"pids.current": "7"},
        "cpu": {},
    }
    for controller, contents in files.items():
        (tmp_path / controller / group).mkdir(parents=True)
        for name, text in contents.items():
            (tmp_path / controller / group / name).write_text(text + "\n")
    stats = cgroups.Cgroups(tmp_path).stats(group)
    assert stats == base.Stats(cpu_seconds=1.5, memory_bytes=2048, memory_limit_bytes=0, pids=7)


def test_a_start_up_boost_raises_the_cgroup_cpu_until_lowered_to_the_specs(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    groups = cgroups.Cgroups(tmp_path)
    groups.create("blackhole/ctl/x", resources(), start_cpu_millis=2000)
    cpu_max = tmp_path / "blackhole" / "ctl" / "x" / "cpu.max"
    assert cpu_max.read_text() == "200000 100000"
    groups.set_cpu_quota("blackhole/ctl/x", 25_000)
    assert cpu_max.read_text() == "25000 100000"


def test_a_start_up_boost_below_the_specs_cpu_keeps_the_specs(tmp_path: Path):
    (tmp_path / "cpu").mkdir()
    groups = cgroups.Cgroups(tmp_path)
    groups.create("g", resources(cpu="1500m"), start_cpu_millis=1000)
    assert (tmp_path / "cpu" / "g" / "cpu.cfs_quota_us").read_text() == "150000"
    groups.set_cpu_quota("g", 25_000)
    assert (tmp_path / "cpu" / "g" / "cpu.cfs_quota_us").read_text() == "25000"


def test_lowering_the_cpu_where_the_cpu_controller_is_off_writes_nothing(tmp_path: Path):
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    groups = cgroups.Cgroups(tmp_path)
    groups.create("g", resources(), start_cpu_millis=2000)
    groups.set_cpu_quota("g", 25_000)
    assert not (tmp_path / "g" / "cpu.max").exists()
