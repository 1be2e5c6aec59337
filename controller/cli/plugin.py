"""``bhctl plugin``: keys, bundles and the registry (keygen, pack, sign, verify, search, list,
show, install, remove).

These commands work on the data directory and the engine directly, not
through the running controller: a bundle can be hundreds of megabytes,
which the engine loads from the file here instead of through the admin
socket; installs work before any controller runs; and the catalog is
SQLite (WAL), which a running controller reads at each pass over a spec
naming a bundle, so it sees an install at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from controller.cli import run
from controller.errors import BundleRefusedError, ControllerError
from controller.protocol import client
from controller.registry import bundle, catalog, remote, signing
from controller.registry import manifest as manifest_module
from controller.registry import registry as registry_module
from controller.runtimes import container
from controller.spec import models

T = TypeVar("T")

app = typer.Typer(
    help="Plugin bundles and the registry: keys, pack, sign, verify, search, install.",
    no_args_is_help=True,
)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DATA_DIR = typer.Option(
    None,
    "--data-dir",
    envvar="BLACKHOLE_DATA_DIR",
    help="The controller's data directory (default /var/lib/blackhole as root).",
)
TRUST_DIR = typer.Option(
    None,
    "--trust-dir",
    envvar="BLACKHOLE_TRUST_DIR",
    help="Directory of trusted public keys, *.pub (default DATA_DIR/registry/trusted).",
)
POLICY = typer.Option(
    None,
    "--policy",
    envvar="BLACKHOLE_POLICY",
    help="The operator's policy file (default DATA_DIR/registry/policy.yaml).",
)
RUNTIME = typer.Option(
    container.Engine.DOCKER, "--runtime", help="The engine that loads bundles' images."
)
OUTPUT = typer.Option("table", "--output", "-o", help="table or json")


def _fail(e: ControllerError) -> typer.Exit:
    reason = f" ({e.reason})" if isinstance(e, BundleRefusedError) else ""
    err.print(f"[red]error[/]{reason}: {escape(str(e))}")
    return typer.Exit(1)


def _with_registry(
    data_dir: Path | None,
    trust_dir: Path | None,
    policy: Path | None,
    engine: container.Engine | None,
    action: Callable[[registry_module.Registry], Awaitable[T]],
    limits: remote.Limits | None = None,
) -> T:
    """Run ``action`` on the registry of ``data_dir``, on ``engine`` when given."""
    directory = data_dir or run.default_data_dir()
    settings = registry_module.Settings(
        directory,
        trust_dir=trust_dir,
        policy=policy,
        protocols=client.SUPPORTED_PROTOCOL_VERSIONS,
        limits=limits or remote.Limits(),
    )

    async def main() -> T:
        runtime = (
            container.ContainerRuntime(container.Settings(engine=engine, data_dir=directory))
            if engine is not None
            else None
        )
        found = registry_module.Registry(settings, runtime)
        try:
            return await action(found)
        finally:
            found.close()
            if runtime is not None:
                await runtime.close()

    try:
        return asyncio.run(main())
    except ControllerError as e:
        raise _fail(e) from None


@app.command()
def keygen(
    name: str = typer.Argument(..., help="File name of the key pair (NAME.key, NAME.pub)."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where to write them."),
) -> None:
    """Create an Ed25519 key pair for signing bundles."""
    try:
        private, public, ident = signing.generate(directory, name)
    except ControllerError as e:
        raise _fail(e) from None
    out.print(f"private key {escape(str(private))} (mode 0600; keep it secret)")
    out.print(f"public key  {escape(str(public))} (key id {ident})")
    out.print("Operators trust it by copying the .pub file into their trust directory.")


@app.command()
def pack(
    source: Path = typer.Argument(..., help="The plugin's plugin.yaml, or its directory."),
    image_archive: Path | None = typer.Option(
        None,
        "--image-archive",
        help="The image as docker save wrote it (default: saved from the engine now).",
    ),
    key: Path | None = typer.Option(None, "--key", help="Sign with this private key."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="The bundle file (default NAME-VERSION.bundle)."
    ),
    engine: container.Engine = RUNTIME,
) -> None:
    """Pack a manifest and its image into a bundle, pinning the image digest (and sign it)."""
    manifest_path = source / bundle.MANIFEST if source.is_dir() else source
    try:
        found = manifest_module.parse(manifest_path.read_bytes(), str(manifest_path))
    except OSError as e:
        raise typer.BadParameter(f"{manifest_path}: {e.strerror}", param_hint="SOURCE") from None
    except ControllerError as e:
        raise _fail(e) from None
    target = output or Path(f"{found.name}-{found.version}{bundle.SUFFIX}")

    async def save(archive: Path) -> None:
        runtime = container.ContainerRuntime(
            container.Settings(engine=engine, data_dir=run.default_data_dir())
        )
        try:
            await runtime.save_image(found.image, archive)
        finally:
            await runtime.close()

    try:
        with tempfile.TemporaryDirectory(dir=target.resolve().parent) as scratch:
            archive = image_archive
            if archive is None:
                archive = Path(scratch) / bundle.IMAGE
                asyncio.run(save(archive))
            pinned = bundle.pack(manifest_path, archive, target, key)
    except ControllerError as e:
        raise _fail(e) from None
    signed = f", signed by {signing.key_id(signing.load_private(key).public_key())}" if key else ""
    out.print(f"packed {pinned.ref} (image {pinned.image_digest}){signed} into {target}")


@app.command()
def sign(
    path: Path = typer.Argument(..., help="A bundle file or unpacked bundle directory."),
    key: Path = typer.Option(..., "--key", help="The private key (from bhctl plugin keygen)."),
) -> None:
    """Sign a bundle's manifest (which pins its image), replacing any signature."""
    try:
        ident = bundle.sign_in_place(path, key)
    except ControllerError as e:
        raise _fail(e) from None
    out.print(f"signed {escape(str(path))} with key {ident}")


