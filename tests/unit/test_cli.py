"""bhctl as operators expect it: a fast start, apply from stdin and directories, unchanged
applies, diff, get formats, help at 80 columns, state exports that carry their version,
swap status exit codes, following logs. The admin API is the real aiohttp app, served on
a Unix socket over a spec directory and the in-memory runtime."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.admin import server
from controller.cli import flags, main, state, swap
from controller.cli.control import new_lines
from controller.protocol import memory as memory_protocol
from controller.reconcile import manager, queue
from controller.registry import remote
from controller.runtimes import container, memory
from controller.sources.directory import DirectorySource
from controller.sources.store import Store
from controller.state import snapshots

SPEC = """\
apiVersion: blackhole.dev/v1alpha1
kind: Plugin
metadata: {{name: {name}}}
spec:
  image: blackhole/{name}:{version}
  version: {version}
{extra}"""


def spec(name: str, version: str = "0.1.0", extra: str = "") -> str:
    return SPEC.format(name=name, version=version, extra=extra)


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose admin socket the real admin API answers on."""
    ready, stop = threading.Event(), threading.Event()
    specs = tmp_path / "specs"
    specs.mkdir()

    async def serve() -> None:
        source = DirectorySource(specs, Store(tmp_path / "state.db"), lambda key: None)
        source.rescan()
        api = server.AdminServer(source, memory.MemoryRuntime(), tmp_path / "admin.sock")
        await api.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        await api.stop()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield tmp_path
    stop.set()
    thread.join(30)


