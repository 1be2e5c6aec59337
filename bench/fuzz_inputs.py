"""The long fuzz run: many generated inputs per parser of outside input, and how each ended.

Kinds: spec files as text (mutated valid specs, deep nesting, alias chains,
sizes past the limit, random text), spec documents (valid specs with fields
replaced by generated values, dumped as YAML), bundle manifests, policy
files, marketplace indexes, and bundle archives (built from a valid signed
bundle's parts, or with bytes overwritten, or sparse). Each input must end
valid or refused with the controller's own error; anything else, or an
input taking more than ``--hang-seconds``, is counted.

Prints JSON: per kind the inputs run, how many ended outside the project's
error type (``escaped``, the goal is 0) or hung; the slowest of the others,
its first characters and its time when run again (best of three: a load
spike, or an input slow by itself?); the median and 99th percentile; and
the peak RSS of the whole process (hypothesis included) after the kind.

    python bench/fuzz_inputs.py [--examples 10000] [--kinds spec-text,bundle] [--seed 0]
                                [--python-parser]
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from controller.spec import safe_yaml

# The strategies live with the tests: put the repository's root on the path to import them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import fuzzing


class _Hung(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hung


def run_kind(
    name: str,
    strategy: st.SearchStrategy[Any],
    run: Callable[[Any], str],
    examples: int,
    hang_seconds: int,
    start_seed: int,
) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "inputs": 0,
        "valid": 0,
        "refused": 0,
        "escaped": 0,
        "hung": 0,
        "slowest_seconds": 0.0,
        "slowest_input": "",
        "escapes": [],
    }
    times: list[float] = []
    slowest: list[Any] = []

    @seed(start_seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(value: Any) -> None:
        counts["inputs"] += 1
        began = time.perf_counter()
        signal.alarm(hang_seconds)
        ended = False
        try:
            counts[run(value)] += 1
            ended = True
        except _Hung:
            counts["hung"] += 1
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            counts["escaped"] += 1
            if len(counts["escapes"]) < 5:
                counts["escapes"].append(
                    {
                        "input": repr(value)[:300],
                        "error": "".join(traceback.format_exception_only(e)).strip()[:300],
                    }
                )
        finally:
            signal.alarm(0)
        took = time.perf_counter() - began
        times.append(took)
        if ended and took > counts["slowest_seconds"]:
            counts["slowest_seconds"] = round(took, 4)
            counts["slowest_input"] = repr(value)[:120]
            slowest[:] = [value]

    one()
    times.sort()
    counts["p50_seconds"] = round(times[len(times) // 2], 5)
    counts["p99_seconds"] = round(times[len(times) * 99 // 100], 5)
    # The slowest once more (best of three): a load spike, or an input that is slow by itself?
    again = []
    for value in slowest * 3:
        began = time.perf_counter()
        run(value)
        again.append(time.perf_counter() - began)
    counts["slowest_again_seconds"] = round(min(again), 4) if again else 0.0
    counts["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per kind")
    parser.add_argument("--kinds", default="", help="comma-separated kinds (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-seconds", type=int, default=30)
    parser.add_argument(
        "--python-parser", action="store_true", help="PyYAML's own parser instead of libyaml"
    )
    args = parser.parse_args()
    if args.python_parser:
        safe_yaml._Events = safe_yaml._PythonEvents
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as scratch:
        fixture = fuzzing.BundleFixture.create(Path(scratch))
        kinds: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], str]]] = {
            "spec-text": (fuzzing.spec_texts, fuzzing.run_spec),
            "spec-document": (fuzzing.spec_documents, fuzzing.run_spec),
            "manifest": (fuzzing.manifest_texts, fuzzing.run_manifest),
            "policy": (fuzzing.policy_texts, fuzzing.run_policy),
            "index": (fuzzing.index_documents, fuzzing.run_index),
            "bundle": (
                fuzzing.bundle_bytes(fixture),
                lambda data: fuzzing.run_bundle(fixture, data),
            ),
        }
        wanted = [k for k in args.kinds.split(",") if k] or list(kinds)
        results = {}
        for name in wanted:
            strategy, run = kinds[name]
            began = time.perf_counter()
            results[name] = run_kind(
                name, strategy, run, args.examples, args.hang_seconds, args.seed
            )
            results[name]["seconds"] = round(time.perf_counter() - began, 1)
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    parser_name = "python" if args.python_parser else "libyaml"
    document = {"examples_per_kind": args.examples, "parser": parser_name, "kinds": results}
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
