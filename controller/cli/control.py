"""``bhctl`` commands that talk to a running controller through its admin socket: apply,
diff, get, describe, delete, logs, top, call and down.

They import the admin client, the standard library and typer/rich only (see
:mod:`controller.cli.main`): each answers in about the time Python takes to start.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from controller.admin import client as admin_client
from controller.admin import columns as plugin_columns
from controller.cli import flags, output, paths
from controller.errors import ControllerError

WATCH_SECONDS = 1.0
"""How often ``get -w`` and ``logs -f`` ask the controller again."""
FOLLOW_WINDOW = 5000
"""Lines ``logs -f`` asks for each time: more written between two asks are skipped."""


def client(data_dir: Path | None, timeout: float = 30.0) -> admin_client.AdminClient:
    return admin_client.AdminClient(
        paths.admin_socket(data_dir or paths.default_data_dir()), timeout
    )


def fail(e: ControllerError) -> typer.Exit:
    output.error(str(e))
    return typer.Exit(1)


# apply, diff, delete: the files given, as validate takes them.


def _spec_files(files: list[Path]) -> Iterator[tuple[str, bytes]]:
    """``(origin, text)`` of each file: ``-`` is stdin; a directory gives its YAML files."""
    for path in files:
        if str(path) == "-":
            yield "<stdin>", sys.stdin.buffer.read()
            continue
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"})
            if not found:
                output.fail(f"{path}: no .yaml or .yml files in it")
            for item in found:
                yield from _spec_files([item])
            continue
        try:
            yield str(path), path.read_bytes()  # decoded and checked by the controller
        except OSError as e:
            output.fail(f"{path}: {e.strerror or e}")


FILES = typer.Option(
    ...,
    "--filename",
    "-f",
    help="Spec file, directory of them (every .yaml/.yml) or - for stdin; repeat for more.",
)


def apply(
    files: list[Path] = FILES,
    fmt: flags.Format = flags.output(flags.Format.TEXT, flags.Format.TEXT, flags.Format.NAME),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Apply specs to the running controller (kept in its data directory).

    Each plugin is reported created, configured or unchanged, as kubectl does.
    """
    flags.check_format(fmt, flags.Format.TEXT, flags.Format.NAME)
    admin = client(data_dir)
    for origin, text in _spec_files(files):
        try:
            answer = admin.apply(text, origin)
        except ControllerError as e:
            raise fail(e) from None
        for item in answer["applied"]:
            if fmt is flags.Format.NAME:
                output.out.print(f"plugin/{item['name']}")
                continue
            change = item.get("change", "configured")
            shown = "unchanged" if change == "unchanged" else f"{change}"
            output.out.print(
                f"plugin/{escape(item['name'])} {shown} (generation {item['generation']})"
            )