def bhctl(data: Path, *args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(
        main.app, [*args, "--data-dir", str(data)], input=stdin, env={"COLUMNS": "200"}
    )


def test_get_imports_no_engine_client_nor_server(tmp_path: Path) -> None:
    """What keeps bhctl get fast: none of the controller's machinery is imported for it."""
    program = (
        "import sys\n"
        "from controller.cli import main\n"
        "try:\n"
        f"    main.app(['get', '--data-dir', {str(tmp_path)!r}], standalone_mode=False)\n"
        "except Exception:\n"
        "    pass\n"
        "print('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(done.stdout.split())
    assert "controller.admin.client" in loaded  # it did run the command
    heavy = (
        "kubernetes", "docker", "grpc", "aiohttp", "controller.spec", "controller.runtimes",
        "controller.pki", "cryptography",
    )  # fmt: skip
    assert not [m for m in loaded if m.startswith(heavy)]


def test_light_defaults_match_the_backends_constants() -> None:
    assert container.START_CPU_MILLIS == flags.START_CPU_MILLIS
    assert {e.value for e in container.Engine} == {e.value for e in flags.EngineChoice}
    limits = remote.Limits()
    assert (limits.max_bytes, limits.timeout, limits.attempts) == (
        flags.MAX_DOWNLOAD_BYTES,
        flags.DOWNLOAD_TIMEOUT,
        flags.DOWNLOAD_ATTEMPTS,
    )


def test_apply_from_stdin_then_again_says_unchanged(data: Path) -> None:
    first = bhctl(data, "apply", "-f", "-", stdin=spec("echo"))
    assert first.exit_code == 0, first.output
    assert first.output.strip() == "plugin/echo created (generation 1)"
    again = bhctl(data, "apply", "-f", "-", stdin=spec("echo"))
    assert again.output.strip() == "plugin/echo unchanged (generation 1)"
    edited = bhctl(data, "apply", "-f", "-", stdin=spec("echo", "0.2.0"))
    assert edited.output.strip() == "plugin/echo configured (generation 2)"


def test_apply_a_directory_applies_every_yaml_file(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "a.yaml").write_text(spec("alpha"))
    (folder / "b.yml").write_text(spec("beta"))
    (folder / "notes.txt").write_text("not a spec")
    result = bhctl(data, "apply", "-f", str(folder), "-o", "name")
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["plugin/alpha", "plugin/beta"]
    listed = bhctl(data, "get", "-o", "name")
    assert listed.output.split() == ["plugin/alpha", "plugin/beta"]
    assert bhctl(data, "get", "--no-headers").output.split()[0] == "alpha"


def test_get_with_nothing_says_so_on_stderr_and_exits_0(data: Path) -> None:
    result = bhctl(data, "get")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "No resources found" in result.stderr


def test_diff_tells_in_place_swap_and_the_fields(data: Path) -> None:
    assert bhctl(data, "apply", "-f", "-", stdin=spec("echo")).exit_code == 0
    same = bhctl(data, "diff", "-f", "-", stdin=spec("echo"))
    assert same.exit_code == 0, same.output
    assert "plugin/echo: unchanged" in same.output
    labels = spec("echo").replace("{name: echo}", "{name: echo, labels: {team: a}}")
    in_place = bhctl(data, "diff", "-f", "-", "-o", "json", stdin=labels)
    assert in_place.exit_code == 1
    (change,) = json.loads(in_place.stdout)["changes"]
    assert change["change"] == "in-place"
    assert change["fields"] == [{"path": "metadata.labels.team", "from": None, "to": "a"}]
    # Not Ready on the in-memory runtime without a controller: replaced, not swapped.
    newer = bhctl(data, "diff", "-f", "-", stdin=spec("echo", "0.2.0"))
    assert "plugin/echo: replace (not Ready)" in newer.output
    assert 'spec.version: "0.1.0" -> "0.2.0"' in newer.output
    created = bhctl(data, "diff", "-f", "-", stdin=spec("other"))
    assert "plugin/other: created" in created.output
    assert bhctl(data, "get", "-o", "name").output.split() == ["plugin/echo"]  # nothing applied


def test_delete_by_file(data: Path, tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(spec("alpha") + "---\n" + spec("beta"))
    assert bhctl(data, "apply", "-f", str(path)).exit_code == 0
    result = bhctl(data, "delete", "-f", str(path))
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["plugin/alpha", "deleted", "plugin/beta", "deleted"]


def test_help_fits_80_columns_and_names_allowed_values() -> None:
    runner = CliRunner()
    result = runner.invoke(main.app, ["run", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "--memory-alert-share" in result.output
    assert "--memory-alert-seconds" in result.output
    assert "--runtime <docker|podman|process>" in result.output
    assert "<bool>" not in result.output
    got = runner.invoke(main.app, ["get", "--help"], env={"COLUMNS": "80"})
    assert "table, wide, json, yaml, name" in got.output
    version = runner.invoke(main.app, ["--version"])
    assert version.exit_code == 0
    assert version.output.startswith("bhctl ")


def test_a_state_export_carries_its_version_and_a_garbage_import_is_refused_clearly(
    tmp_path: Path,
) -> None:
    document = {
        "kind": state.KIND,
        "stateVersion": 3,
        "data": "aGk=",  # b"hi"
        "sha256": "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4",
    }
    assert state.read_export("f", json.dumps(document).encode()) == (3, b"hi")
    assert state.read_export("f", b"\x00 not json") is None
    with pytest.raises(ValueError, match="does not match its sha256"):
        state.read_export("f", json.dumps(document | {"data": "aGo="}).encode())
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01 not an export")
    result = CliRunner().invoke(
        main.app, ["state", "import", "kv", str(garbage), "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "is not a state export" in result.stderr
    assert "--state-version" in result.stderr


def test_exports_do_not_push_out_the_other_snapshots(tmp_path: Path) -> None:
    states = snapshots.Snapshots(tmp_path / "snapshots.db")
    kept = states.save("kv", "1.0.0", 1, b"before", "before-import")
    for index in range(snapshots.KEPT + 3):
        states.save("kv", "1.0.0", 1, bytes([index]), snapshots.EXPORT)
    history = states.history("kv")
    assert kept.id in {s.id for s in history}
    assert sum(s.reason == snapshots.EXPORT for s in history) == snapshots.KEPT


def plugin(status: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "kv", "generation": generation}, "status": status}


def test_swap_status_exit_codes() -> None:
    step = {"step": "AwaitingPromotion", "fromVersion": "1.0.0", "toVersion": "1.1.0"}
    said, code = swap._where(plugin({"observedGeneration": 1, "swap": step}))
    assert code is None
    assert "bhctl swap promote kv" in said
    assert swap._where(plugin({"observedGeneration": 0}))[1] is None  # not yet seen
    promoted = {"observedGeneration": 1, "lastSwap": {"from": "1", "to": "2", "result": "Promoted"}}
    assert swap._where(plugin(promoted))[1] == 0
    back = {"from": "1", "to": "2", "result": "RolledBack", "reason": "SwapFailedImport"}
    said, code = swap._where(plugin({"observedGeneration": 1, "lastSwap": back}))
    assert code == 1
    assert "RolledBack (SwapFailedImport)" in said


def test_following_logs_prints_each_new_line_once() -> None:
    assert new_lines(["a", "b"], ["a", "b", "c"], full=False) == ["c"]
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"], full=True) == ["d", "e"]
    assert new_lines(["x"], ["fresh"], full=True) == ["fresh"]  # a new instance
    assert new_lines([], ["a"], full=False) == ["a"]


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose admin socket a running controller answers on: the real admin
    API and reconciler over a spec directory and the in-memory runtime."""
    ready, stop = threading.Event(), threading.Event()
    specs = tmp_path / "specs"
    specs.mkdir()

    async def serve() -> None:
        work = queue.WorkQueue()
        source = DirectorySource(specs, Store(tmp_path / "state.db"), work.add)
        runtime = memory.MemoryRuntime()
        plugins = memory_protocol.MemoryPlugins(runtime)
        states = snapshots.Snapshots(tmp_path / "snapshots.db")
        control = manager.Manager(source, runtime, work, plugins, snapshots=states, workers=2)
        api = server.AdminServer(
            source,
            runtime,
            tmp_path / "admin.sock",
            control=control,
            plugins=plugins,  # type: ignore[arg-type]
        )
        await api.start()
        halt = asyncio.Event()
        running = asyncio.create_task(control.run(halt))
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        halt.set()
        await running
        await api.stop()
        states.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield tmp_path
    stop.set()
    thread.join(30)


def wait_for(what: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def active(data: Path) -> tuple[str | None, bool]:
    status = json.loads(bhctl(data, "get", "kv", "-o", "json").stdout).get("status") or {}
    return status.get("activeVersion"), status.get("swap") is None


def test_swap_history_lists_revisions_and_undo_goes_back_to_one(controller: Path) -> None:
    fast = "  hotSwap: {scaleDownDelaySeconds: 0}\n"
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        result = bhctl(controller, "apply", "-f", "-", stdin=spec("kv", version, fast))
        assert result.exit_code == 0, result.output
        wait_for(lambda v=version: active(controller) == (v, True))  # type: ignore[misc]
    result = bhctl(controller, "swap", "history", "kv")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REVISION", "VERSION", "SPEC", "HASH", "CREATED", "RESULT"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("1", "1.0.0", "None"),
        ("2", "1.1.0", "Promoted"),
        ("3", "1.2.0", "Promoted"),
    ]
    documents = json.loads(bhctl(controller, "swap", "history", "kv", "-o", "json").stdout)
    hashes = [r["specHash"] for r in documents["revisions"]]
    assert [row[2] for row in rows] == [h[:12] for h in hashes]

    result = bhctl(controller, "swap", "undo", "kv", "--to-revision", "7")
    assert result.exit_code == 1
    assert "no revision 7 of kv is kept" in result.stderr
    result = bhctl(controller, "swap", "undo", "kv", "--to-revision", "1", "--wait")
    assert result.exit_code == 0, result.output
    assert "going back to revision 1 (1.0.0)" in result.stdout
    wait_for(lambda: active(controller) == ("1.0.0", True))
    documents = json.loads(bhctl(controller, "swap", "history", "kv", "-o", "json").stdout)
    newest = documents["revisions"][-1]
    assert (newest["revision"], newest["version"], newest["specHash"]) == (4, "1.0.0", hashes[0])
    assert newest["result"] == "Promoted"
