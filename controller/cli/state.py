"""``bhctl state``: a plugin's state snapshots, through the running controller's admin socket:
history, export (to a file or stdout) and import.

An export is a JSON document that carries, beside the state's bytes, the
state version they are in, the plugin and version they came from and their
sha256; ``state import`` reads the version from it. Raw bytes (``--raw``, or
a file from elsewhere) are imported with ``--state-version``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from controller.cli import control, flags, output
from controller.errors import ControllerError

app = typer.Typer(help="Plugins' state snapshots: history, export, import.", no_args_is_help=True)

KIND = "PluginStateExport"
API_VERSION = "blackhole.dev/v1alpha1"


@app.command("history")
def history(
    name: str = typer.Argument(...),
    fmt: flags.Format = flags.output(flags.Format.TABLE, flags.Format.TABLE, flags.Format.JSON),
    no_headers: bool = typer.Option(False, "--no-headers", help="The table without its header."),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """The state snapshots kept for a plugin, oldest first."""
    flags.check_format(fmt, flags.Format.TABLE, flags.Format.JSON)
    try:
        snapshots = control.client(data_dir).state_history(name)["snapshots"]
    except ControllerError as e:
        raise control.fail(e) from None
    if fmt is flags.Format.JSON:
        output.document({"snapshots": snapshots}, "json")
        return
    output.rows(
        ["ID", "TAKEN", "VERSION", "STATE VERSION", "SIZE", "SHA256", "REASON", "KIND"],
        (
            [
                str(s["id"]),
                control.age(s["takenAt"]),
                s["pluginVersion"],
                str(s["stateVersion"]),
                str(s["size"]),
                s["sha256"][:12],
                s["reason"],
                "delta" if s.get("delta") else "full",
            ]
            for s in snapshots
        ),
        headers=not no_headers,
    )


@app.command("export")
def export(
    name: str = typer.Argument(...),
    output_file: str = typer.Option(
        "-",
        "--output-file",
        help="File to write (mode 0600); - for stdout, the default when it is not a terminal.",
    ),
    raw: bool = typer.Option(False, "--raw", help="Only the state's bytes, not the document."),
    snapshot: int | None = typer.Option(
        None, "--snapshot", help="A stored snapshot's id (default: the live state, kept too)."
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Write a plugin's state (live, or a stored snapshot) as a document that records its state
    version (or, with --raw, its bytes only)."""
    if output_file == "-" and sys.stdout.isatty():
        output.fail("the state is not for a terminal: give --output-file FILE, or pipe it")
    try:
        answer = control.client(data_dir).state_export(name, snapshot)
    except ControllerError as e:
        raise control.fail(e) from None
    meta = answer["snapshot"]
    if raw:
        data = base64.b64decode(answer["data"])
    else:
        document = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "plugin": meta["plugin"],
            "pluginVersion": meta["pluginVersion"],
            "stateVersion": meta["stateVersion"],
            "sha256": meta["sha256"],
            "size": meta["size"],
            "takenAt": meta["takenAt"],
            "snapshot": meta["id"],
            "data": answer["data"],
        }
        data = (json.dumps(document, indent=2) + "\n").encode()
    if output_file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        # A plugin's state may hold its secrets: the file is private from its first byte.
        flags_ = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            descriptor = os.open(output_file, flags_, 0o600)
        except OSError as e:
            output.fail(f"{output_file}: {e.strerror or e}")
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(descriptor, 0o600)  # a file that was there keeps its mode otherwise
            handle.write(data)
    output.err.print(
        f"wrote {meta['size']} bytes of state version {meta['stateVersion']} "
        f"(sha256 {meta['sha256'][:12]}..., snapshot {meta['id']}) to "
        f"{'stdout' if output_file == '-' else escape(output_file)}"
    )


def read_export(source: str, text: bytes) -> tuple[int, bytes] | None:
    """``(state version, bytes)`` of an export document; None if ``text`` is not one.

    Raises :class:`ValueError` for a document that claims to be one and is damaged."""
    try:
        document: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict) or document.get("kind") != KIND:
        return None
    try:
        version = int(document["stateVersion"])
        data = base64.b64decode(document["data"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise ValueError(f"{source}: a damaged state export ({e})") from None
    if version < 1:
        raise ValueError(f"{source}: stateVersion {version} is not a state version (1 or more)")
    if hashlib.sha256(data).hexdigest() != document.get("sha256"):
        raise ValueError(f"{source}: the state does not match its sha256; the file is damaged")
    return version, data


@app.command("import")
def import_(
    name: str = typer.Argument(...),
    source: str = typer.Argument(
        ..., help="A file from bhctl state export (- for stdin), or raw state bytes."
    ),
    state_version: int | None = typer.Option(
        None,
        "--state-version",
        min=1,
        help="The state version of raw bytes (an export's own is used by default).",
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Replace a plugin's state (calls held meanwhile); what it had is kept as a snapshot."""
    try:
        text = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        output.fail(f"{source}: {e.strerror or e}")
    try:
        found = read_export(source, text)
    except ValueError as e:
        output.fail(str(e))
    if found is not None:
        version, data = found
        if state_version is not None and state_version != version:
            output.fail(
                f"{source} holds state version {version}, not {state_version}; drop --state-version"
            )
    elif state_version is None:
        output.fail(
            f"{source} is not a state export (bhctl state export writes one); "
            "to import raw bytes, give their --state-version"
        )
    else:
        version, data = state_version, text
    try:
        answer = control.client(data_dir, timeout=180).state_import(name, version, data)
    except ControllerError as e:
        raise control.fail(e) from None
    if answer.get("outcome") == "Pending":
        output.out.print(
            f"import into {escape(name)} requested (request {answer['request']}); "
            "the plugin's pass has not answered yet"
        )
        return
    output.out.print(
        f"imported {len(data)} bytes into {escape(name)} (now state version "
        f"{answer['stateVersion']}); its previous state is snapshot {answer['previous']['id']}"
    )
