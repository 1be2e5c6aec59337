"""The gRPC passthrough reads a ``HandleRequest``'s method from its bytes and forwards them as
they came: it must accept and refuse exactly what the plugin's own parser does."""

from __future__ import annotations

import pytest
from blackhole_sdk.proto import plugin_pb2
from google.protobuf import message as protobuf_message
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.gateway import router, server


def parsed(body: bytes) -> str | None:
    """The method protobuf finds in ``body``, or None when it does not parse."""
    try:
        return plugin_pb2.HandleRequest.FromString(body).method
    except protobuf_message.DecodeError:
        return None


def scanned(body: bytes) -> str | int:
    """The method the gateway finds in ``body``, or the HTTP status it refuses it with."""
    try:
        return server._method_of(body)
    except router.Refused as e:
        return e.status


def requests() -> st.SearchStrategy[bytes]:
    whole = st.builds(
        lambda method, metadata, payload: plugin_pb2.HandleRequest(
            method=method, metadata=metadata, payload=payload
        ).SerializeToString(),
        st.text(max_size=30),
        st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        st.binary(max_size=200),
    )
    damaged = st.tuples(whole, st.integers(0, 400), st.binary(max_size=8)).map(
        lambda t: t[0][: t[1]] + t[2]
    )
    return st.one_of(whole, damaged, st.binary(max_size=60), whole.map(lambda b: b + b))


@settings(max_examples=3000, deadline=None)
@given(requests())
def test_the_method_is_what_protobuf_parses(body: bytes) -> None:
    method = parsed(body)
    assert scanned(body) == (400 if method is None else method)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff",  # a varint cut short
        b"\x0a\x05ab",  # a method longer than the message
        b"\x0a\x02\xc3\x28",  # a method that is not UTF-8
        b"\x12\x04\x0a\x02\xc3\x28",  # a metadata key that is not UTF-8
        b"\x0b\x08\x01",  # a group with no end
    ],
)
def test_what_is_not_a_request_is_refused(body: bytes) -> None:
    assert parsed(body) is None
    assert scanned(body) == 400


@pytest.mark.parametrize("depth", [1, 100, 101, 5000])
def test_groups_nest_as_deep_as_protobuf_lets_them(depth: int) -> None:
    body = b"\x0b" * depth + b"\x0c" * depth  # field 1 groups, unknown to a HandleRequest
    method = parsed(body)
    assert scanned(body) == (400 if method is None else method)
