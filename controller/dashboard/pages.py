"""The dashboard's HTML, rendered on the server from the admin API's documents.

Every value from a document is escaped (:func:`html.escape`); the pages run no inline
script or style, so the Content-Security-Policy of :mod:`.server` allows only the
package's own ``/static`` files. The sections of a plugin's page that change are also
sent over its live stream, rendered by the same functions (:func:`plugin_sections`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from controller.admin import columns as plugin_columns
from controller.dashboard import charts, history
from controller.registry import catalog
from controller.runtimes import base
from controller.spec import models, quantity, rollout

ACTIONS = ("promote", "abort", "undo", "retry")

GiB = 2**30
MiB = 2**20


def layout(title: str, body: str, *, current: str = "") -> str:
    """A whole page: the navigation, the token field and ``body``."""
    current_mark = ' aria-current="page"'
    links = "".join(
        f'<a href="{href}"{current_mark if current == name else ""}>{label}</a>'
        for name, href, label in (("plugins", "/", "Plugins"), ("catalog", "/catalog", "Catalog"))
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{escape(title)} · Blackhole</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header>
<span class="brand">Blackhole</span>
<nav aria-label="Pages">{links}</nav>
<form class="token" id="token-form" autocomplete="off">
<label for="token">Token</label>
<input id="token" name="token" type="password" placeholder="read-only without one"
 aria-describedby="token-help">
<button type="submit">Use</button>
<span id="token-help" class="help">A gateway token with <code>dashboard: admin</code>
 may act; kept in this tab only.</span>
</form>
</header>
<main id="main">
{body}
</main>
</body>
</html>
"""


