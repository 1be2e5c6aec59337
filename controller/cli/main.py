"""``bhctl`` commands: version, crd, validate.

The CLI is the top layer: it may import every other part of the controller,
and nothing imports it. It is the only place that prints.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import controller
from controller.errors import EngineUnavailableError, SpecError
from controller.runtimes import container
from controller.spec import crd, loader, models

app = typer.Typer(
    name="bhctl",
    help="Blackhole plugin controller: run isolated, hot-swappable plugins from declarative specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@app.command()
def version(
    output: str = typer.Option("text", "--output", "-o", help="text or json"),
) -> None:
    """Print the controller's version."""
    info = {
        "version": controller.__version__,
        "apiVersion": models.API_VERSION,
        "python": platform.python_version(),
    }
    if output == "json":
        out.print_json(json.dumps(info))
    elif output == "text":
        out.print(f"bhctl {info['version']} (API {info['apiVersion']}, Python {info['python']})")
    else:
        raise typer.BadParameter(f'"{output}"; use text or json', param_hint="--output")


@app.command("crd")
def print_crd() -> None:
    """Print the Plugin CustomResourceDefinition (generated from the spec models)."""
    sys.stdout.write(crd.render())


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Spec files or directories of them."),
) -> None:
    """Check plugin specs; exit 1 and list every problem if any spec is invalid."""
    missing = [f for f in files if not f.exists()]
    if missing:
        for path in missing:
            err.print(f"[red]error[/]: {escape(str(path))}: no such file or directory")
        raise typer.Exit(1)
    try:
        loaded = loader.load_paths(files)
    except SpecError as e:
        for issue in e.issues:
            err.print(f"[red]error[/]: {escape(str(issue))}")
        err.print(f"{len(e.issues)} problem{'s' if len(e.issues) != 1 else ''} found")
        raise typer.Exit(1) from None
    for item in loaded:
        spec = item.plugin.spec
        out.print(
            f"[green]valid[/]  {escape(item.source)}: {item.plugin.key} "
            f"{spec.version} ({escape(spec.image)})"
        )


@app.command()
def engines(
    engine: list[container.Engine] = typer.Option(
        list(container.Engine), "--engine", "-e", help="Engines to check (default: all)."
    ),
) -> None:
    """Check that the container engines answer; exit 1 if any does not."""
    table = Table("ENGINE", "ENDPOINT", "VERSION", "API", "STATUS", box=None)
    failed = False
    for kind in engine:
        url = container.engine_url(kind)
        try:
            info = container.describe(kind, url)
        except EngineUnavailableError as e:
            failed = True
            table.add_row(str(kind), url, "-", "-", "[red]unavailable[/]")
            err.print(f"[red]error[/]: {escape(str(e))}")
            continue
        table.add_row(str(kind), url, info.version, info.api_version, "[green]ready[/]")
    out.print(table)
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app()
