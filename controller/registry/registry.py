"""The registry: installs bundles from their sources, checks them, loads images, resolves specs.

Sources are a bundle file, an unpacked bundle directory, a directory of
bundles (scanned), an http(s) URL, or ``NAME[@RANGE]`` from a marketplace
index (:mod:`controller.registry.remote`). Every bundle is copied into a
cache keyed by its sha256 (``DATA_DIR/registry/bundles``), then checked
before anything of it runs: its signature by a key of the trust directory
(unsigned only when the policy allows), its image digest against the
manifest's, what it asks for against the operator's policy, its protocol
version, and its dependencies. Only when every bundle of an install passes
are images loaded (each at most once: an image the engine holds already is
not loaded again), through the runtime backend, and the catalog written.

:meth:`Registry.resolve` turns a spec naming ``bundle: NAME@RANGE`` into a
spec with the image, version, state version and dependencies of the highest
installed version in range, checking it all again (keys and policy may have
changed since the install), or refuses it with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller.errors import BundleRefusedError, ControllerError, RegistryError
from controller.registry import bundle as bundle_module
from controller.registry import catalog as catalog_module
from controller.registry import dependencies, policy, remote, signing
from controller.registry import manifest as manifest_module
from controller.spec import models
from controller.spec.semver import Version, VersionRange

log = logging.getLogger(__name__)


class Images(Protocol):
    """Where bundles' images go: a runtime backend that can load ``docker save`` archives."""

    name: str

    async def load_image(self, archive: Path) -> str:
        """Load the archive; the loaded image's id (``sha256:<hex>``)."""
        ...

    async def image_id(self, reference: str) -> str | None:
        """The id of the image ``reference`` names, or None when the engine has none."""
        ...

    async def remove_image(self, reference: str) -> None:
        """Remove the image (no error when absent)."""
        ...


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    trust_dir: Path | None = None
    """Default ``DATA_DIR/registry/trusted``."""
    policy: Path | None = None
    """Default ``DATA_DIR/registry/policy.yaml`` (the defaults when absent)."""
    protocols: frozenset[int] = frozenset({1})
    """The plugin protocol versions the controller speaks."""
    limits: remote.Limits = field(default_factory=remote.Limits)

    @property
    def root(self) -> Path:
        return self.data_dir / "registry"

    @property
    def trusted(self) -> Path:
        return self.trust_dir or self.root / "trusted"

    @property
    def policy_file(self) -> Path:
        return self.policy or self.root / "policy.yaml"


@dataclass(frozen=True)
class Installed:
    """One bundle an install put in the catalog, and what it cost."""

    entry: catalog_module.Entry
    downloaded: bool
    """Whether its bundle was fetched (False: it was in the cache)."""
    loaded: bool
    """Whether its image was loaded (False: the engine had it)."""


@dataclass
class _Staged:
    path: Path
    source: str
    sha256: str
    fresh: bool
    """Whether this install put it in the cache (removed again if the install fails)."""
    downloaded: bool = False
    opened: bundle_module.Bundle | None = None
    key_id: str | None = None