def _table(
    caption: str, headers: Sequence[str], rows: Iterable[Sequence[str]], *, empty: str, **attrs: str
) -> str:
    """A table with already-escaped cells, in a box that scrolls on a narrow window."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{escape(empty)}</p>'
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    return (
        f'<div class="scroll" role="region" aria-label="{escape(caption)}" tabindex="0">'
        f"<table{extra}><caption>{escape(caption)}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _age(since: str | None) -> str:
    """How long ago ``since`` was, as ``bhctl get`` says it; the page's script keeps it
    current from the ``datetime``, so a live section is sent again only when its data
    changes."""
    if not since:
        return "-"
    return f'<time datetime="{escape(since)}">{escape(plugin_columns.age(since))}</time>'


def _phase(text: str) -> str:
    kind = text.split(" ", 1)[0].lower()
    return f'<span class="phase {escape(kind)}">{escape(text)}</span>'


# The plugin list.


def plugin_list(listing: dict[str, Any], query: str) -> str:
    items = listing["items"]
    shown = [i for i in items if _matches(i, query)]
    columns = plugin_columns.columns(
        items, False, any(plugin_columns.declared_if_other(i) for i in items)
    )
    rows = []
    for item in shown:
        cells = plugin_columns.row(item, columns)
        name = item["metadata"]["name"]
        key = (
            f"{item['metadata']['namespace']}/{name}" if item["metadata"].get("namespace") else name
        )
        values = []
        for column, cell in zip(columns, cells, strict=True):
            if column == "NAME":
                values.append(f'<a href="/plugins/{quote(key, safe="")}">{escape(cell)}</a>')
            elif column == "PHASE":
                values.append(_phase(cell))
            else:
                values.append(escape(cell))
        rows.append(values)
    errors = "".join(
        f"<li><code>{escape(e['origin'])}</code>: {escape(e['message'])}</li>"
        for e in listing["errors"]
    )
    conditions = listing.get("controller", {}).get("conditions", [])
    return (
        "<h1>Plugins</h1>"
        + (
            '<section aria-labelledby="controller-h"><h2 id="controller-h">Controller</h2>'
            + _conditions(conditions)
            + "</section>"
            if conditions
            else ""
        )
        + '<form class="filter" role="search" method="get" action="/">'
        '<label for="filter">Filter plugins</label>'
        f'<input id="filter" name="q" type="search" value="{escape(query)}" '
        'placeholder="name, phase, version…" data-filter="plugins">'
        '<button type="submit">Filter</button></form>'
        + _table(
            f"{len(shown)} of {len(items)} plugin(s)",
            columns,
            rows,
            empty="No plugins match." if items else "No plugins are declared.",
            id="plugins",
        )
        + (
            f'<section aria-labelledby="errors-h"><h2 id="errors-h">Specs that failed to load'
            f'</h2><ul class="errors">{errors}</ul></section>'
            if errors
            else ""
        )
    )


def _matches(item: dict[str, Any], query: str) -> bool:
    if not query:
        return True
    status = item.get("status") or {}
    text = " ".join(
        str(v)
        for v in (
            item["metadata"]["name"],
            item["metadata"].get("namespace") or "",
            status.get("phase", "Pending"),
            status.get("activeVersion") or "",
            item["spec"].get("version") or "",
            item["spec"].get("image") or "",
            " ".join(item["spec"].get("provides") or []),
        )
    ).lower()
    return all(word in text for word in query.lower().split())


# One plugin.


def plugin_page(
    answer: dict[str, Any],
    revisions: list[dict[str, Any]],
    snapshots: list[dict[str, Any]] | None,
    charts_html: str,
    controller_id: str,
) -> str:
    document = answer["plugin"]
    name = document["metadata"]["name"]
    spec = document["spec"]
    sections = plugin_sections(answer, revisions, charts_html, controller_id)
    key = (
        f"{document['metadata']['namespace']}/{name}"
        if document["metadata"].get("namespace")
        else name
    )
    buttons = "".join(
        f'<button type="button" data-action="{a}" aria-describedby="outcome">{a.title()}</button>'
        for a in ACTIONS
    )
    return (
        f'<h1>{escape(name)} <span id="summary">{sections["summary"]}</span></h1>'
        f'<p class="origin">Declared in <code>{escape(answer["origin"])}</code> · '
        f"image <code>{escape(str(spec.get('image') or spec.get('bundle') or '-'))}</code></p>"
        f'<div class="live" data-live="/plugins/{quote(key, safe="")}/live" '
        f'data-plugin="{escape(key)}">'
        '<section aria-labelledby="swap-h"><h2 id="swap-h">Swap</h2>'
        f'<div id="swap">{sections["swap"]}</div>'
        f'<div class="actions" role="group" aria-label="Swap actions">{buttons}</div>'
        '<p id="outcome" role="status" aria-live="polite"></p></section>'
        '<section aria-labelledby="conditions-h"><h2 id="conditions-h">Conditions</h2>'
        f'<div id="conditions">{sections["conditions"]}</div></section>'
        '<section aria-labelledby="charts-h"><h2 id="charts-h">Resources and pauses</h2>'
        f'<div id="charts" class="charts">{sections["charts"]}</div></section>'
        '<section aria-labelledby="events-h"><h2 id="events-h">Events '
        '<span class="stream" id="stream-state" role="status">connecting…</span></h2>'
        f'<div id="events">{sections["events"]}</div></section>'
        '<section aria-labelledby="state-h"><h2 id="state-h">State snapshots and checkpoints'
        f"</h2>{_snapshots(snapshots, document)}</section>"
        '<section aria-labelledby="revisions-h"><h2 id="revisions-h">Revisions</h2>'
        f'<div id="revisions">{sections["revisions"]}</div></section>'
        "</div>"
    )


def plugin_sections(
    answer: dict[str, Any],
    revisions: list[dict[str, Any]],
    charts_html: str,
    controller_id: str,
) -> dict[str, str]:
    """The parts of a plugin's page that change, by element id."""
    document = answer["plugin"]
    status = document.get("status") or {}
    columns = ["VERSION", "DECLARED", "PHASE", "READY", "ACTIVE"]
    values = dict(zip(columns, plugin_columns.row(document, columns), strict=True))
    summary = (
        _phase(values["PHASE"])
        + f' <span class="version">{escape(values["VERSION"])}</span>'
        + (
            f' <span class="declared">declared {escape(values["DECLARED"])}</span>'
            if values["DECLARED"]
            else ""
        )
    )
    return {
        "summary": summary,
        "swap": swap_tree(document, revisions, controller_id),
        "conditions": _conditions(status.get("conditions", [])),
        "events": _events(answer["events"]),
        "charts": charts_html,
        "revisions": _revisions(revisions),
    }


def allowed_actions(document: dict[str, Any]) -> dict[str, bool]:
    """Which swap actions apply now (the admin API refuses the others)."""
    status = document.get("status") or {}
    swap = status.get("swap")
    last = status.get("lastSwap") or {}
    return {
        "promote": swap is not None and swap.get("step") != "Promoted",
        "abort": swap is not None,
        "undo": swap is None and last.get("result") == "Promoted" and bool(last.get("fromHash")),
        "retry": swap is None and bool(last) and last.get("result") != "Promoted",
    }