@app.command()
def verify(
    path: Path = typer.Argument(..., help="A bundle file or unpacked bundle directory."),
    data_dir: Path | None = DATA_DIR,
    trust_dir: Path | None = TRUST_DIR,
    policy: Path | None = POLICY,
) -> None:
    """Check a bundle as an install would, loading nothing; exit 1 with the reason if refused."""

    async def check(found: registry_module.Registry) -> tuple[manifest_module.Manifest, str | None]:
        def opened() -> tuple[manifest_module.Manifest, str | None]:
            with bundle.Bundle(path) as item:
                key = found.check(item)  # the signature first, then the manifest is parsed
                return item.manifest, key

        return await asyncio.to_thread(opened)

    checked, ident = _with_registry(data_dir, trust_dir, policy, None, check)
    who = f"signed by trusted key {ident}" if ident else "unsigned (allowed by the policy)"
    out.print(f"[green]verified[/] {checked.ref}: {who}, image {checked.image_digest}")


def _listing(items: list[tuple[int, Any]], output: str, scores: bool) -> None:
    if output == "json":
        rows = [_document(item) | ({"score": s} if scores else {}) for s, item in items]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    columns = ["NAME", "VERSION", "CATEGORY", "PROVIDES", "AUTHOR", "DESCRIPTION"]
    table = Table(*(["SCORE"] if scores else []), *columns, box=None)
    for points, item in items:
        table.add_row(
            *([str(points)] if scores else []),
            item.name,
            str(item.version),
            escape(item.category),
            escape(", ".join(item.provides)),
            escape(item.author),
            escape(item.description.splitlines()[0] if item.description else ""),
        )
    out.print(table)


def _document(item: Any) -> dict[str, Any]:
    if isinstance(item, catalog.Entry):
        return item.to_document()
    return dict(item.model_dump(mode="json", by_alias=True))


def _check_output(output: str) -> None:
    if output not in {"table", "json"}:
        raise typer.BadParameter(f'"{output}"; use table or json', param_hint="--output")


