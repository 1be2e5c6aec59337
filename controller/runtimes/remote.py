"""Remote plugins: plugins the controller does not run, reached at an address over mutual TLS.

A spec with ``remote`` names an address; an "instance" of it is a binding
of one color to that address, kept as a small JSON record in the data
directory (so a restarted controller finds it, as it finds containers by
their labels). Starting one starts nothing, stopping one stops nothing;
:meth:`RemoteRuntime.ready` opens a TLS connection to the address with the
controller's client certificate and checks the plugin's certificate
against the CA and the server name expected there. Something that answers
there and is not a plugin the controller may trust (another CA, another
name, an expired certificate, no TLS at all) counts as there, like a
tampered socket on this host: its handshake is then refused with the reason
(:meth:`RemoteRuntime.refusal`), so the plugin is Failed until its spec
changes, and a swap to it rolls back. The plugin client reaches it with the
same settings (:meth:`RemoteRuntime.reach`). :class:`WithRemotes` puts
remote plugins beside the instances of the host's runtime: the reconciler
sees one runtime. What the controller cannot do to a remote plugin (limit
its resources, read its cgroup, restart its process, read its logs) it does
not pretend to: see :data:`NOT_APPLICABLE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from controller import pki
from controller.errors import (
    IncompatiblePluginError,
    InstanceNotFoundError,
    RuntimeBackendError,
    SpecIssue,
)
from controller.runtimes import base
from controller.spec import models

LABEL_REMOTE = models.LABEL_PREFIX + "remote"
"""On a remote plugin's instance: the address it is reached at."""
LABEL_SERVER_NAME = models.LABEL_PREFIX + "remote-server-name"
"""On a remote plugin's instance: the name its certificate must carry."""
NOT_APPLICABLE = ("resources", "cgroupMetrics", "processRestart", "logs")
"""What the controller does to the instances it runs and cannot do to a remote plugin."""
RECORDS_DIR = "remote"
"""The directory, in the data directory, of remote plugins' records."""


@dataclass(frozen=True)
class Target:
    """Where and how one remote instance is reached."""

    address: str
    server_name: str
    ca: bytes


def server_name_of(desired: base.InstanceSpec) -> str:
    """The name the remote plugin's certificate must carry: the spec's, else its identity's."""
    assert desired.spec.remote is not None
    if desired.spec.remote.server_name:
        return desired.spec.remote.server_name
    identity = pki.Identity.plugin(desired.controller_id, desired.namespace, desired.plugin)
    return identity.server_name