def diff(
    files: list[Path] = FILES,
    fmt: flags.Format = flags.output(flags.Format.TEXT, flags.Format.TEXT, flags.Format.JSON),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Say what applying specs would do, applying nothing: for each plugin whether it would be
    created, left unchanged, updated in place, swapped blue/green or replaced, and which
    fields differ. Exits 0 when nothing would change, 1 when something would (as kubectl
    diff does), 2 on an error."""
    flags.check_format(fmt, flags.Format.TEXT, flags.Format.JSON)
    admin = client(data_dir)
    changes: list[dict[str, Any]] = []
    for origin, text in _spec_files(files):
        try:
            changes += admin.apply(text, origin, dry_run=True)["changes"]
        except ControllerError as e:
            output.error(str(e))
            raise typer.Exit(2) from None
    if fmt is flags.Format.JSON:
        output.document({"changes": changes}, "json")
    else:
        for change in changes:
            output.out.print(
                f"plugin/{escape(change['name'])}: {escape(change['change'])}"
                + (f" ({escape(change['why'])})" if change.get("why") else "")
            )
            for field in change.get("fields", []):
                output.out.print(
                    f"  {escape(field['path'])}: {escape(_shown(field.get('from')))} -> "
                    f"{escape(_shown(field.get('to')))}"
                )
    if any(c["change"] != "unchanged" for c in changes):
        raise typer.Exit(1)


def _shown(value: object) -> str:
    return "(none)" if value is None else json.dumps(value)


def delete(
    name: str | None = typer.Argument(None, help="The plugin (or give -f)."),
    files: list[Path] | None = typer.Option(
        None, "--filename", "-f", help="Delete the plugins these spec files declare."
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Delete applied plugins: their instances and networks go; named volumes stay."""
    names = [name] if name else []
    for origin, text in _spec_files(files or []):
        names += _declared_names(origin, text)
    if not names:
        output.fail("name a plugin, or give -f FILE")
    admin = client(data_dir)
    failed = False
    for each in names:
        try:
            admin.delete(each)
        except ControllerError as e:
            output.error(str(e))
            failed = True
            continue
        output.out.print(f"plugin/{escape(each)} deleted")
    if failed:
        raise typer.Exit(1)


def _declared_names(origin: str, text: bytes) -> list[str]:
    """The plugin keys (``namespace/name``, or ``name``) a spec file declares."""
    import yaml

    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        output.fail(f"{origin}: not YAML: {e}")
    names = []
    for document in documents:
        metadata = document.get("metadata") if isinstance(document, dict) else None
        if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
            output.fail(f"{origin}: a document without metadata.name")
        namespace = metadata.get("namespace")
        names.append(f"{namespace}/{metadata['name']}" if namespace else metadata["name"])
    return names


# get, describe


def age(since: str | None) -> str:
    return plugin_columns.age(since)


def _fetch(
    admin: admin_client.AdminClient, name: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    if name is None:
        answer = admin.list()
        conditions = (answer.get("controller") or {}).get("conditions", [])
        return answer["items"], answer["errors"], conditions
    return [admin.get(name)["plugin"]], [], []


def get(
    name: str | None = typer.Argument(None, help="One plugin (default: all)."),
    fmt: flags.Format = flags.output(
        flags.Format.TABLE,
        flags.Format.TABLE,
        flags.Format.WIDE,
        flags.Format.JSON,
        flags.Format.YAML,
        flags.Format.NAME,
    ),
    no_headers: bool = typer.Option(False, "--no-headers", help="Tables without the header."),
    watch: bool = typer.Option(
        False,
        "--watch",
        "-w",
        help="After the list, print each change as it happens (Ctrl-C); with NAME, its "
        "rollout as a tree (revisions, colors, weights, analyses), redrawn as it changes.",
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """List plugins with their status."""
    flags.check_format(
        fmt,
        flags.Format.TABLE,
        flags.Format.WIDE,
        flags.Format.JSON,
        flags.Format.YAML,
        flags.Format.NAME,
    )
    admin = client(data_dir)
    if name is not None and watch and fmt in {flags.Format.TABLE, flags.Format.WIDE}:
        _watch_tree(admin, name)
        return
    try:
        items, errors, controller_conditions = _fetch(admin, name)
    except ControllerError as e:
        raise fail(e) from None
    tabular = fmt in {flags.Format.TABLE, flags.Format.WIDE}
    columns = plugin_columns.columns(
        items,
        fmt is flags.Format.WIDE,
        # a watch keeps its columns
        watch or any(plugin_columns.declared_if_other(i) for i in items),
    )
    widths = [len(c) for c in columns]
    if tabular:
        rows = [plugin_columns.row(item, columns) for item in items]
        widths = [max([widths[i], *(len(r[i]) for r in rows)]) + 2 for i in range(len(columns))]
        if not items and not watch:
            output.err.print("No resources found")
        else:
            if not no_headers:
                _line(columns, widths)
            for row in rows:
                _line(row, widths)
    elif fmt is flags.Format.NAME:
        for item in items:
            sys.stdout.write(f"plugin/{item['metadata']['name']}\n")
    elif watch:
        for item in items:
            output.document(item, fmt.value)
    else:
        document: Any = items[0] if name else {"apiVersion": "v1", "kind": "List", "items": items}
        output.document(document, fmt.value)
    for error in errors:
        output.warn(f"{error['origin']}: {error['message']}")
    for condition in controller_conditions:  # the controller's own stores
        output.err.print(
            f"[red]controller[/]: {condition['type']} ({condition['reason']}): "
            f"{escape(condition.get('message', ''))}"
        )
    if watch:
        _watch(admin, name, fmt, columns, widths, items)


def _watch_tree(admin: admin_client.AdminClient, name: str) -> None:
    """Draw ``name``'s rollout tree, again at each change, until Ctrl-C (exit 0) or until
    the plugin is deleted."""
    from controller.cli import tree

    drawn: list[str] = []
    try:
        while True:
            try:
                plugin = admin.get(name)["plugin"]
                revisions = admin.revisions(name)["revisions"]
            except admin_client.AdminError as e:
                if e.status != 404 or not drawn:
                    raise fail(e) from None
                sys.stdout.write(f"plugin {name} deleted\n")
                return
            except ControllerError as e:
                raise fail(e) from None
            lines = tree.rollout(plugin, revisions)
            if lines != drawn:
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place, as a watch does
                elif drawn:
                    sys.stdout.write("\n")
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
                drawn = lines
            time.sleep(WATCH_SECONDS)
    except KeyboardInterrupt:
        return


def _line(cells: list[str], widths: list[int]) -> None:
    text = "".join(c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True))
    sys.stdout.write(text + cells[-1] + "\n")
    sys.stdout.flush()


def _watch(
    admin: admin_client.AdminClient,
    name: str | None,
    fmt: flags.Format,
    columns: list[str],
    widths: list[int],
    items: list[dict[str, Any]],
) -> None:
    """Print each plugin whose shown state changed, until Ctrl-C (exit 0)."""
    watched = [c for c in columns if c != "AGE"]  # an age changes by itself

    def seen(documents: list[dict[str, Any]]) -> dict[str, Any]:
        if fmt in {flags.Format.TABLE, flags.Format.WIDE, flags.Format.NAME}:
            return {d["metadata"]["name"]: plugin_columns.row(d, watched) for d in documents}
        return {d["metadata"]["name"]: d.get("status") for d in documents}

    last = seen(items)
    try:
        while True:
            time.sleep(WATCH_SECONDS)
            try:
                items = _fetch(admin, name)[0]
            except admin_client.AdminError as e:
                if e.status != 404:
                    raise fail(e) from None
                items = []  # the one plugin watched is gone
            except ControllerError as e:
                raise fail(e) from None
            now = seen(items)
            for item in items:
                key = item["metadata"]["name"]
                if last.get(key) == now[key]:
                    continue
                if fmt is flags.Format.NAME:
                    sys.stdout.write(f"plugin/{key}\n")
                    sys.stdout.flush()
                elif fmt in {flags.Format.TABLE, flags.Format.WIDE}:
                    _line(plugin_columns.row(item, columns), widths)
                else:
                    output.document(item, fmt.value)
            for key in set(last) - set(now):
                if fmt in {flags.Format.TABLE, flags.Format.WIDE}:
                    cells = [key if c == "NAME" else "-" for c in columns]
                    cells[columns.index("PHASE")] = "Deleted"
                    _line(cells, widths)
                elif fmt is flags.Format.NAME:
                    sys.stdout.write(f"plugin/{key} deleted\n")
                    sys.stdout.flush()
            last = now
    except KeyboardInterrupt:
        return


def describe(name: str = typer.Argument(...), data_dir: Path | None = flags.DATA_DIR) -> None:
    """Show one plugin: spec, status, conditions, instances and events."""
    try:
        answer = client(data_dir).get(name)
    except ControllerError as e:
        raise fail(e) from None
    out = output.out
    plugin, status = answer["plugin"], answer["plugin"].get("status") or {}
    spec = plugin["spec"]
    resources = spec.get("resources", {})
    out.print(f"Name:        {escape(plugin['metadata']['name'])}")
    out.print(f"Declared in: {escape(answer['origin'])}")
    if "bundle" in spec:
        out.print(f"Bundle:      {escape(spec['bundle'])}")
    out.print(f"Image:       {escape(spec.get('image', '(from the bundle)'))}")
    out.print(f"Version:     {spec.get('version', status.get('activeVersion', '-'))}")
    out.print(
        f"Resources:   cpu {resources.get('cpu')}, memory {resources.get('memory')}, "
        f"pids {resources.get('pids')}"
    )
    out.print(f"Network:     {spec.get('permissions', {}).get('network', 'none')}")
    out.print(
        f"Phase:       {status.get('phase', 'Pending')} "
        f"(generation {plugin['metadata'].get('generation')}, observed "
        f"{status.get('observedGeneration', '-')})"
    )
    if swap := status.get("swap"):
        out.print(
            f"Swap:        {swap['fromVersion']} ({swap['fromColor']}) -> "
            f"{swap['toVersion']} ({swap['toColor']}): {swap['step']}"
        )
    if last := status.get("lastSwap"):
        pause = last.get("pauseMilliseconds")
        out.print(
            f"Last swap:   {last['from']} -> {last['to']}: {last['result']}"
            + (f" ({last['reason']})" if last.get("reason") else "")
            + (f", calls held {pause} ms" if pause is not None else "")
        )
    out.print("\nConditions:")
    output.rows(
        ["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
        (
            [c["type"], c["status"], c["reason"], age(c["lastTransitionTime"]), c.get("message")]
            for c in status.get("conditions", [])
        ),
    )
    out.print("\nInstances:")
    instances = []
    for i in status.get("instances", []):
        code = i.get("lastExitCode")
        last_exit = "-" if code is None else str(code) + (" OOM" if i.get("oomKilled") else "")
        instances.append(
            [
                i["color"] + (f"-{i['replica']}" if i.get("replica") else ""),
                i["version"],
                i["state"],
                str(i.get("ready", False)),
                str(i.get("restarts", 0)),
                last_exit,
            ]
        )
    output.rows(["COLOR", "VERSION", "STATE", "READY", "RESTARTS", "LAST EXIT"], instances)
    out.print("\nEvents:")
    output.rows(
        ["TYPE", "REASON", "AGE", "COUNT", "MESSAGE"],
        (
            [e["type"], e["reason"], age(e["lastTimestamp"]), str(e["count"]), e["message"]]
            for e in answer["events"]
        ),
    )


# logs


def new_lines(before: list[str], now: list[str], full: bool) -> list[str]:
    """The lines of ``now`` not in ``before``, two reads of the end of one log.

    While the log fits the window (``full`` false: fewer lines came than asked for)
    ``now`` starts with ``before``; past it, the window moved on: ``now`` starts with
    the end of ``before``; neither (a new instance, or more written than the window
    between the reads), every line of ``now`` is new.
    """
    if not full and now[: len(before)] == before:
        return now[len(before) :]
    for start in range(len(before)):  # the window moved on by ``start`` lines
        kept = before[start:]
        if now[: len(kept)] == kept:
            return now[len(kept) :]
    return now


def logs(
    name: str | None = typer.Argument(None, help="The plugin (default: every plugin)."),
    color: str | None = typer.Option(
        None, "--color", help="The instance: blue or green (default: the active one)."
    ),
    previous: bool = typer.Option(
        False,
        "--previous",
        "-p",
        help="The instance before the active one (the other color), while the runtime keeps it.",
    ),
    replica: int = typer.Option(
        0,
        "--replica",
        min=0,
        help="Which of the color's instances (spec.replicas), from 0 (the default).",
    ),
    tail: int = typer.Option(100, "--tail", min=0, help="Lines to show first."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Then print new lines as they are written (Ctrl-C)."
    ),
    timestamps: bool = typer.Option(
        False,
        "--timestamps",
        help="Start each line with the time the runtime read it from the instance (RFC 3339, "
        "UTC): the engine's own on Docker, Podman and Kubernetes; on processes, the time the "
        "instance's shim read it from the plugin's output.",
    ),
    prefix: bool | None = typer.Option(
        None,
        "--prefix/--no-prefix",
        help="Start each line with its plugin's name (default: with several plugins).",
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Print what a plugin's instance wrote; without a name, every plugin's, each line
    prefixed with its name."""
    if color is not None and previous:
        raise typer.BadParameter("give --color or --previous, not both", param_hint="--previous")
    admin = client(data_dir)
    try:
        names = [name] if name else [i["metadata"]["name"] for i in admin.list()["items"]]
    except ControllerError as e:
        raise fail(e) from None
    width = max((len(n) for n in names), default=0)
    shown = prefix if prefix is not None else name is None
    seen: dict[str, list[str]] = {}

    def read(each: str, lines: int, first: bool) -> None:
        try:
            got = admin.logs(each, color, lines, previous, timestamps, replica)["lines"]
        except admin_client.AdminError as e:
            if first and name is not None:
                raise fail(e) from None
            if first:
                output.warn(f"{each}: {e}")
            return
        except ControllerError as e:
            raise fail(e) from None
        fresh = got if first else new_lines(seen.get(each, []), got, len(got) >= lines)
        seen[each] = got
        head = f"{each.ljust(width)} | " if shown else ""
        for line in fresh:
            sys.stdout.write(head + line + "\n")
        sys.stdout.flush()

    for each in names:
        read(each, tail, True)
    if not follow:
        return
    try:
        while True:
            time.sleep(WATCH_SECONDS / 2)
            for each in names:
                read(each, FOLLOW_WINDOW, False)
    except KeyboardInterrupt:
        return


# top


def top(
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until Ctrl-C."),
    interval: float = typer.Option(2.0, "--interval", min=0.5, help="Seconds between refreshes."),
    no_headers: bool = typer.Option(False, "--no-headers", help="The table without its header."),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """The plugins' resource use, read from their cgroups (as /metrics is)."""
    admin = client(data_dir)
    columns = ["PLUGIN", "COLOR", "VERSION", "CPU", "MEMORY", "LIMIT", "MEM%", "PIDS",
               "NET RX/TX", "DISK R/W"]  # fmt: skip

    def grid() -> Any:
        table = output.table(*columns, headers=not no_headers)
        for row in admin.top()["instances"]:
            limit = row["memoryLimitBytes"]
            share = f"{row['memoryWorkingSetBytes'] / limit:.0%}" if limit else "-"
            table.add_row(
                *(
                    escape(c)
                    for c in [
                        (f"{row['namespace']}/" if row["namespace"] else "") + row["plugin"],
                        row["color"],
                        row["version"],
                        f"{row['cpuCores'] * 1000:.0f}m",
                        _bytes(row["memoryWorkingSetBytes"]),
                        _bytes(limit) if limit else "-",
                        share,
                        str(row["pids"]),
                        f"{_bytes(row['networkReceiveBytes'])}/"
                        f"{_bytes(row['networkTransmitBytes'])}",
                        f"{_bytes(row['fsReadBytes'])}/{_bytes(row['fsWriteBytes'])}",
                    ]
                )
            )
        return table

    try:
        if not watch:
            output.out.print(grid())
            return
        from rich.live import Live

        with Live(grid(), console=output.console(), refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(grid())
    except ControllerError as e:
        raise fail(e) from None
    except KeyboardInterrupt:
        return


def _bytes(value: float) -> str:
    for unit in ("B", "Ki", "Mi", "Gi"):
        if value < 1024 or unit == "Gi":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}Gi"


# call


def call(
    name: str = typer.Argument(..., help="The plugin."),
    method: str = typer.Argument(..., help="The method to call."),
    data: str = typer.Option(
        "", "--data", "-d", help="The payload: JSON, or @FILE to read it from a file."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", min=0.001, help="Seconds (at most the plugin's own timeout)."
    ),
    gateway: str | None = typer.Option(
        None,
        "--gateway",
        envvar="BLACKHOLE_GATEWAY",
        help="The gateway's HOST:PORT (default: what the running controller says).",
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="BLACKHOLE_TOKEN", help="Bearer token, when the gateway asks."
    ),
    preview: bool = typer.Option(
        False,
        "--preview",
        help="Call the new color of the plugin's swap before promotion, never the active one "
        "(a token with preview: true, when the gateway asks for tokens).",
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Call a plugin through the gateway and print its answer."""
    import urllib.error
    import urllib.parse
    import urllib.request

    payload = data.encode()
    if data.startswith("@"):
        try:
            payload = Path(data[1:]).read_bytes()
        except OSError as e:
            raise typer.BadParameter(f"{data[1:]}: {e.strerror}", param_hint="--data") from None
    if payload:
        try:
            json.loads(payload)
        except ValueError as e:
            raise typer.BadParameter(f"not JSON: {e}", param_hint="--data") from None
    address = gateway or paths.gateway_address(data_dir or paths.default_data_dir())
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if timeout is not None:
        headers["X-Timeout-Seconds"] = f"{timeout:g}"
    if preview:
        headers["X-Blackhole-Preview"] = "true"
    url = (
        f"http://{address}/v1/plugins/{urllib.parse.quote(name)}/call/{urllib.parse.quote(method)}"
    )
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=(timeout or 30) + 5) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        answer = e.read()
        try:
            problem = json.loads(answer)
            message = f"{problem['error']} ({e.code} {problem.get('reason', '')})"
        except (ValueError, KeyError, TypeError):
            message = f"{e.code} {answer.decode(errors='replace')}"
        output.fail(message)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        output.fail(f"cannot reach the gateway at {address}: {reason}")
    try:
        print(json.dumps(json.loads(body), indent=2) if body else "")
    except ValueError:
        sys.stdout.buffer.write(body)


# down

DOWN_TIMEOUT = 600.0
"""Seconds ``down`` waits for the controller to finish its passes and remove what runs."""
EXIT_TIMEOUT = 60.0
"""Seconds ``down`` then waits for the controller's process to exit."""


def down(
    volumes: bool = typer.Option(
        False, "--volumes", "-v", help="Remove the plugins' named volumes too (their data)."
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Tear down what bhctl run started on the data directory: every instance the controller
    runs and their networks are removed (named volumes only with --volumes), the gateway it
    runs is stopped, then the controller. Specs and state snapshots stay: bhctl run starts
    the plugins again."""
    admin = client(data_dir, timeout=DOWN_TIMEOUT)
    try:
        answer = admin.down(volumes)
    except ControllerError as e:
        raise fail(e) from None
    for name in answer["instances"]:
        output.out.print(f"instance/{escape(name)} removed")
    for name in answer.get("volumes") or []:
        output.out.print(f"volume/{escape(name)} removed")
    if answer.get("volumes") is None:
        output.out.print("volumes kept (remove them with bhctl down --volumes)")
    gateway = answer["gateway"]
    if gateway["mode"] == "process":
        pid = gateway.get("pid")
        output.out.print(f"gateway stopped (pid {pid})" if pid else "no gateway was running")
    elif gateway["mode"] == "external":
        output.out.print(
            "gateway left running: it was started apart (stop it: bhctl gateway --stop)"
        )
    pid = int(answer["controller"]["pid"])
    if not _exited(pid, EXIT_TIMEOUT):
        output.fail(f"the controller (pid {pid}) has not exited after {EXIT_TIMEOUT:g}s")
    output.out.print(f"controller stopped (pid {pid})")


def _exited(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited within ``timeout`` seconds (a zombie has: its
    parent has yet to reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def register(app: typer.Typer) -> None:
    """Add these commands to ``app``, in the order ``--help`` lists them."""
    for command in (apply, diff, get, describe, delete, logs, top, call, down):
        app.command(command.__name__)(command)
