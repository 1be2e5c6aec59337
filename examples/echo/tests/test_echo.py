"""The echo example: answers with what it was sent, through Handle and HandleStream."""

import json
from pathlib import Path

import pytest
from blackhole_sdk import testing

HERE = Path(__file__).resolve().parent.parent
echo = testing.load(HERE / "plugin.py")


def test_echo_answers_with_the_call(blackhole_plugin):
    plugin = blackhole_plugin(echo.Echo())
    assert plugin.call("ping", {"x": [1, "a"]}) == {"method": "ping", "payload": {"x": [1, "a"]}}
    assert plugin.call("empty") == {"method": "empty", "payload": None}


def test_a_large_payload_streams_through(blackhole_plugin):
    plugin = blackhole_plugin(echo.Echo())
    big = {"blob": "x" * (5 << 20)}
    answer = plugin.call_stream("big", json.dumps(big).encode())
    assert json.loads(answer) == {"method": "big", "payload": big}


def test_an_old_controller_protocol_is_refused(blackhole_plugin):
    plugin = blackhole_plugin(echo.Echo(), initialize=False)
    with pytest.raises(testing.CallError, match="protocol version 99 is not supported"):
        plugin.initialize(protocol_version=99)
    assert not plugin.healthy(), "not serving before a successful handshake"
    plugin.initialize()
    assert plugin.healthy()
