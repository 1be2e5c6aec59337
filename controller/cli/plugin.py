"""``bhctl plugin``: a new plugin's scaffold, keys, bundles and the registry (new, keygen,
trust, pack, sign, verify, search, list, show, install, remove).

These commands work on the data directory and the engine directly, not
through the running controller: a bundle can be hundreds of megabytes,
which the engine loads from the file here instead of through the admin
socket; installs work before any controller runs; and the catalog is
SQLite (WAL), which a running controller reads at each pass over a spec
naming a bundle, so it sees an install at once.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.markup import escape

from controller.cli import flags, paths
from controller.cli import output as printed
from controller.errors import BundleRefusedError, ControllerError

if TYPE_CHECKING:
    from controller.registry import catalog, remote
    from controller.registry import manifest as manifest_module
    from controller.registry import registry as registry_module

T = TypeVar("T")

app = typer.Typer(
    help="Plugin bundles and the registry: keys, pack, sign, verify, search, install.",
    no_args_is_help=True,
)
out = printed.out
err = printed.err
DATA_DIR = flags.DATA_DIR
TRUST_DIR = flags.TRUST_DIR
POLICY = flags.POLICY
RUNTIME = flags.RUNTIME
OUTPUT = flags.output(flags.Format.TABLE, flags.Format.TABLE, flags.Format.JSON)


def _fail(e: ControllerError) -> typer.Exit:
    reason = f" ({e.reason})" if isinstance(e, BundleRefusedError) else ""
    err.print(f"[red]error[/]{reason}: {escape(str(e))}")
    return typer.Exit(1)


def _with_registry(
    data_dir: Path | None,
    trust_dir: Path | None,
    policy: Path | None,
    engine: flags.EngineChoice | None,
    action: Callable[[registry_module.Registry], Awaitable[T]],
    limits: remote.Limits | None = None,
) -> T:
    """Run ``action`` on the registry of ``data_dir``, on ``engine`` when given."""
    import asyncio

    from controller.protocol import client
    from controller.registry import registry as registry_module
    from controller.registry import remote
    from controller.runtimes import container

    directory = data_dir or paths.default_data_dir()
    settings = registry_module.Settings(
        directory,
        trust_dir=trust_dir,
        policy=policy,
        protocols=client.SUPPORTED_PROTOCOL_VERSIONS,
        limits=limits or remote.Limits(),
    )

    async def main() -> T:
        runtime = (
            container.ContainerRuntime(
                container.Settings(engine=container.Engine(engine.value), data_dir=directory)
            )
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


SCAFFOLD = Path(__file__).resolve().parent / "scaffold"
"""The templates ``plugin new`` fills in: file name (with .tmpl) to where it goes."""
SCAFFOLD_FILES = {
    "plugin.py.tmpl": "plugin.py",
    "plugin.yaml.tmpl": "plugin.yaml",
    "spec.yaml.tmpl": "spec.yaml",
    "Dockerfile.tmpl": "Dockerfile",
    "test_plugin.py.tmpl": "tests/test_plugin.py",
}
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@app.command()
def new(
    name: str = typer.Argument(..., help="The plugin's name: a DNS-1123 label, e.g. greeter."),
    directory: Path | None = typer.Option(
        None, "--dir", help="Where to write it (default: ./NAME); must not exist or be empty."
    ),
    image: str | None = typer.Option(
        None, "--image", help="The image it is built as (default: NAME:0.1.0)."
    ),
) -> None:
    """Write a new plugin: code with state and a migration, manifest, spec, Dockerfile and
    tests that pass as written (run them with pytest in its directory)."""
    if not _NAME.match(name):
        raise typer.BadParameter(
            f"{name!r}: use lower-case letters, digits and '-', starting with a letter and "
            "ending with a letter or digit, at most 63 characters",
            param_hint="NAME",
        )
    target = directory or Path(name)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        err.print(f"[red]error[/]: {escape(str(target))} exists and is not an empty directory")
        raise typer.Exit(1)
    values = {
        "name": name,
        "cls": "".join(part.capitalize() for part in name.split("-")),
        "title": name.replace("-", " ").capitalize(),
        "image": image or f"{name}:0.1.0",
    }
    for template, written in SCAFFOLD_FILES.items():
        path = target / written
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((SCAFFOLD / template).read_text().format(**values))
        out.print(f"wrote {escape(str(path))}")
    out.print(
        f"Next: cd {escape(str(target))} && pytest; docker build -t {escape(values['image'])} .; "
        "then bhctl apply -f spec.yaml"
    )


@app.command()
def keygen(
    name: str = typer.Argument(..., help="File name of the key pair (NAME.key, NAME.pub)."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where to write them."),
) -> None:
    """Create an Ed25519 key pair for signing bundles."""
    from controller.registry import signing

    try:
        private, public, ident = signing.generate(directory, name)
    except ControllerError as e:
        raise _fail(e) from None
    out.print(f"private key {escape(str(private))} (mode 0600; keep it secret)")
    out.print(f"public key  {escape(str(public))} (key id {ident})")
    out.print(f"Operators trust it with: bhctl plugin trust {escape(str(public))}")


@app.command()
def trust(
    key: Path = typer.Argument(..., help="An Ed25519 public key (.pub, PEM), e.g. from keygen."),
    data_dir: Path | None = DATA_DIR,
    trust_dir: Path | None = TRUST_DIR,
) -> None:
    """Trust bundles signed by this key: copy it into the trust directory (as KEYID.pub)."""

    async def act(registry: registry_module.Registry) -> tuple[str, Path, bool]:
        return registry.trust_key(key)

    try:
        ident, where, added = _with_registry(data_dir, trust_dir, None, None, act)
    except ControllerError as e:
        raise _fail(e) from None
    shown = escape(str(where))
    out.print(
        f"key {ident} trusted ({shown})" if added else f"key {ident} trusted already ({shown})"
    )


@app.command()
def pack(
    source: Path = typer.Argument(..., help="The plugin's plugin.yaml, or its directory."),
    image_archive: Path | None = typer.Option(
        None,
        "--image-archive",
        help="The image as docker save wrote it (default: saved from the engine now).",
    ),
    key: Path | None = typer.Option(None, "--key", help="Sign with this private key."),
    output_file: Path | None = typer.Option(
        None,
        "--output-file",
        help="The bundle file, or a directory to put NAME-VERSION.bundle in (default: here).",
    ),
    engine: flags.EngineChoice = RUNTIME,
) -> None:
    """Pack a manifest and its image into a bundle, pinning the image digest (and sign it)."""
    import tempfile

    from controller.registry import bundle, signing
    from controller.registry import manifest as manifest_module
    from controller.runtimes import container

    manifest_path = source / bundle.MANIFEST if source.is_dir() else source
    try:
        found = manifest_module.parse(manifest_path.read_bytes(), str(manifest_path))
    except OSError as e:
        raise typer.BadParameter(f"{manifest_path}: {e.strerror}", param_hint="SOURCE") from None
    except ControllerError as e:
        raise _fail(e) from None
    named = f"{found.name}-{found.version}{bundle.SUFFIX}"
    target = output_file or Path(named)
    if target.is_dir():
        target = target / named

    import asyncio

    async def save(archive: Path) -> None:
        runtime = container.ContainerRuntime(
            container.Settings(
                engine=container.Engine(engine.value), data_dir=paths.default_data_dir()
            )
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
    from controller.registry import bundle

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
    import asyncio

    from controller.registry import bundle

    async def check(found: registry_module.Registry) -> tuple[manifest_module.Manifest, str | None]:
        def opened() -> tuple[manifest_module.Manifest, str | None]:
            with bundle.Bundle(path) as item:
                key = found.check(item)  # the signature first, then the manifest is parsed
                return item.manifest, key

        return await asyncio.to_thread(opened)

    checked, ident = _with_registry(data_dir, trust_dir, policy, None, check)
    who = f"signed by trusted key {ident}" if ident else "unsigned (allowed by the policy)"
    out.print(f"[green]verified[/] {checked.ref}: {who}, image {checked.image_digest}")


def _listing(items: list[tuple[int, Any]], fmt: flags.Format, scores: bool) -> None:
    if fmt is flags.Format.JSON:
        rows = [_document(item) | ({"score": s} if scores else {}) for s, item in items]
        printed.document(rows, "json")
        return
    if not items:
        err.print("No resources found")
        return
    columns = ["NAME", "VERSION", "CATEGORY", "PROVIDES", "AUTHOR", "DESCRIPTION"]
    table = printed.table(*(["SCORE"] if scores else []), *columns)
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
    from controller.registry import catalog

    if isinstance(item, catalog.Entry):
        return item.to_document()
    return dict(item.model_dump(mode="json", by_alias=True))


def _check_output(fmt: flags.Format) -> None:
    flags.check_format(fmt, flags.Format.TABLE, flags.Format.JSON)


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
    fmt: flags.Format = OUTPUT,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Search bundles by capability, author, category and free text, best match first.

    Nothing found: "No resources found" on stderr, exit 0 (as kubectl get)."""
    _check_output(fmt)
    from controller.registry import catalog, remote

    async def find(found: registry_module.Registry) -> list[tuple[int, Any]]:
        if index is None:
            return list(found.search(query, provides=provides, author=author, category=category))
        offered = await remote.fetch_index(index, found.settings.root / "indexes")
        return list(
            catalog.rank(
                offered.plugins, query, provides=provides, author=author, category=category
            )
        )

    _listing(_with_registry(data_dir, None, None, None, find), fmt, scores=True)


