"""Remote sources: bundles downloaded over HTTP(S), and the marketplace index that lists them.

A download streams into a file beside its destination and is renamed into
place only when whole: it is refused past :attr:`Limits.max_bytes` (as soon
as the ``Content-Length`` or the bytes received say so), bounded by
timeouts, retried with exponential backoff (tenacity) when the connection
fails or drops mid-transfer or the server answers 5xx or 429, and its
sha256 is checked when one is known. Nothing partial is ever left behind.

The marketplace index is JSON::

    {"apiVersion": "blackhole.dev/v1alpha1", "kind": "PluginIndex",
     "plugins": [{"name": "kv-store", "version": "1.2.0",
                  "url": "bundles/kv-store-1.2.0.bundle", "sha256": "<hex>",
                  "description": "...", "author": "...", "category": "storage",
                  "provides": ["storage.kv"], "requires": []}]}

with each ``url`` absolute or relative to the index's own URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import aiohttp
import pydantic
import tenacity
from pydantic import Field

from controller.errors import BundleRefusedError, RegistryError
from controller.spec import models
from controller.spec.semver import Version

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Limits:
    """How much a download may take."""

    max_bytes: int = 1 << 30
    """Largest bundle accepted, in bytes. Default 1 GiB."""
    timeout: float = 600.0
    """Seconds a whole download may take."""
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    """Seconds without a byte before the connection counts as dropped."""
    attempts: int = 3
    """Tries before giving up on transient failures."""
    backoff: float = 0.5
    """Seconds before the second try; doubled for each further one (at most 10)."""


class DownloadError(RegistryError):
    """A download failed for good."""


class _Transient(DownloadError):
    """A failure worth another try: connection refused or dropped, 5xx, 429, timeout."""


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme in ("http", "https")


async def download(
    url: str, destination: Path, *, sha256: str | None = None, limits: Limits = Limits()
) -> str:
    """Download ``url`` to ``destination``; the sha256 (hex) of what was received."""
    staged = destination.with_name(destination.name + ".part")
    timeout = aiohttp.ClientTimeout(
        total=limits.timeout, sock_connect=limits.connect_timeout, sock_read=limits.read_timeout
    )
    attempt = 0
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            retrying = tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(limits.attempts),
                wait=tenacity.wait_exponential(multiplier=limits.backoff, max=10),
                retry=tenacity.retry_if_exception_type(_Transient),
                reraise=True,
            )
            async for try_ in retrying:
                with try_:
                    attempt += 1
                    digest = await _fetch(session, url, staged, limits)
    except _Transient as e:
        staged.unlink(missing_ok=True)
        raise DownloadError(f"GET {url} failed after {attempt} attempts: {e}") from None
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    if sha256 is not None and digest != sha256.lower():
        staged.unlink(missing_ok=True)
        raise BundleRefusedError(
            "ChecksumMismatch", f"{url}: sha256 is {digest}, but {sha256} was expected"
        )
    staged.replace(destination)
    return digest


async def _fetch(session: aiohttp.ClientSession, url: str, staged: Path, limits: Limits) -> str:
    digest, received = hashlib.sha256(), 0
    try:
        async with session.get(url) as response:
            if response.status >= 500 or response.status == 429:
                raise _Transient(f"the server answered {response.status} {response.reason}")
            if response.status >= 400:
                raise DownloadError(f"GET {url}: {response.status} {response.reason}")
            length = response.content_length
            if length is not None and length > limits.max_bytes:
                raise DownloadError(_too_big(url, f"is {length} bytes", limits))
            with staged.open("wb") as out:
                async for chunk in response.content.iter_chunked(_CHUNK):
                    received += len(chunk)
                    if received > limits.max_bytes:
                        raise DownloadError(_too_big(url, "sent more", limits))
                    digest.update(chunk)
                    out.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        log.info("download of %s interrupted after %d bytes: %s", url, received, e)
        raise _Transient(f"the connection dropped after {received} bytes ({e})") from None
    except TimeoutError:
        raise _Transient(f"no answer within the timeout, after {received} bytes") from None
    return digest.hexdigest()


def _too_big(url: str, what: str, limits: Limits) -> str:
    return (
        f"{url} {what}, over the size limit of {limits.max_bytes} bytes; "
        "raise --max-bytes if you expect bundles this large"
    )


class IndexEntry(models.Model):
    """One bundle a marketplace offers."""

    name: models.DnsLabel
    version: Version
    url: str = Field(min_length=1)
    """Absolute, or relative to the index's URL."""
    sha256: Annotated[str, Field(pattern=r"^[a-f0-9]{64}$")]
    """Of the bundle file."""
    size: int | None = Field(default=None, ge=0)
    description: str = ""
    author: str = ""
    category: str = ""
    provides: list[str] = Field(default_factory=list)
    requires: list[models.Dependency] = Field(default_factory=list)


class Index(models.Model):
    """A marketplace's list of bundles."""

    api_version: Literal["blackhole.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["PluginIndex"]
    plugins: list[IndexEntry] = Field(default_factory=list)

    def versions(self, name: str) -> list[IndexEntry]:
        return [p for p in self.plugins if p.name == name]


MAX_INDEX_BYTES = 16 << 20


async def fetch_index(url: str, cache: Path, limits: Limits = Limits()) -> Index:
    """The index at ``url`` (an http(s) URL or a local file), with every entry's URL absolute."""
    if is_url(url):
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / ("index-" + hashlib.sha256(url.encode()).hexdigest()[:16] + ".json")
        small = Limits(
            max_bytes=min(limits.max_bytes, MAX_INDEX_BYTES),
            timeout=limits.timeout,
            connect_timeout=limits.connect_timeout,
            read_timeout=limits.read_timeout,
            attempts=limits.attempts,
            backoff=limits.backoff,
        )
        await download(url, target, limits=small)
        base = url
    else:
        target = Path(url.removeprefix("file://"))
        base = target.resolve().as_uri()
    try:
        with target.open("rb") as handle:
            data = handle.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise RegistryError(f"index {url}: {e.strerror}") from None
    if len(data) > MAX_INDEX_BYTES:
        raise RegistryError(f"index {url}: over the limit of {MAX_INDEX_BYTES} bytes (16 MiB)")
    try:
        index = Index.model_validate(json.loads(data))
    except pydantic.ValidationError as e:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in e.errors()
        )
        raise RegistryError(f"index {url} is not a plugin index: {detail}") from None
    except (ValueError, RecursionError) as e:  # not JSON (or nested past the parser's limit)
        raise RegistryError(f"index {url} is not JSON: {e}") from None
    for entry in index.plugins:
        try:
            entry.url = urllib.parse.urljoin(base, entry.url)
        except ValueError as e:
            raise RegistryError(f"index {url}: {entry.name}@{entry.version}: url: {e}") from None
    return index
