"""The storage example under the SDK's harness: calls, state round trips, the 1 -> 2 migration."""

from pathlib import Path

import grpc
import pytest
import yaml
from blackhole_sdk import testing

HERE = Path(__file__).resolve().parent.parent
storage = testing.load(HERE / "plugin.py")


def test_put_get_delete_list(blackhole_plugin):
    kv = blackhole_plugin(storage.KeyValueStore())
    assert kv.call("put", {"key": "a", "value": [1, 2]}) == {"key": "a", "revision": 1}
    assert kv.call("put", {"key": "a", "value": 3}) == {"key": "a", "revision": 2}
    kv.call("put", {"key": "b", "value": None})
    assert kv.call("get", {"key": "a"}) == {"key": "a", "value": 3, "revision": 2}
    assert kv.call("list", {"prefix": ""}) == {"keys": ["a", "b"]}
    assert kv.call("delete", {"key": "a"}) == {"deleted": True}
    with pytest.raises(testing.CallError) as missing:
        kv.call("get", {"key": "a"})
    assert missing.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(testing.CallError) as unknown:
        kv.call("frobnicate")
    assert unknown.value.code is grpc.StatusCode.UNIMPLEMENTED


def test_state_round_trips_byte_for_byte(blackhole_plugin):
    old = blackhole_plugin(storage.KeyValueStore())
    new = blackhole_plugin(storage.KeyValueStore())
    for i in range(100):
        old.call("put", {"key": f"k{i}", "value": {"n": i, "text": "é" * i}})
    version, state = old.export_state()
    assert version == 2
    answer = new.import_state(version, state)
    assert (answer.state_version, answer.size) == (2, len(state))
    assert new.export_state() == (2, state)
    assert new.call("get", {"key": "k42"})["value"] == {"n": 42, "text": "é" * 42}


def test_version_1_state_migrates_to_version_2(blackhole_plugin):
    legacy = blackhole_plugin(storage.KeyValueStoreV1())
    legacy.call("put", {"key": "a", "value": 1})
    legacy.call("put", {"key": "b", "value": "two"})
    version, state = legacy.export_state()
    assert version == 1
    assert state == b'{"a": 1, "b": "two"}'
    current = blackhole_plugin(storage.KeyValueStore())
    answer = current.import_state(version, state)
    assert answer.state_version == 2
    assert current.call("get", {"key": "b"}) == {"key": "b", "value": "two", "revision": 1}
    # What was migrated is what the new instance exports: the migration is the whole change.
    assert current.export_state() == (2, storage.KeyValueStore().add_revisions(state))


def test_state_from_a_newer_version_is_refused_and_nothing_changes(blackhole_plugin):
    legacy = blackhole_plugin(storage.KeyValueStoreV1())
    legacy.call("put", {"key": "kept", "value": 1})
    with pytest.raises(testing.CallError) as refused:
        legacy.import_state(2, b'{"entries": {}}')
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "newer" in refused.value.message
    assert legacy.call("get", {"key": "kept"})["value"] == 1


def test_the_manifest_says_what_the_code_does():
    manifest = yaml.safe_load((HERE / "plugin.yaml").read_text())
    assert manifest["stateVersion"] == storage.KeyValueStore.state_version
    assert manifest["provides"] == list(storage.KeyValueStore.provides)


def test_the_program_serves_under_the_harness(blackhole_plugin):
    kv = blackhole_plugin.subprocess(str(HERE / "plugin.py"))
    kv.call("put", {"key": "x", "value": 1})
    assert kv.call("get", {"key": "x"})["value"] == 1
    assert kv.healthy()


def test_garbage_is_refused_as_invalid_and_the_state_is_kept(blackhole_plugin):
    kv = blackhole_plugin(storage.KeyValueStore())
    kv.call("put", {"key": "a", "value": 1})
    with pytest.raises(testing.CallError) as refused:
        kv.import_state(2, b"\x00 this is not json")
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "import failed" in str(refused.value)
    assert kv.call("get", {"key": "a"})["value"] == 1