@app.command()
def search(
    query: str = typer.Argument(
        "",
        help="Words matched against name, capabilities, category, author and description.",
    ),
    provides: str | None = typer.Option(None, "--provides", help="A capability, e.g. storage.kv."),
    author: str | None = typer.Option(None, "--author", help="Part of the author's name."),
    category: str | None = typer.Option(None, "--category", help="The category."),
    index: str | None = typer.Option(
        None, "--index", help="Search this marketplace index instead of the installed bundles."
    ),
    output: str = OUTPUT,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Search bundles by capability, author, category and free text, best match first."""
    _check_output(output)

    async def find(found: registry_module.Registry) -> list[tuple[int, Any]]:
        if index is None:
            return list(found.search(query, provides=provides, author=author, category=category))
        offered = await remote.fetch_index(index, found.settings.root / "indexes")
        return list(
            catalog.rank(
                offered.plugins, query, provides=provides, author=author, category=category
            )
        )

    _listing(_with_registry(data_dir, None, None, None, find), output, scores=True)


@app.command("list")
def list_installed(output: str = OUTPUT, data_dir: Path | None = DATA_DIR) -> None:
    """The installed bundles, every version."""
    _check_output(output)

    async def entries(found: registry_module.Registry) -> list[tuple[int, Any]]:
        return [(0, e) for e in found.catalog.entries()]

    _listing(_with_registry(data_dir, None, None, None, entries), output, scores=False)


@app.command()
def show(
    name: str = typer.Argument(..., help="NAME or NAME@RANGE (default: the highest version)."),
    output: str = typer.Option("yaml", "--output", "-o", help="yaml or json"),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """One installed bundle: its manifest, signer, digests and where it came from."""
    try:
        plugin, wanted = models.parse_bundle(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from None

    async def pick(found: registry_module.Registry) -> catalog.Entry | None:
        return catalog.latest(
            [e for e in found.catalog.versions(plugin) if wanted.matches(e.version)]
        )

    entry = _with_registry(data_dir, None, None, None, pick)
    if entry is None:
        err.print(f"[red]error[/]: no installed version of {escape(name)}; see bhctl plugin list")
        raise typer.Exit(1)
    document = entry.to_document()
    if output == "json":
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(document, sort_keys=False))


@app.command()
def install(
    source: str = typer.Argument(
        ...,
        help="A bundle file, an unpacked bundle, a directory of bundles, an http(s) URL, "
        "or NAME[@RANGE] from --index.",
    ),
    index: str | None = typer.Option(None, "--index", help="A marketplace index (URL or file)."),
    sha256: str | None = typer.Option(
        None, "--sha256", help="The bundle's sha256, checked after a download from a URL."
    ),
    max_bytes: int = typer.Option(
        remote.Limits.max_bytes, "--max-bytes", min=1, help="Largest download accepted."
    ),
    timeout: float = typer.Option(
        remote.Limits.timeout, "--timeout", min=0.1, help="Seconds a download may take."
    ),
    attempts: int = typer.Option(
        remote.Limits.attempts, "--attempts", min=1, help="Tries of a failing download."
    ),
    engine: container.Engine = RUNTIME,
    data_dir: Path | None = DATA_DIR,
    trust_dir: Path | None = TRUST_DIR,
    policy: Path | None = POLICY,
) -> None:
    """Install bundles, checked before their images are loaded; all or nothing.

    The checks: signature by a trusted key, image digest, the policy, protocol version and
    dependencies.
    """
    limits = remote.Limits(max_bytes=max_bytes, timeout=timeout, attempts=attempts)

    async def act(found: registry_module.Registry) -> list[registry_module.Installed]:
        return await found.install(source, index=index, sha256=sha256)

    done = _with_registry(data_dir, trust_dir, policy, engine, act, limits)
    if not done:
        out.print(f"{escape(source)}: installed already, nothing to do")
    for item in done:
        entry = item.entry
        how = ", ".join(
            [
                "downloaded" if item.downloaded else "from the cache or a file",
                "image loaded" if item.loaded else "image already in the engine",
            ]
        )
        signer = f"signed by {entry.key_id}" if entry.key_id else "unsigned"
        out.print(f"installed {entry.manifest.ref} ({signer}; {how})")


@app.command()
def remove(
    name: str = typer.Argument(..., help="NAME (every version) or NAME@VERSION."),
    engine: container.Engine = RUNTIME,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Uninstall a bundle: catalog entry, cached bundle, and its image when nothing else uses it."""
    plugin, _, version = name.partition("@")

    async def act(found: registry_module.Registry) -> list[catalog.Entry]:
        return await found.remove(plugin, version or None)

    for entry in _with_registry(data_dir, None, None, engine, act):
        out.print(f"removed {entry.manifest.ref}")
