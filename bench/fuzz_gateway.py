"""A long fuzz run of the gateway: hostile HTTP requests and gRPC calls, counted.

A real gateway listens on loopback in this process (in a thread of its own,
in front of a fake plugin: ``tests/gateway_harness.py``, which the suite's
shorter run in ``tests/unit/test_gateway_bounds.py`` uses too). Hypothesis
generates request lines, headers and bodies, and ``Handle`` bodies and
metadata; each is sent on its own connection and must end in a well-formed
answer (or, when it never completed, a close by the gateway) within a bound.
Prints JSON: per kind the inputs run, how many ended outside the expected
answers (with a few of them), the slowest, and the answers seen; and the
HTTP connections still open at the end. Needs nothing running. (Memory is
the suite's to check: hypothesis's own bookkeeping grows with the examples
in this process, the gateway's does not; see
``test_unique_long_method_names_leave_the_gateway_memory_flat``.)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.cli import run
from controller.gateway import connections
from tests import gateway_harness as harness


class Tally:
    """What a kind of input ended in."""

    def __init__(self) -> None:
        self.inputs = 0
        self.outside: list[dict[str, Any]] = []
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.slowest = (0.0, "")

    def add(self, outcome: harness.Outcome, shown: object) -> None:
        self.inputs += 1
        self.outcomes[outcome.what.split(":")[0]] += 1
        if not outcome.ok:
            self.outside.append({"what": outcome.what, "input": repr(shown)[:300]})
        if outcome.seconds > self.slowest[0]:
            self.slowest = (outcome.seconds, repr(shown)[:200])

    def report(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "outside_expected": len(self.outside),
            "outside_examples": self.outside[:5],
            "slowest_seconds": round(self.slowest[0], 3),
            "slowest_input": self.slowest[1],
            "outcomes": dict(self.outcomes.most_common()),
        }


def fuzz(examples: int, chosen_seed: int) -> dict[str, Any]:
    run.open_files_limit()
    limits = connections.Limits(header_timeout=0.5, idle_timeout=0.5)
    fast = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    http, rpc = Tally(), Tally()
    started = time.monotonic()
    with harness.GatewayThread(limits, call_timeout=0.5) as gateway:

        @seed(chosen_seed)
        @fast
        @given(harness.http_requests())
        def http_case(raw: bytes) -> None:
            http.add(harness.http_outcome(gateway.http, raw), raw)

        channel = grpc.insecure_channel(gateway.grpc)
        handle = harness.raw_handle(channel)

        @seed(chosen_seed)
        @fast
        @given(harness.grpc_calls())
        def grpc_case(call: tuple[bytes, tuple[tuple[str, str], ...]]) -> None:
            rpc.add(harness.grpc_outcome(handle, *call), call)

        http_case()
        grpc_case()
        alive = harness.http_outcome(gateway.http, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.close()
        assert gateway.gateway is not None
        malformed = gateway.gateway.quiet.seen
        still_open = len(gateway.gateway.http.open)
    return {
        "benchmark": "fuzz_gateway",
        "examples_per_kind": examples,
        "seed": chosen_seed,
        "seconds": round(time.monotonic() - started, 1),
        "http": http.report(),
        "grpc": rpc.report(),
        "malformed_http_requests_seen": malformed,
        "gateway_answers_after": alive.ok and alive.what == "200",
        "http_connections_open_at_the_end": still_open,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per kind")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    print(json.dumps(fuzz(args.examples, args.seed), indent=2))


if __name__ == "__main__":
    main()