class Registry:
    """The catalog with its cache, trust directory and policy, on one image store."""

    def __init__(self, settings: Settings, images: Images | None = None) -> None:
        self.settings = settings
        self.images = images
        for directory in (settings.data_dir, settings.root):  # a new one is the owner's only
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.catalog = catalog_module.Catalog(settings.data_dir / "registry.db")
        self.cache = settings.root / "bundles"
        self.cache.mkdir(mode=0o700, exist_ok=True)
        if settings.trust_dir is None:  # the default one is there to be filled
            settings.trusted.mkdir(mode=0o700, exist_ok=True)
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self.catalog.close()

    def policy(self) -> policy.Policy:
        return policy.Policy.load(self.settings.policy_file)

    def trust(self) -> signing.TrustStore:
        return signing.TrustStore(self.settings.trusted)

    def trust_key(self, path: Path) -> tuple[str, Path, bool]:
        """Put the Ed25519 public key at ``path`` in the trust directory as ``<key id>.pub``:
        its key id, where it is, and whether it was added (False: it was trusted already)."""
        public = signing.load_public(path)  # refuses anything but such a key
        ident = signing.key_id(public)
        known = self.trust().keys.get(ident)
        if known is not None:
            return ident, known[1], False
        directory = self.settings.trusted
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = directory / f"{ident}.pub"
        staged = target.with_suffix(".tmp")
        staged.write_bytes(path.read_bytes())
        staged.chmod(0o644)
        staged.replace(target)
        return ident, target, True

    # Checks.

    def _unsigned(self, source: str) -> str:
        """Why an unsigned bundle is refused, and the two ways out."""
        return (
            f"{source} is not signed, and the policy ({self.settings.policy_file}) refuses "
            "unsigned bundles: "
            "sign it with bhctl plugin sign, or accept unsigned bundles with "
            "allowUnsigned: true in the policy"
        )

    def check(self, opened: bundle_module.Bundle) -> str | None:
        """Every check of one bundle but its dependencies; the signer's key id (None: unsigned)."""
        rules = self.policy()
        if opened.signature is None:
            if not rules.allow_unsigned:
                raise BundleRefusedError("Unsigned", self._unsigned(opened.source))
            key = None
        else:  # the signature is over the raw bytes: checked before any YAML is parsed
            key = self.trust().verify(opened.manifest_bytes, opened.signature, opened.source)
        found = opened.parse_manifest()
        self._check_protocol(found, opened.source)
        rules.check(found, opened.source)
        opened.check_image()
        return key

    def _check_protocol(self, found: manifest_module.Manifest, source: str) -> None:
        if found.protocol_version not in self.settings.protocols:
            raise BundleRefusedError(
                "ProtocolUnsupported",
                f"{source}: {found.ref} speaks plugin protocol version "
                f"{found.protocol_version}; this controller speaks "
                f"{', '.join(str(p) for p in sorted(self.settings.protocols))}",
            )

    # Installs.

    async def install(
        self, what: str, *, index: str | None = None, sha256: str | None = None
    ) -> list[Installed]:
        """Install a bundle file or directory, a directory of bundles, a URL, or NAME[@RANGE]
        from ``index``; all or nothing."""
        async with self._lock:
            staged: list[_Staged] = []
            try:
                if remote.is_url(what):
                    staged.append(await self._fetch(what, sha256))
                elif index is not None and not Path(what).exists():
                    staged += await self._from_index(what, index)
                else:
                    staged += await asyncio.to_thread(self._stage_local, Path(what))
                return await self._install(staged)
            except BaseException:
                for item in staged:
                    if item.opened is not None:
                        item.opened.close()
                    if item.fresh and self.catalog.uses(item.sha256) == 0:
                        item.path.unlink(missing_ok=True)
                raise

    async def scan(self, directory: Path) -> tuple[list[Installed], dict[str, str]]:
        """Install every bundle in ``directory`` on its own; what was installed, and what was
        refused (by path, with the reason)."""
        try:
            found = sorted(
                p
                for p in directory.iterdir()
                if p.name.endswith(bundle_module.SUFFIX) or (p / bundle_module.MANIFEST).is_file()
            )
        except OSError as e:
            raise RegistryError(f"plugins directory {directory}: {e.strerror}") from None
        installed: list[Installed] = []
        refused: dict[str, str] = {}
        pending = found
        while pending:  # dependencies between them: retry what failed while anything installs
            failed = []
            for path in pending:
                try:
                    installed += await self.install(str(path))
                except ControllerError as e:  # refused, unreadable, or the engine would not load it
                    refused[str(path)] = str(e)
                    failed.append(path)
            if len(failed) == len(pending):
                break
            pending = failed
        still = {str(p) for p in pending}
        return installed, {path: why for path, why in refused.items() if path in still}

    def _cached(self, sha256: str) -> Path:
        return self.cache / f"{sha256}{bundle_module.SUFFIX}"

    def _stage_local(self, path: Path) -> list[_Staged]:
        try:
            return self._stage_path(path)
        except OSError as e:
            raise RegistryError(f"{path}: {e.strerror or e}") from None

    def _stage_path(self, path: Path) -> list[_Staged]:
        if not path.exists():
            raise RegistryError(
                f"{path}: no such file or directory; to install NAME[@RANGE] from a "
                "marketplace, give its index (--index URL)"
            )
        if path.is_dir() and not (path / bundle_module.MANIFEST).exists():
            found = sorted(
                p
                for p in path.iterdir()
                if p.name.endswith(bundle_module.SUFFIX)
                or (p.is_dir() and (p / bundle_module.MANIFEST).exists())
            )
            if not found:
                raise RegistryError(f"{path}: no bundles (*{bundle_module.SUFFIX}) in it")
            return [item for p in found for item in self._stage_path(p)]
        with tempfile.TemporaryDirectory(dir=self.cache) as scratch:
            source = path
            if path.is_dir():  # an unpacked bundle: cached as a bundle file
                opened = bundle_module.Bundle(path)
                with opened:
                    source = Path(scratch) / "bundle"
                    bundle_module.write(
                        source,
                        opened.manifest_bytes,
                        opened.signature,
                        path / bundle_module.IMAGE,
                    )
            digest = bundle_module.sha256_file(source)
            target = self._cached(digest)
            fresh = not target.exists()
            if fresh:
                staged = target.with_name(target.name + ".part")
                try:
                    shutil.copyfile(source, staged)
                    staged.replace(target)
                finally:
                    staged.unlink(missing_ok=True)
        return [_Staged(target, str(path.resolve()), digest, fresh)]

    async def _fetch(self, url: str, sha256: str | None) -> _Staged:
        if urllib.parse.urlparse(url).scheme == "file":
            (item,) = await asyncio.to_thread(
                self._stage_local, Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
            )
            if sha256 is not None and item.sha256 != sha256:
                raise BundleRefusedError(
                    "ChecksumMismatch", f"{url}: sha256 is {item.sha256}, not {sha256}"
                )
            return item
        fragment = urllib.parse.urlparse(url).fragment
        if sha256 is None and fragment.startswith("sha256="):
            sha256 = fragment.removeprefix("sha256=")
        if sha256 is not None and self._cached(sha256).exists():
            return _Staged(self._cached(sha256), url, sha256, fresh=False)
        with tempfile.TemporaryDirectory(dir=self.cache) as scratch:
            target = Path(scratch) / "download"
            digest = await remote.download(
                url.split("#", 1)[0], target, sha256=sha256, limits=self.settings.limits
            )
            cached = self._cached(digest)
            fresh = not cached.exists()
            if fresh:
                target.replace(cached)
        return _Staged(cached, url, digest, fresh, downloaded=True)

    async def _from_index(self, wanted: str, index_url: str) -> list[_Staged]:
        name, versions = models.parse_bundle(wanted)
        index = await remote.fetch_index(index_url, self.settings.root / "indexes")

        def available(plugin: str) -> list[dependencies.Candidate]:
            offered: list[dependencies.Candidate] = list(index.versions(plugin))
            known = {c.version for c in offered}
            offered += [e for e in self.catalog.versions(plugin) if e.version not in known]
            return offered

        chosen = dependencies.resolve([(name, versions)], available)
        staged = []
        for plugin in dependencies.start_order(
            {n: [d.name for d in c.requires] for n, c in chosen.items()}
        ):
            pick = chosen[plugin]
            if isinstance(pick, remote.IndexEntry):
                installed = [e for e in self.catalog.versions(plugin) if e.version == pick.version]
                if installed and installed[0].sha256 == pick.sha256:
                    continue  # nothing to do for it
                item = await self._fetch(pick.url, pick.sha256)
                item.source = f"{index_url}: {pick.name}@{pick.version}"
                staged.append(item)
        return staged  # empty when everything chosen is installed already

    async def _install(self, staged: list[_Staged]) -> list[Installed]:
        for item in staged:
            item.opened = await asyncio.to_thread(bundle_module.Bundle, item.path)
            item.opened.source = item.source
            item.key_id = await asyncio.to_thread(self.check, item.opened)
        chosen: dict[str, tuple[_Staged, bundle_module.Bundle]] = {}
        for item in staged:
            if item.opened is not None:
                chosen.setdefault(item.opened.manifest.ref, (item, item.opened))
        self._check_dependencies([opened.manifest for _, opened in chosen.values()])
        graph: dict[str, list[str]] = {}
        for _, opened in chosen.values():
            graph.setdefault(opened.manifest.name, []).extend(
                d.name for d in opened.manifest.requires
            )
        rank = {name: i for i, name in enumerate(dependencies.start_order(graph))}
        order = sorted(
            chosen.values(),
            key=lambda pair: (rank[pair[1].manifest.name], pair[1].manifest.version),
        )
        loaded = [await self._load(opened) for _, opened in order]
        done = []
        for (item, opened), was_loaded in zip(order, loaded, strict=True):
            entry = await asyncio.to_thread(
                self.catalog.add,
                opened.manifest,
                opened.manifest_bytes,
                opened.signature,
                item.key_id,
                item.sha256,
                item.source,
                was_loaded,
            )
            log.info("installed %s from %s", entry.manifest.ref, item.source)
            done.append(Installed(entry, item.downloaded, was_loaded))
        for item in staged:
            if item.opened is not None:
                item.opened.close()
        return done

    def _check_dependencies(self, new: Sequence[manifest_module.Manifest]) -> None:
        """Everything ``new`` requires is installed or part of the install, without cycles."""

        def available(plugin: str) -> list[dependencies.Candidate]:
            offered: list[dependencies.Candidate] = [m for m in new if m.name == plugin]
            known = {m.version for m in offered}
            offered += [e for e in self.catalog.versions(plugin) if e.version not in known]
            return offered

        for found in new:
            dependencies.resolve([(found.name, VersionRange.parse(f"={found.version}"))], available)

    async def _load(self, opened: bundle_module.Bundle) -> bool:
        """Load the bundle's image unless the engine has it; whether it was loaded."""
        if self.images is None:
            raise RegistryError("no container engine to load images into")
        found = opened.manifest
        digest = found.image_digest or ""
        current = await self.images.image_id(found.image)
        if current == digest:
            return False
        with tempfile.TemporaryDirectory(dir=self.cache) as scratch:
            # What the engine loads is rebuilt from the checked members only, tagged as
            # the signed manifest says: nothing unchecked (other tags, an OCI index) reaches it.
            archive = Path(scratch) / bundle_module.IMAGE
            await asyncio.to_thread(opened.check_image, archive)
            loaded = await self.images.load_image(archive)
        if loaded != digest:
            with contextlib.suppress(RegistryError):
                await self.images.remove_image(loaded)
            raise BundleRefusedError(
                "ImageDigestMismatch",
                f"{opened.source}: {self.images.name} loaded the image as {loaded}, not "
                f"{digest} as the manifest says",
            )
        return True

    async def remove(self, name: str, version: str | None = None) -> list[catalog_module.Entry]:
        """Forget ``name`` (one version, or all), its cached bundles, and images no bundle uses."""
        async with self._lock:
            wanted = None if version is None else Version.parse(version)
            gone = await asyncio.to_thread(self.catalog.remove, name, wanted)
            if not gone:
                raise RegistryError(
                    f"{name}{'@' + version if version else ''} is not installed; "
                    "see bhctl plugin list"
                )
            for entry in gone:
                if self.catalog.uses(entry.sha256) == 0:
                    self._cached(entry.sha256).unlink(missing_ok=True)
                if not entry.loaded:  # the engine had it before: not the registry's to remove
                    log.info("kept the image of %s: it was in the engine before the install",
                             entry.manifest.ref)  # fmt: skip
                elif self.images is not None and self.catalog.uses_image(entry.image_digest) == 0:
                    current = await self.images.image_id(entry.manifest.image)
                    if current == entry.image_digest:
                        try:
                            await self.images.remove_image(entry.manifest.image)
                        except RegistryError as e:
                            log.warning("kept the image of %s: %s", entry.manifest.ref, e)
            return gone

    # Specs naming a bundle.

    async def resolve(self, spec: models.PluginSpec) -> models.PluginSpec:
        """The spec with what its bundle supplies; raises :class:`BundleRefusedError`."""
        assert spec.bundle is not None
        name, wanted = models.parse_bundle(spec.bundle)
        entries = await asyncio.to_thread(self.catalog.versions, name)
        entry = next((e for e in reversed(entries) if wanted.matches(e.version)), None)
        if entry is None:
            have = ", ".join(str(e.version) for e in entries) or "none"
            raise BundleRefusedError(
                "BundleNotFound",
                f"spec.bundle: no installed version of {name} is in {wanted} (installed: "
                f"{have}); install one with bhctl plugin install",
            )
        found = entry.manifest
        source = f"bundle {found.ref}"
        rules = self.policy()
        if entry.signature is None:
            if not rules.allow_unsigned:
                raise BundleRefusedError("Unsigned", self._unsigned(source))
        else:
            self.trust().verify(entry.manifest_bytes, entry.signature, source)
        self._check_protocol(found, source)
        rules.check(found, source)
        rules.check_resources(spec.resources, "spec.resources:")
        beyond = policy.grants(spec, found)
        if beyond:
            raise BundleRefusedError(
                "PermissionDenied",
                f"the spec grants more than {source} asks for: {'; '.join(beyond)}",
            )
        for what, given, supplied in (
            ("spec.image", spec.image, found.image),
            ("spec.version", spec.version, found.version),
        ):
            if given is not None and given != supplied:
                raise BundleRefusedError(
                    "BundleMismatch", f"{what} is {given}, but {source} supplies {supplied}"
                )

        def available(plugin: str) -> list[dependencies.Candidate]:
            return list(self.catalog.versions(plugin))

        await asyncio.to_thread(
            dependencies.resolve, [(found.name, VersionRange.parse(f"={found.version}"))], available
        )
        if self.images is None:
            raise BundleRefusedError(
                "NoImageStore",
                f"{source}: this controller's runtime loads no images (Kubernetes nodes pull "
                "them; the process runtime runs none), so the image digest the bundle's "
                "signature pins could not be enforced; name the image with spec.image here",
            )
        current = await self.images.image_id(found.image)
        if current != entry.image_digest:
            raise BundleRefusedError(
                "ImageDigestMismatch",
                f"{self.images.name}'s image {found.image} is {current or 'missing'}, not "
                f"{entry.image_digest} as {source} pins; reinstall it with bhctl plugin "
                "install",
            )
        listed = {d.name for d in spec.depends_on}
        state = spec.state
        if state is None and found.state_version > 0:
            state = models.State(version=found.state_version)
        return spec.model_copy(
            update={
                "image": found.image,
                "version": found.version,
                "provides": spec.provides or list(found.provides),
                "state": state,
                "depends_on": [
                    *spec.depends_on,
                    *(d for d in found.requires if d.name not in listed),
                ],
            }
        )

    # Reading.

    def search(
        self,
        query: str = "",
        *,
        provides: str | None = None,
        author: str | None = None,
        category: str | None = None,
    ) -> list[tuple[int, catalog_module.Entry]]:
        return catalog_module.rank(
            self.catalog.entries(), query, provides=provides, author=author, category=category
        )