def swap_tree(document: dict[str, Any], revisions: list[dict[str, Any]], controller_id: str) -> str:
    """The plugin's revisions that have instances, each with its color, the share of calls
    it takes, its instances (one per replica) and the analyses run on it, marked active
    (serves calls), preview (a swap's new color, not yet promoted) or canary (taking its
    weight of the calls)."""
    status = document.get("status") or {}
    swap = status.get("swap")
    found = rollout.branches(status, revisions)
    if not found:
        return '<p class="empty">No instance runs.</p>'
    metadata = document["metadata"]
    drawn = []
    for branch in found:
        label = f"revision {branch.revision}" if branch.revision is not None else "revision -"
        badges = "".join(f' <span class="mark {m}">{escape(m)}</span>' for m in branch.marks)
        children = []
        for instance in branch.instances:
            name = base.instance_name(
                metadata["name"],
                models.Color(branch.color),
                metadata.get("namespace"),
                controller_id,
                int(instance.get("replica") or 0),
            )
            state = [
                escape(instance.get("state", "?")),
                "ready" if instance.get("ready") else "not ready",
            ]
            if instance.get("restarts"):
                state.append(f"{int(instance['restarts'])} restart(s)")
            if instance.get("oomKilled"):
                state.append("OOM-killed")
            children.append(
                f'<li><span class="node">instance <code>{escape(name)}</code>: '
                f"{', '.join(state)}</span></li>"
            )
        for run in branch.analyses:
            measured = "".join(
                f"<li>{escape(rollout.measurement(m))}</li>" for m in run.get("measurements", [])
            )
            children.append(
                f'<li data-analysis="{escape(str(run.get("at", "")))}"><span class="node">'
                f"analysis {escape(str(run.get('at', '')))}: "
                f'<strong data-phase="{escape(str(run.get("phase", "")))}">'
                f"{escape(str(run.get('phase', '')))}</strong></span>"
                + (f"<ul>{measured}</ul>" if measured else "")
                + "</li>"
            )
        drawn.append(
            f'<li data-color="{escape(branch.color)}" data-weight="{branch.weight}">'
            f'<span class="node">{escape(label)} · '
            f'<span class="color {escape(branch.color)}">{escape(branch.color)}</span> · '
            f"{escape(branch.version)} · {branch.weight}% of calls{badges}</span>"
            f"<ul>{''.join(children)}</ul></li>"
        )
    step = ""
    if swap is not None:
        since = _age(swap.get("started"))
        step = (
            f'<p class="step">Swap {escape(swap.get("fromVersion", "?"))} → '
            f'{escape(swap.get("toVersion", "?"))}: <strong data-step="{escape(swap["step"])}">'
            f"{escape(swap['step'])}</strong> for {since}"
            + (
                f', <span data-weight="{int(swap["weight"])}">{int(swap["weight"])}% of calls '
                "to the new color</span>"
                if swap.get("weight") is not None
                else ""
            )
            + "</p>"
        )
    last = status.get("lastSwap")
    ended = ""
    if last:
        pause = last.get("pauseMilliseconds")
        held = f", calls held {pause:.1f} ms" if isinstance(pause, int | float) else ""
        reason = f" ({escape(last['reason'])})" if last.get("reason") else ""
        when = f" · {_age(last['time'])} ago" if last.get("time") else ""
        ended = (
            f'<p class="last">Last swap {escape(str(last.get("from")))} → '
            f'{escape(str(last.get("to")))}: <strong data-result="{escape(last["result"])}">'
            f"{escape(last['result'])}</strong>{reason}{held}"
            f"{when}</p>"
        )
    restore = status.get("lastRestore")
    restored = (
        f'<p class="last">Checkpoint {int(restore["checkpoint"])} restored into '
        f"<code>{escape(restore['instance'])}</code> "
        f"({_age(restore['time'])} ago; it was "
        f"{float(restore['ageSeconds']):.0f} s old)</p>"
        if restore
        else ""
    )
    return (
        step
        + f'<ul class="tree" aria-label="Revisions, colors and instances">{"".join(drawn)}</ul>'
        + ended
        + restored
    )


def _conditions(conditions: list[dict[str, Any]]) -> str:
    return _table(
        "Conditions",
        ["Type", "Status", "Reason", "Age", "Message"],
        (
            [
                escape(c["type"]),
                f'<span class="status-{escape(str(c["status"]).lower())}">'
                f"{escape(str(c['status']))}</span>",
                escape(c.get("reason", "")),
                _age(c.get("lastTransitionTime")),
                escape(c.get("message", "")),
            ]
            for c in conditions
        ),
        empty="No conditions yet.",
    )


def _events(events: list[dict[str, Any]]) -> str:
    return _table(
        "Events, newest first",
        ["Type", "Reason", "Age", "Count", "Message"],
        (
            [
                f'<span class="event-{escape(e["type"].lower())}">{escape(e["type"])}</span>',
                escape(e["reason"]),
                _age(e["lastTimestamp"]),
                str(int(e["count"])),
                escape(e["message"]),
            ]
            for e in reversed(events)
        ),
        empty="No events yet.",
        id="event-log",
    )


