"""``bhctl swap``: steer a blue/green swap (promote, abort, undo, retry), wait on one
(status) and list a plugin's revisions (history), through the running controller's admin
socket.

A request is recorded by the controller and carried out by the plugin's next
pass; ``--wait`` waits for that pass's answer. ``status`` follows the swap
itself until it ends, as ``kubectl argo rollouts status`` does: exit 0 when it
was promoted, 1 when it rolled back or was aborted, 2 when ``--timeout`` ran out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from controller.admin import client as admin_client
from controller.cli import control, flags, output
from controller.errors import ControllerError

app = typer.Typer(
    help="Steer a blue/green swap: promote, abort, undo, retry; follow it with status; "
    "list the revisions with history.",
    no_args_is_help=True,
)

POLL_SECONDS = 0.5
ANSWER_WAIT = 10.0
"""Seconds one ask for a request's answer may wait on the controller."""
TIMEOUT_EXPIRED = 2

WAIT = typer.Option(
    False, "--wait", help="Wait until the controller carried the request out (or refused it)."
)
TIMEOUT = typer.Option(300.0, "--timeout", min=0.0, help="Seconds to wait at most.")


@app.command("promote")
def promote(
    name: str = typer.Argument(...),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Promote a new version that waits for it (hotSwap.autoPromote: false)."""
    _request(name, "promote", wait, timeout, data_dir)


@app.command("abort")
def abort(
    name: str = typer.Argument(...),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Roll a swap back: before promotion, or within the scale-down window after it."""
    _request(name, "abort", wait, timeout, data_dir)


@app.command("undo")
def undo(
    name: str = typer.Argument(...),
    to_revision: int | None = typer.Option(
        None, "--to-revision", min=1, help="The revision to go back to (see swap history)."
    ),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Go back to the version the last swap came from (or to --to-revision), its state from
    the latest snapshot it reads.

    It stays (condition Pinned) until the plugin's spec changes.
    """
    _request(name, "undo", wait, timeout, data_dir, to_revision)


@app.command("retry")
def retry(
    name: str = typer.Argument(...),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Try a rolled-back swap again with the same spec (editing the spec does too)."""
    _request(name, "retry", wait, timeout, data_dir)


@app.command("history")
def history(
    name: str = typer.Argument(...),
    fmt: flags.Format = flags.output(flags.Format.TABLE, flags.Format.TABLE, flags.Format.JSON),
    no_headers: bool = typer.Option(False, "--no-headers", help="The table without its header."),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """A plugin's revisions, oldest first: each spec its instances were made from, and how
    the swap to it ended."""
    flags.check_format(fmt, flags.Format.TABLE, flags.Format.JSON)
    try:
        revisions = control.client(data_dir).revisions(name)["revisions"]
    except ControllerError as e:
        raise control.fail(e) from None
    if fmt is flags.Format.JSON:
        output.document({"revisions": revisions}, "json")
        return
    output.rows(
        ["REVISION", "VERSION", "SPEC HASH", "CREATED", "RESULT"],
        (
            [
                str(r["revision"]),
                r["version"],
                r["specHash"][:12],
                control.age(r["createdAt"]),
                r["result"] + (f" ({r['reason']})" if r.get("reason") else ""),
            ]
            for r in revisions
        ),
        headers=not no_headers,
    )


def _request(
    name: str,
    action: str,
    wait: bool,
    timeout: float,
    data_dir: Path | None,
    revision: int | None = None,
) -> None:
    admin = control.client(data_dir, timeout=ANSWER_WAIT + 30)
    try:
        recorded = admin.swap(name, action, revision)
    except ControllerError as e:
        raise control.fail(e) from None
    if not wait:
        output.out.print(
            f"{action} requested for {escape(name)} (request {recorded['request']}); "
            f"bhctl swap status {escape(name)} follows the swap"
        )
        return
    answer = wait_answer(admin, int(recorded["request"]), timeout)
    outcome = answer["outcome"]
    said = f": {answer['message']}" if answer.get("message") else ""
    if outcome == "Done":
        output.out.print(f"{action} of {escape(name)} done{escape(said)}")
    elif outcome == "Refused":
        output.fail(f"{action} of {name} refused{said}")
    else:
        output.fail(
            f"{action} of {name} still pending after {timeout:g}s (request {recorded['request']})",
            TIMEOUT_EXPIRED,
        )


def wait_answer(admin: admin_client.AdminClient, id: int, timeout: float) -> dict[str, Any]:
    """Request ``id`` once answered, or as it is when ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.0, deadline - time.monotonic())
        try:
            answer = admin.request(id, wait=min(left, ANSWER_WAIT))
        except ControllerError as e:
            raise control.fail(e) from None
        if answer["outcome"] != "Pending" or left <= 0:
            return answer


@app.command("status")
def status(
    name: str = typer.Argument(...),
    timeout: float = typer.Option(
        0.0, "--timeout", min=0.0, help="Seconds to wait at most (0: until the swap ends)."
    ),
    watch: bool = typer.Option(
        True, "--watch/--no-watch", help="Wait for the swap to end (else say where it is)."
    ),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Follow a plugin's swap until it ends: exit 0 when it was promoted, 1 when it rolled
    back or was aborted, 2 when --timeout runs out first."""
    admin = control.client(data_dir)
    deadline = time.monotonic() + timeout if timeout else None
    said = ""
    while True:
        try:
            plugin = admin.get(name)["plugin"]
        except ControllerError as e:
            raise control.fail(e) from None
        now, code = _where(plugin)
        if now != said:
            output.out.print(escape(now))
            said = now
        if code is not None:
            raise typer.Exit(code)
        if not watch:
            return
        if deadline is not None and time.monotonic() > deadline:
            output.fail(f"timed out after {timeout:g}s: {now}", TIMEOUT_EXPIRED)
        time.sleep(POLL_SECONDS)


def _where(plugin: dict[str, Any]) -> tuple[str, int | None]:
    """What to say about ``plugin``'s swap, and the exit status once it ended (else None)."""
    name = plugin["metadata"]["name"]
    status = plugin.get("status") or {}
    swap = status.get("swap")
    if swap is not None:
        step = swap["step"]
        hint = f"; promote with bhctl swap promote {name}" if step == "AwaitingPromotion" else ""
        if step == "Canary":
            steps = len((plugin["spec"].get("hotSwap") or {}).get("canary", {}).get("steps", []))
            at = min(int(swap.get("canaryStep") or 0) + 1, steps)
            hint = f" step {at}/{steps}, weight {swap.get('weight') or 0}%"
        if swap.get("analysis"):
            hint += f"; analysis {swap['analysis']['at']} running"
        return f"{name}: swap {swap['fromVersion']} -> {swap['toVersion']}: {step}{hint}", None
    generation = plugin["metadata"].get("generation")
    if generation is not None and status.get("observedGeneration") != generation:
        return f"{name}: generation {generation} not yet observed", None
    last = status.get("lastSwap")
    if last is None:
        return f"{name}: no swap (running {status.get('activeVersion') or '-'})", 0
    result = last["result"]
    if result == "InProgress":
        return f"{name}: swap {last['from']} -> {last['to']} in progress", None
    why = f" ({last['reason']})" if last.get("reason") else ""
    message = f": {last['message'].splitlines()[0]}" if last.get("message") else ""
    text = f"{name}: swap {last['from']} -> {last['to']} {result}{why}{message}"
    return text, 0 if result == "Promoted" else 1
