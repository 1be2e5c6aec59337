"""The analytics example: windows, percentiles, and its aggregates carried between instances."""

from pathlib import Path

import pytest
import yaml
from blackhole_sdk import testing

HERE = Path(__file__).resolve().parent.parent
analytics = testing.load(HERE / "plugin.py")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_count_mean_p95_over_windows(blackhole_plugin):
    clock = Clock()
    plugin = blackhole_plugin(analytics.Analytics(clock), config={"windows": [10, 60]})
    plugin.call("ingest", {"values": list(range(1, 101))})
    clock.now += 30
    plugin.call("ingest", {"value": 1000})
    assert plugin.call("query", {"window": 10}) == {
        "window": 10, "count": 1, "mean": 1000.0, "p95": 1000.0,
    }  # fmt: skip
    wide = plugin.call("query", {"window": 60})
    assert wide["count"] == 101
    assert wide["p95"] == 96.0
    clock.now += 61
    assert plugin.call("query", {"window": 60})["count"] == 0
    with pytest.raises(testing.CallError, match="window 5 is not one of"):
        plugin.call("query", {"window": 5})


def test_aggregates_move_to_a_new_instance(blackhole_plugin):
    clock = Clock()
    old = blackhole_plugin(analytics.Analytics(clock), config={"windows": [60]})
    new = blackhole_plugin(analytics.Analytics(clock), config={"windows": [60]})
    for second in range(5):
        old.call("ingest", {"values": [second, second + 0.5]})
        clock.now += 1
    version, state = old.export_state()
    new.import_state(version, state)
    assert new.export_state() == (version, state)
    assert new.call("query", {"window": 60}) == old.call("query", {"window": 60})


def test_the_manifest_says_what_the_code_does():
    manifest = yaml.safe_load((HERE / "plugin.yaml").read_text())
    assert manifest["stateVersion"] == analytics.Analytics.state_version
    assert manifest["provides"] == list(analytics.Analytics.provides)