def _revisions(revisions: list[dict[str, Any]]) -> str:
    return _table(
        "Revisions, newest first",
        ["Revision", "Version", "Result", "Reason", "Created"],
        (
            [
                str(int(r["revision"])),
                escape(str(r["version"])),
                escape(r["result"]),
                escape(r.get("reason") or ""),
                _age(r["createdAt"]) + " ago",
            ]
            for r in reversed(revisions)
        ),
        empty="No revisions kept.",
    )


def _snapshots(snapshots: list[dict[str, Any]] | None, document: dict[str, Any]) -> str:
    if snapshots is None:
        return '<p class="empty">This controller keeps no state snapshots.</p>'
    if document["spec"].get("state") is None and not snapshots:
        return '<p class="empty">This plugin declares no state.</p>'
    return _table(
        "Snapshots, newest first",
        ["Id", "Kind", "Plugin version", "State version", "Size", "Taken"],
        (
            [
                str(int(s["id"])),
                escape(s["reason"]) + (" (delta)" if s.get("delta") else ""),
                escape(str(s["pluginVersion"])),
                str(int(s["stateVersion"])),
                escape(_bytes(s["size"])),
                _age(s["takenAt"]) + " ago",
            ]
            for s in reversed(snapshots)
        ),
        empty="No snapshot taken yet.",
    )


def charts_for(document: dict[str, Any], kept: history.History) -> str:
    """CPU and memory of each color against the spec's limits, and the swap pauses."""
    metadata = document["metadata"]
    key = (
        f"{metadata['namespace']}/{metadata['name']}"
        if metadata.get("namespace")
        else metadata["name"]
    )
    spec = document["spec"]
    usage = kept.usage_of(key)
    resources = spec.get("resources") or {}
    cpu_limit = float(quantity.parse(str(resources.get("cpu", "500m"))))
    memory = {c: [(u.time, u.memory_bytes / MiB) for u in s] for c, s in usage.items()}
    limits = [u.memory_limit_bytes for s in usage.values() for u in s if u.memory_limit_bytes]
    memory_limit = (
        limits[-1] / MiB
        if limits
        else float(quantity.parse(str(resources.get("memory", "128Mi")))) / MiB
    )
    pauses = kept.pauses_of(key)
    bound = float((spec.get("hotSwap") or {}).get("maxPauseMilliseconds", 200))
    return (
        "<figure><figcaption>CPU (cores)</figcaption>"
        + charts.lines(
            "CPU in cores",
            {c: [(u.time, u.cpu_cores) for u in s] for c, s in usage.items()},
            limit=cpu_limit,
            unit=" cores",
        )
        + "</figure><figure><figcaption>Memory working set (MiB)</figcaption>"
        + charts.lines("Memory in MiB", memory, limit=memory_limit, unit=" MiB")
        + "</figure><figure><figcaption>Swap pauses (ms)</figcaption>"
        + charts.dots(
            "Calls held at each swap, in milliseconds",
            [(p.time, p.milliseconds, p.result == "Promoted") for p in pauses],
            bound=bound,
        )
        + "</figure>"
    )


def _bytes(size: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


# The catalog.


def catalog_page(found: list[tuple[int, catalog.Entry]] | None, query: str) -> str:
    form = (
        '<form class="filter" role="search" method="get" action="/catalog">'
        '<label for="catalog-q">Search the catalog</label>'
        f'<input id="catalog-q" name="q" type="search" value="{escape(query)}" '
        'placeholder="capability, author, category, words…">'
        '<button type="submit">Search</button></form>'
    )
    if found is None:
        return "<h1>Catalog</h1>" + form + '<p class="empty">This controller has no registry.</p>'
    rows = [
        [
            escape(e.name),
            escape(str(e.version)),
            escape(e.category),
            escape(", ".join(e.provides)),
            escape(e.author),
            escape(e.description.splitlines()[0] if e.description else ""),
            escape(e.key_id or "unsigned"),
        ]
        for _, e in found
    ]
    return (
        "<h1>Catalog</h1>"
        + form
        + _table(
            f"{len(rows)} bundle(s)" + (f" matching “{query}”" if query else ""),
            ["Name", "Version", "Category", "Provides", "Author", "Description", "Signed by"],
            rows,
            empty="No bundle matches." if query else "No bundle is installed.",
            id="catalog",
        )
    )


def error_page(status: int, message: str) -> str:
    return f'<h1>{status}</h1><p class="error">{escape(message)}</p><p><a href="/">Plugins</a></p>'
