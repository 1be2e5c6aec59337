"""Measuring a swap's new color: what the gateway counts of its calls, or Prometheus queries.

An analysis takes each of its measurements (``spec.hotSwap.analysis``)
``count`` times, one ``intervalSeconds`` after the other, across reconcile
passes: the coordinator calls :func:`measure` at each pass and gets back
how long until the next measurement is due. A measurement out of its
``min``/``max`` (or a query that errs) is a failure; more than
``failureLimit`` of them fail the analysis, and the swap rolls back saying
which measurement failed with its values.

Builtin measurements come from the gateway: it counts, per endpoint, the
calls it answered, those that were a 5xx, and their latencies in fixed
buckets (:class:`Stats`). A measurement is the difference of two readings
one interval apart, so it covers the calls of that interval only; the
reading that starts an interval is kept in the plugin's memory (a restarted
controller starts the interval over). An interval without calls is
Inconclusive: it is not counted, and the analysis waits for calls.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from controller.errors import ControllerError
from controller.gateway.counts import Stats
from controller.spec import models

QUERY_TIMEOUT = 10.0


class AnalysisError(ControllerError):
    """A measurement could not be taken (a query that failed, a gateway that does not count)."""


StatsOf = Callable[[str], Awaitable[Stats | None]]
"""The gateway's counts of an endpoint (None: a gateway that does not count them)."""


class Prometheus:
    """Instant queries against the Prometheus at ``url`` (bhctl run --prometheus-url)."""

    def __init__(self, url: str | None) -> None:
        self.url = url.rstrip("/") if url else None

    async def query(self, query: str) -> float:
        if self.url is None:
            raise AnalysisError("no Prometheus to ask: start the controller with --prometheus-url")
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=QUERY_TIMEOUT)) as s,
                s.get(address) as response,
            ):
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise AnalysisError(f"Prometheus at {self.url}: {e or type(e).__name__}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise AnalysisError(f"Prometheus refused the query: {error}")
        return _one_value(body.get("data") or {})


def _one_value(data: dict[str, Any]) -> float:
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list):
        return float(result[1])
    if kind == "vector" and isinstance(result, list):
        if len(result) != 1:
            raise AnalysisError(f"the query gave {len(result)} series, not one")
        return float(result[0]["value"][1])
    raise AnalysisError(f"the query gave a {kind}, not a scalar or a vector of one series")


def fill(query: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        query = query.replace("{{" + name + "}}", value)
    return query


def start(where: str, measurements: list[models.Measurement], now: float) -> models.AnalysisRun:
    at = datetime.fromtimestamp(now, UTC)
    return models.AnalysisRun(
        at=where,
        phase="Running",
        started=at,
        measurements=[models.MeasurementResult(name=m.name, phase="Running") for m in measurements],
    )


@dataclass
class Source:
    """Where a pass takes measurements from."""

    stats: StatsOf
    prometheus: Prometheus
    endpoint: str
    labels: dict[str, str]
    """What {{plugin}}, {{namespace}}, {{color}} and {{version}} in queries become."""
    baselines: dict[str, tuple[float, Stats]]
    """Per measurement name: when its interval began and the reading then (the memory's)."""


async def measure(
    run: models.AnalysisRun, spec: list[models.Measurement], source: Source, now: float
) -> float | None:
    """Take the measurements that are due; seconds until the next one (None: the run ended,
    its phase says how)."""
    by_name = {m.name: m for m in spec}
    due: list[float] = []
    for result in run.measurements:
        metric = by_name.get(result.name)
        if result.phase != "Running" or metric is None:
            continue
        interval = float(metric.interval_seconds)
        if metric.builtin is not None and result.name not in source.baselines:
            try:
                await _reading(result.name, source, now)  # the first interval begins now
            except AnalysisError as e:
                _count(result, metric, math.nan, str(e), now)
            if result.phase == "Running":
                due.append(interval)
            continue
        if metric.builtin is not None:
            began = source.baselines[result.name][0]
        else:
            began = (result.at or run.started).timestamp()
        if began + interval > now:
            due.append(began + interval - now)
            continue
        await _take(result, metric, source, now)
        if result.phase == "Running":
            due.append(interval)
    phases = {r.phase for r in run.measurements}
    if "Failed" in phases:
        run.phase = "Failed"
    elif phases <= {"Successful"}:
        run.phase = "Successful"
    if run.phase != "Running":
        for result in run.measurements:
            source.baselines.pop(result.name, None)
        return None
    return max(0.05, min(due)) if due else 0.05


async def _reading(name: str, source: Source, now: float) -> Stats | None:
    """Read the gateway's counts, starting the next interval of ``name``; the last reading."""
    try:
        stats = await source.stats(source.endpoint)
    except ControllerError as e:
        raise AnalysisError(str(e)) from None
    if stats is None:
        raise AnalysisError(
            "the gateway does not count calls per color (a gateway older than this "
            "controller): run a gateway of this version"
        )
    previous = source.baselines.get(name)
    source.baselines[name] = (now, stats)
    return previous[1] if previous else None


async def _take(
    result: models.MeasurementResult, metric: models.Measurement, source: Source, now: float
) -> None:
    value: float | None
    message = ""
    try:
        if metric.builtin is not None:
            before = await _reading(result.name, source, now)
            delta = source.baselines[result.name][1].since(before) if before else None
            value = delta.value(metric.builtin) if delta is not None else None
        else:
            assert metric.prometheus is not None
            value = await source.prometheus.query(fill(metric.prometheus.query, source.labels))
    except AnalysisError as e:
        value, message = math.nan, str(e)
    _count(result, metric, value, message, now)


def _count(
    result: models.MeasurementResult,
    metric: models.Measurement,
    value: float | None,
    message: str,
    now: float,
) -> None:
    result.at = datetime.fromtimestamp(now, UTC)
    if value is None:
        result.inconclusive += 1
        result.message = "no calls to the new color in the last interval"
        return
    result.measured += 1
    result.value = None if math.isnan(value) else round(value, 6)
    if message or math.isnan(value) or not metric.passes(value):
        result.failures += 1
        result.failed_values = [*result.failed_values[-9:], result.value]
        if message:
            result.message = message
        elif math.isnan(value):
            result.message = f"{metric.name}: no value"
        else:
            result.message = f"{_said(metric, value)} is not {metric.limits}"
    else:
        result.message = None
    if result.failures > metric.failure_limit:
        result.phase = "Failed"
    elif result.measured >= metric.count:
        result.phase = "Successful"


def _said(metric: models.Measurement, value: float) -> str:
    return f"{metric.builtin or 'the query'} {value:g}"


def failed_message(run: models.AnalysisRun, spec: list[models.Measurement]) -> str:
    """Which measurements failed, with their values and limits."""
    by_name = {m.name: m for m in spec}
    parts = []
    for result in run.measurements:
        if result.phase != "Failed":
            continue
        metric = by_name.get(result.name)
        limits = metric.limits if metric else "?"
        values = ", ".join("none" if v is None else f"{v:g}" for v in result.failed_values)
        parts.append(
            f"{result.name} ({metric.builtin if metric and metric.builtin else 'prometheus'}) "
            f"failed {result.failures} of {result.measured} measurements, over its failure "
            f"limit {metric.failure_limit if metric else '?'}: values {values}, wanted "
            f"{limits}" + (f" ({result.message})" if result.value is None else "")
        )
    return f"analysis {run.at}: " + "; ".join(parts)