@app.command("list")
def list_installed(fmt: flags.Format = OUTPUT, data_dir: Path | None = DATA_DIR) -> None:
    """The installed bundles, every version."""
    _check_output(fmt)

    async def entries(found: registry_module.Registry) -> list[tuple[int, Any]]:
        return [(0, e) for e in found.catalog.entries()]

    _listing(_with_registry(data_dir, None, None, None, entries), fmt, scores=False)


@app.command()
def show(
    name: str = typer.Argument(..., help="NAME or NAME@RANGE (default: the highest version)."),
    fmt: flags.Format = flags.output(flags.Format.YAML, flags.Format.YAML, flags.Format.JSON),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """One installed bundle: its manifest, signer, digests and where it came from."""
    flags.check_format(fmt, flags.Format.YAML, flags.Format.JSON)
    from controller.registry import catalog
    from controller.spec import models

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
    printed.document(entry.to_document(), fmt.value)


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
        flags.MAX_DOWNLOAD_BYTES, "--max-bytes", min=1, help="Largest download accepted."
    ),
    timeout: float = typer.Option(
        flags.DOWNLOAD_TIMEOUT, "--timeout", min=0.1, help="Seconds a download may take."
    ),
    attempts: int = typer.Option(
        flags.DOWNLOAD_ATTEMPTS, "--attempts", min=1, help="Tries of a failing download."
    ),
    engine: flags.EngineChoice = RUNTIME,
    data_dir: Path | None = DATA_DIR,
    trust_dir: Path | None = TRUST_DIR,
    policy: Path | None = POLICY,
) -> None:
    """Install bundles, checked before their images are loaded; all or nothing.

    The checks: signature by a trusted key, image digest, the policy, protocol version and
    dependencies.
    """
    from controller.registry import remote

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
    engine: flags.EngineChoice = RUNTIME,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Uninstall a bundle: catalog entry, cached bundle, and its image when nothing else uses it."""
    plugin, _, version = name.partition("@")

    async def act(found: registry_module.Registry) -> list[catalog.Entry]:
        return await found.remove(plugin, version or None)

    for entry in _with_registry(data_dir, None, None, engine, act):
        out.print(f"removed {entry.manifest.ref}")
