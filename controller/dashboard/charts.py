"""Small charts as inline SVG: lines of values over time against a limit, and dots of swap
pauses against their bound. Each chart has a title and a description for screen readers;
the page shows the latest numbers beside it in text (see :mod:`.pages`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

WIDTH = 320
HEIGHT = 110
PAD = 4

Point = tuple[float, float]
"""(time in seconds, value)."""


def lines(
    title: str,
    series: Mapping[str, Sequence[Point]],
    *,
    limit: float | None = None,
    unit: str = "",
) -> str:
    """Each series (by name, e.g. a color) as a line over the same time axis, with ``limit``
    as a dashed line; the value axis starts at 0 and reaches the limit or the largest
    value."""
    points = [p for s in series.values() for p in s]
    if not points:
        return _empty(title)
    top = max([*(v for _, v in points), limit or 0.0]) or 1.0
    start = min(t for t, _ in points)
    end = max(t for t, _ in points)
    span = (end - start) or 1.0

    def x(t: float) -> float:
        return PAD + (t - start) / span * (WIDTH - 2 * PAD)

    def y(v: float) -> float:
        return HEIGHT - PAD - v / (top * 1.05) * (HEIGHT - 2 * PAD)

    parts = []
    if limit is not None:
        parts.append(
            f'<line class="limit" x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(limit):.1f}" '
            f'y2="{y(limit):.1f}"><title>limit {_number(limit)}{escape(unit)}</title></line>'
        )
    for name, values in series.items():
        if len(values) == 1:
            t, v = values[0]
            parts.append(
                f'<circle class="series {escape(name)}" cx="{x(t):.1f}" cy="{y(v):.1f}" r="2"/>'
            )
            continue
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in values)
        parts.append(f'<polyline class="series {escape(name)}" points="{path}"/>')
    latest = ", ".join(
        f"{name} {_number(values[-1][1])}{unit}" for name, values in series.items() if values
    )
    bound = f"; limit {_number(limit)}{unit}" if limit is not None else ""
    return _svg(title, f"latest: {latest}{bound}", "".join(parts))


def dots(title: str, values: Sequence[tuple[float, float, bool]], *, bound: float) -> str:
    """Each swap's pause (time, milliseconds, promoted) as a dot, a rolled-back one hollow,
    with ``bound`` (``maxPauseMilliseconds``) as a dashed line."""
    if not values:
        return _empty(title)
    top = max([*(v for _, v, _ in values), bound]) or 1.0
    count = len(values)
    step = (WIDTH - 2 * PAD) / max(count, 1)
    parts = [
        f'<line class="limit" x1="{PAD}" x2="{WIDTH - PAD}" y1="{_y(bound, top):.1f}" '
        f'y2="{_y(bound, top):.1f}"><title>bound {_number(bound)} ms</title></line>'
    ]
    for index, (_, value, promoted) in enumerate(values):
        cx = PAD + step * (index + 0.5)
        kind = "promoted" if promoted else "rolled-back"
        parts.append(
            f'<circle class="pause {kind}" cx="{cx:.1f}" cy="{_y(value, top):.1f}" r="4">'
            f"<title>{_number(value)} ms, {kind}</title></circle>"
        )
    last = values[-1][1]
    return _svg(
        title,
        f"{count} swap(s); the last held calls {_number(last)} ms; bound {_number(bound)} ms",
        "".join(parts),
    )


def _y(value: float, top: float) -> float:
    return HEIGHT - PAD - value / (top * 1.05) * (HEIGHT - 2 * PAD)


def _svg(title: str, description: str, body: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}: {escape(description)}">'
        f"<title>{escape(title)}</title><desc>{escape(description)}</desc>"
        f'<rect class="frame" x="0.5" y="0.5" width="{WIDTH - 1}" height="{HEIGHT - 1}"/>'
        f"{body}</svg>"
        f'<p class="chart-note">{escape(description)}</p>'
    )


def _empty(title: str) -> str:
    return f'<p class="chart-note">{escape(title)}: no readings yet.</p>'


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"