def status_of(instance: base.Instance) -> models.RemoteStatus | None:
    """The status of a remote plugin's instance; None for an instance the controller runs."""
    address = instance.labels.get(LABEL_REMOTE)
    if address is None:
        return None
    return models.RemoteStatus(
        address=address,
        server_name=instance.labels.get(LABEL_SERVER_NAME, ""),
        not_applicable=list(NOT_APPLICABLE),
    )


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class RemoteRuntime:
    """Remote plugins' bindings, one record a color, in ``directory``."""

    name = "remote"

    def __init__(
        self,
        controller_id: str,
        directory: Path,
        ca: bytes,
        credentials: pki.Credentials,
    ) -> None:
        self.controller_id = controller_id
        self.directory = directory
        self.ca = ca
        """The controller's CA (PEM): what a remote plugin's certificate chains to by default."""
        self.credentials = credentials
        """The controller's client certificate, kept renewed."""
        self._targets: dict[str, Target] = {}
        """Address to how it is reached, for the instances that exist."""
        self._refusals: dict[str, IncompatiblePluginError] = {}
        """Address to why what answers there is refused, as the last probe found."""

    # What the reconciler calls.

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        remote = desired.spec.remote
        assert remote is not None
        if remote.ca_file is None:
            return []
        try:
            _read_ca(Path(remote.ca_file))
        except RuntimeBackendError as e:
            issue = SpecIssue(
                "runtime", None, "spec.remote.caFile", str(e), value=remote.ca_file, has_value=True
            )
            return [issue]
        return []

    def has(self, name: str) -> bool:
        return (self.directory / f"{name}.json").exists()

    async def list_owned(self, plugin: str | None = None) -> list[base.Instance]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(self.directory.iterdir()):
                if entry.suffix != ".json":
                    continue
                instance = self._load(entry.stem)
                if instance is not None and (plugin is None or instance.plugin == plugin):
                    found.append(instance)
        return found

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        remote = desired.spec.remote
        assert remote is not None
        labels = {
            **desired.labels,
            **base.owner_labels(self.controller_id),
            LABEL_REMOTE: remote.address,
            LABEL_SERVER_NAME: server_name_of(desired),
        }
        record: dict[str, object] = {
            "id": secrets.token_hex(8),
            "labels": labels,
            "address": remote.address,
            "serverName": server_name_of(desired),
            "caFile": remote.ca_file,
            "startedAt": datetime.now(UTC).isoformat(),
            "finishedAt": None,
        }
        await asyncio.to_thread(self._save, desired.name, record)
        instance = self._load(desired.name)
        assert instance is not None
        return instance

    async def inspect(self, name: str) -> base.Instance:
        instance = self._load(name)
        if instance is None:
            raise InstanceNotFoundError(f"remote: no plugin bound as {name}")
        return instance

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        """Whether something answers a TLS handshake at the instance's address; False when
        nothing answers there (yet).

        What answers with a certificate the controller must not trust, or without TLS,
        counts as there: :meth:`refusal` then says why, and the handshake that follows
        refuses it.
        """
        target = self.target(instance)
        host, port = split_address(target.address)
        context = self._context(target)
        self._refusals.pop(target.address, None)
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=target.server_name
                )
        except ssl.SSLCertVerificationError as e:
            self._refusals[target.address] = _refusal(target, e)
            return True
        except ssl.SSLError as e:
            self._refusals[target.address] = _not_tls(target, str(e.reason or e))
            return True
        except (ConnectionResetError, asyncio.IncompleteReadError) as e:
            self._refusals[target.address] = _not_tls(target, f"closed: {e}")
            return True
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return True

    def refusal(self, endpoint: str) -> IncompatiblePluginError | None:
        """Why the plugin client must not handshake with ``endpoint``, as the last probe of it
        found (another CA, another name, expired, no TLS); None when nothing was wrong."""
        return self._refusals.get(endpoint)

    def endpoint(self, instance: base.Instance) -> str:
        return instance.labels.get(LABEL_REMOTE) or instance.address or ""

    async def stop(self, name: str, timeout: float) -> None:
        """Nothing runs here to stop: the binding is marked stopped (no more calls sent)."""
        record = await asyncio.to_thread(self._read, name)
        if record is None or record.get("finishedAt"):
            return
        record["finishedAt"] = datetime.now(UTC).isoformat()
        await asyncio.to_thread(self._save, name, record)

    async def remove(self, name: str) -> None:
        """Forget the binding. How its address is reached is kept: a channel still open to it
        (a swap's old color draining) goes on over mutual TLS, never in plaintext."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{name}.json").unlink()

    async def logs(self, name: str, tail: int, timestamps: bool = False) -> list[str]:
        instance = await self.inspect(name)
        return [
            f"(a remote plugin at {instance.address}: its output stays on its own host; "
            "the controller runs nothing of it)"
        ]

    async def stats(self, name: str) -> base.Stats:
        raise RuntimeBackendError(
            f"remote: {name} runs on another host; the controller reads no cgroup of it"
        )

    # How it is reached.

    def target(self, instance: base.Instance) -> Target:
        address = instance.labels.get(LABEL_REMOTE) or instance.address or ""
        found = self._targets.get(address)
        if found is None:
            record = self._read(instance.name) or {}
            found = self._target_of(record)
        return found

    def reach(self, endpoint: str) -> tuple[Target, bytes, bytes] | None:
        """How the plugin client reaches ``endpoint``: the target and the controller's client
        key and certificate (PEM); None when no remote plugin is there (or no certificate yet)."""
        target = self._targets.get(endpoint)
        if target is None:
            return None
        current = self.credentials.current()
        if current is None:
            return None
        _, key, cert = current
        return target, key, cert

    def target_at(self, endpoint: str) -> Target | None:
        """How ``endpoint`` is checked, if a remote plugin is there (what a gateway needs)."""
        return self._targets.get(endpoint)

    def _context(self, target: Target) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=target.ca.decode())
        files = self.credentials.files
        for attempt in (1, 2):  # a renewal between the two reads: read the new pair
            try:
                context.load_cert_chain(files.cert, files.key)
                break
            except (ssl.SSLError, OSError) as e:
                if attempt == 2:
                    raise RuntimeBackendError(
                        f"remote: the controller's client certificate in "
                        f"{self.credentials.directory} cannot be used: {e}"
                    ) from e
        context.set_alpn_protocols(["h2"])
        return context

    # Records.

    def _target_of(self, record: dict[str, object]) -> Target:
        address = str(record.get("address") or "")
        ca_file = record.get("caFile")
        ca = _read_ca(Path(str(ca_file))) if ca_file else self.ca
        target = Target(address, str(record.get("serverName") or ""), ca)
        if address:
            self._targets[address] = target
        return target

    def _read(self, name: str) -> dict[str, object] | None:
        try:
            data = json.loads((self.directory / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _save(self, name: str, record: dict[str, object]) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{name}.json"
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(record, sort_keys=True) + "\n")
        os.replace(temporary, path)

    def _load(self, name: str) -> base.Instance | None:
        record = self._read(name)
        if record is None:
            return None
        labels = record.get("labels")
        if not isinstance(labels, dict) or labels.get(base.LABEL_CONTROLLER) != self.controller_id:
            return None  # another controller's, sharing the data directory's records: not ours
        with contextlib.suppress(RuntimeBackendError):  # its CA file went: the probe says so
            self._target_of(record)
        finished = record.get("finishedAt")
        instance = base.instance_from_labels(
            name,
            {str(k): str(v) for k, v in labels.items()},
            str(record.get("id", "")),
            base.InstanceState.EXITED if finished else base.InstanceState.RUNNING,
            started_at=_time(record.get("startedAt")),
            finished_at=_time(finished),
        )
        return dataclasses.replace(instance, address=str(record.get("address")))


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _read_ca(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RuntimeBackendError(f"cannot read {path}: {e.strerror}") from e
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise RuntimeBackendError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return data


def _not_tls(target: Target, what: str) -> IncompatiblePluginError:
    return IncompatiblePluginError(
        "RemoteNotTLS",
        f"{target.address} did not complete a TLS handshake ({what}): the controller reaches "
        "remote plugins over mutual TLS only (does it serve with BLACKHOLE_TLS_CERT, "
        "BLACKHOLE_TLS_KEY and BLACKHOLE_TLS_CA?)",
    )


def _refusal(target: Target, e: ssl.SSLCertVerificationError) -> IncompatiblePluginError:
    kind, why = pki.verification_failure(e)
    if kind == pki.MISMATCH:
        return IncompatiblePluginError(
            "RemoteIdentityMismatch",
            f"{target.address} presented a certificate that does not name "
            f"{target.server_name} ({why}): it is not the plugin expected there",
        )
    if kind == pki.EXPIRED:
        return IncompatiblePluginError(
            "RemoteCertificateExpired",
            f"{target.address} presented an expired certificate ({why})",
        )
    return IncompatiblePluginError(
        "RemoteUntrusted",
        f"{target.address} presented a certificate that does not chain to the CA trusted "
        f"for it ({why}); give spec.remote.caFile, or have the plugin certified by the "
        "controller's CA",
    )


class WithRemotes:
    """The host's runtime with remote plugins beside its instances: one runtime to the
    reconciler. ``remotes`` None refuses remote specs (no CA to reach them with here)."""

    def __init__(self, host: base.Runtime, remotes: RemoteRuntime | None) -> None:
        self.host = host
        self.remotes = remotes
        self.name = host.name
        self.controller_id = host.controller_id

    def _remote(self, name: str) -> RemoteRuntime | None:
        return self.remotes if self.remotes is not None and self.remotes.has(name) else None

    def capabilities(self) -> base.Capabilities:
        return self.host.capabilities()

    def validate(self, desired: base.InstanceSpec) -> list[SpecIssue]:
        if desired.spec.remote is None:
            return self.host.validate(desired)
        if self.remotes is None:
            why = f"remote plugins are not supported on the {self.host.name} runtime"
            address = desired.spec.remote.address
            return [SpecIssue("runtime", None, "spec.remote", why, value=address, has_value=True)]
        return self.remotes.validate(desired)

    async def list_owned(self, plugin: str | None = None) -> list[base.Instance]:
        found = await self.host.list_owned(plugin)
        if self.remotes is not None:
            found += await self.remotes.list_owned(plugin)
        return found

    async def start(self, desired: base.InstanceSpec) -> base.Instance:
        if desired.spec.remote is not None and self.remotes is not None:
            return await self.remotes.start(desired)
        return await self.host.start(desired)

    async def inspect(self, name: str) -> base.Instance:
        remote = self._remote(name)
        return await (remote.inspect(name) if remote else self.host.inspect(name))

    async def ready(self, instance: base.Instance, timeout: float) -> bool:
        if LABEL_REMOTE in instance.labels and self.remotes is not None:
            return await self.remotes.ready(instance, timeout)
        return await self.host.ready(instance, timeout)

    def endpoint(self, instance: base.Instance) -> str:
        if LABEL_REMOTE in instance.labels and self.remotes is not None:
            return self.remotes.endpoint(instance)
        return self.host.endpoint(instance)

    async def stop(self, name: str, timeout: float) -> None:
        remote = self._remote(name)
        await (remote.stop(name, timeout) if remote else self.host.stop(name, timeout))

    async def remove(self, name: str) -> None:
        remote = self._remote(name)
        await (remote.remove(name) if remote else self.host.remove(name))

    async def release(self, plugin: str, namespace: str | None = None) -> None:
        await self.host.release(plugin, namespace)

    async def remove_volumes(self) -> list[str]:
        return await self.host.remove_volumes()

    async def route(self, plugin: str, namespace: str | None, color: models.Color) -> None:
        await self.host.route(plugin, namespace, color)

    async def logs(self, name: str, tail: int, timestamps: bool = False) -> list[str]:
        remote = self._remote(name)
        if remote is not None:
            return await remote.logs(name, tail, timestamps)
        return await self.host.logs(name, tail, timestamps)

    async def stats(self, name: str) -> base.Stats:
        remote = self._remote(name)
        return await (remote.stats(name) if remote else self.host.stats(name))

    def events(self) -> AsyncIterator[str]:
        return self.host.events()

    async def close(self) -> None:
        await self.host.close()
