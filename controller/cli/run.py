"""``bhctl run``: the single-host controller process, assembled and run until SIGTERM.

Owns the data directory (a lock file keeps a second controller out), opens
the store, connects the runtime, serves the admin API and runs the manager.
On one host the gateway is a process of its own (:mod:`controller.cli.gateway`):
adopted when one runs on the data directory, else started, and started
again when it dies; the controller sends it the route table it rebuilds from
its store before any pass. SIGTERM or SIGINT finishes the passes in flight
and exits 0, leaving every instance and the gateway running for the next
controller to adopt. ``bhctl down`` (the admin API's ``POST /v1/down``) does
the same, then removes every instance it owns (:class:`Down`) and stops the
gateway it runs before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import ipaddress
import json
import logging
import os
import resource
import signal
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import controller
from controller import kubeapi, lease, pki
from controller.admin import server
from controller.cli import gateway as gateway_process
from controller.cli import locks
from controller.cli.flags import GatewayMode, RuntimeChoice
from controller.cli.paths import (
    PKI_DIR,
    addresses_file,
    admin_socket,
    client_certificates,
    default_data_dir,
    gateway_address,
)
from controller.dashboard import server as dashboard_server
from controller.errors import ControllerError, InstanceNotFoundError
from controller.gateway import auth, connections, router
from controller.gateway import control as control_protocol
from controller.gateway import server as gateway_server
from controller.gateway import tls as gateway_tls_files
from controller.metrics import exposition, telemetry, violations
from controller.protocol import client
from controller.reconcile import manager, queue
from controller.registry import registry
from controller.runtimes import base, container, kubernetes_manifests, process
from controller.runtimes import kubernetes as kubernetes_runtime
from controller.runtimes import remote as remote_runtime
from controller.sources import base as sources_base
from controller.sources import directory, store
from controller.sources import kubernetes as kubernetes_source
from controller.spec.keys import split_key
from controller.state import snapshots
from controller.swap import analysis, webhooks

log = logging.getLogger(__name__)


def write_addresses(data_dir: Path, bound: dict[str, str]) -> None:
    path = addresses_file(data_dir)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(bound) + "\n")
    temporary.replace(path)


__all__ = ["GatewayMode", "RuntimeChoice", "admin_socket", "default_data_dir", "gateway_address"]


@dataclass(frozen=True)
class KubernetesOptions:
    """``bhctl run --kubernetes``: Plugin objects in, Deployments out, one leader at a time."""

    kubeconfig: str | None = None
    """None: the pod's service account, else the default kubeconfig."""
    namespaces: tuple[str, ...] = ()
    controller_namespace: str = "default"
    leader_elect: bool = True
    lease_name: str = "blackhole-controller"
    lease_seconds: float = 15.0
    renew_seconds: float = 10.0
    retry_seconds: float = 2.0
    identity: str = ""
    pod: str | None = None
    gateway_service: str | None = None
    """The headless Service of the gateway's own Deployment: the controller sends routes to
    each of its endpoints. None: the gateway runs in the leader's pod."""
    gateway_control_secret: Path | None = None
    """The secret the controller proves to those gateways."""
    image_pull_secrets: tuple[str, ...] = ()
    dns: tuple[str, tuple[tuple[str, str], ...]] = ("kube-system", (("k8s-app", "kube-dns"),))
    """(namespace, labels) of the cluster DNS pods plugins may query."""
    storage_class: str | None = None
    network_policy_enforced: bool = False
    ca_secret: str | None = None
    """The Secret of the CA in the controller's namespace; None: ``--ca-cert`` or the data
    directory's, as on a host."""
    ca_secret_given: bool = False
    """The operator's (it must exist), not made by the controller."""
    gateway_client_secret: str | None = None
    """The Secret the leader keeps the gateways' client certificate renewed in."""
    instance_cert_lifetime: float = pki.INSTANCE_LIFETIME.total_seconds()
    """Seconds the plugin pods' certificates live."""

    def lease(self) -> lease.Settings:
        return lease.Settings(
            name=self.lease_name,
            namespace=self.controller_namespace,
            identity=self.identity,
            lease_seconds=self.lease_seconds,
            renew_seconds=self.renew_seconds,
            retry_seconds=self.retry_seconds,
            pod=self.pod,
        )


@dataclass(frozen=True)
class Options:
    specs: Path | None
    runtime: RuntimeChoice
    data_dir: Path
    workers: int
    resync_seconds: float
    host_path_root: Path | None
    controller_id: str
    gateway_address: str = "127.0.0.1:8080"
    gateway_grpc_address: str | None = "127.0.0.1:8081"
    gateway_tokens: Path | None = None
    gateway_tls: tuple[Path, Path, Path | None] | None = None
    """The listeners' certificate, key and client CA (None: plaintext)."""
    gateway_limits: connections.Limits = field(default_factory=connections.Limits)
    """Time and number bounds of the gateway's connections."""
    metrics_address: str | None = "127.0.0.1:9100"
    dashboard_address: str | None = None
    """Where the web dashboard listens (None: no dashboard)."""
    start_cpu_millis: int = container.START_CPU_MILLIS
    """Docker and Podman: CPU an instance may use until ready, above its spec's (0: none)."""
    thresholds: violations.Thresholds = field(default_factory=violations.Thresholds)
    kubernetes: KubernetesOptions | None = None
    plugins_dir: Path | None = None
    """Bundles installed into the registry at start."""
    webhook_secret: Path | None = None
    """The secret that signs the swaps' webhooks."""
    prometheus_url: str | None = None
    """The Prometheus that the swaps' Prometheus analyses query."""
    ca: tuple[Path, Path] | None = None
    """An operator's CA (certificate, key); default the controller's own in the data dir."""
    client_cert_lifetime: float = pki.INSTANCE_LIFETIME.total_seconds()
    """Seconds the controller's and the gateway's client certificates live (renewed at 2/3)."""
    trust_dir: Path | None = None
    policy: Path | None = None
    plugin_root: Path | None = None
    """Where the process runtime finds plugin directories (default ``data_dir/plugins``)."""
    gateway_mode: GatewayMode = GatewayMode.PROCESS
    """Ignored on Kubernetes, where the gateway runs in the controller's pod or, with
    ``kubernetes.gateway_service``, as a Deployment of its own."""
    hold_lease: float = control_protocol.DEFAULT_LEASE
    """Seconds the gateway keeps a hold this controller stops renewing."""
    ack_timeout: float = control_protocol.ACK_TIMEOUT
    """Seconds every gateway has to acknowledge a swap's hold and its flip."""
    gateway_ready_timeout: float = gateway_server.READY_TIMEOUT

    def gateway_options(self) -> gateway_process.GatewayOptions:
        return gateway_process.GatewayOptions(
            data_dir=self.data_dir,
            address=self.gateway_address,
            grpc_address=self.gateway_grpc_address,
            tokens=self.gateway_tokens,
            limits=self.gateway_limits,
            ready_timeout=self.gateway_ready_timeout,
            controller_id=self.controller_id,
            ca=self.ca,
            client_cert_lifetime=self.client_cert_lifetime,
            tls=self.gateway_tls,
        )

    @property
    def separate_gateway(self) -> bool:
        return self.kubernetes is None and self.gateway_mode is not GatewayMode.IN_PROCESS

    @property
    def gateway_replicas(self) -> bool:
        """The gateway is a Deployment of its own, of replicas found from its Service."""
        return self.kubernetes is not None and self.kubernetes.gateway_service is not None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (``BLACKHOLE_EVENT_LOOP=asyncio`` for the standard one).

    The gateway relays a call faster on it: see ``bench/gateway.py``.
    """
    if os.environ.get("BLACKHOLE_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


MMAP_THRESHOLD = 128 << 10
"""Allocations from this size up are mapped and unmapped on their own (glibc's mallopt)."""


def map_large_buffers() -> None:
    """Keep glibc from growing the heap with the large transient buffers of state transfers.

    glibc raises its mmap threshold to the largest block freed, so a state
    streamed in 1 MiB chunks would leave the heap that much larger, chunk
    after chunk; a fixed threshold maps such buffers and gives them back on
    free; and two arenas, not one per thread that ever ran a transfer's
    store writes. Nothing to do on other C libraries.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX


FILES_RESERVED = 1024
"""Open files kept for everything but the gateway's connections (stores, sockets, engines)."""


def open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one; the soft limit now.

    Every connection to the gateway is a descriptor; the usual soft limit
    (1,024) would let a few idle callers starve everything else.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # No limit at all: Linux's default fs.nr_open is the most a soft limit may be.
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, e)
        return soft
    return target


def fit_gateway_limits(limits: connections.Limits, open_files: int) -> connections.Limits:
    """``limits`` with a connection cap that the open files limit can hold on both listeners."""
    room = max(64, (open_files - FILES_RESERVED) // 2)
    if limits.max_connections <= room:
        return limits
    log.warning(
        "gateway: at most %d connections per listener, not %d: the open files limit is %d",
        room,
        limits.max_connections,
        open_files,
    )
    return replace(limits, max_connections=room)


class AlreadyRunningError(ControllerError):
    """Another controller holds the data directory."""


class DataDirError(ControllerError):
    """The data directory exists and is not one the controller may make its own."""


DATA_DIR_ENTRIES = frozenset(
    {"controller.lock", "gateway.lock", "state.db", "registry.db", "registry", PKI_DIR}
)
"""Names that mark a directory as a controller's data directory (bhctl's commands make them)."""


def own_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` private (0700), or make it so if it is the controller's own.

    A directory that exists and belongs to someone else, is writable by
    others (``/tmp``) or holds files that are not a controller's is refused,
    and left as it was: making it private would lock its users out. A
    relative path is refused: the engines mount the plugins' socket
    directories from under it, and they take absolute paths only.
    """
    if not data_dir.is_absolute():
        raise DataDirError(
            f"--data-dir {data_dir} is a relative path; give an absolute one, e.g. "
            f"--data-dir {Path.cwd() / data_dir} (the engines mount directories under it by "
            "their absolute paths)"
        )
    parent = data_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        data_dir.mkdir(mode=0o700)
        return
    except FileExistsError:
        pass
    found = data_dir.stat()
    why = None
    if not stat.S_ISDIR(found.st_mode):
        why = "is not a directory"
    elif found.st_uid != os.geteuid():
        why = f"belongs to uid {found.st_uid}, not to this controller's (uid {os.geteuid()})"
    elif found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"is writable by others (mode {stat.S_IMODE(found.st_mode):o}): a shared directory"
    else:
        entries = {entry.name for entry in os.scandir(data_dir)}
        if entries and not entries & DATA_DIR_ENTRIES:
            why = "holds other files and is not a controller's data directory"
    if why is not None:
        raise DataDirError(
            f"--data-dir {data_dir} {why}; the controller keeps its state in a private "
            f"directory (0700) of its own: give a new or empty one, e.g. {data_dir / 'blackhole'}"
        )
    if stat.S_IMODE(found.st_mode) != 0o700:
        data_dir.chmod(0o700)


@contextlib.contextmanager
def _lock(data_dir: Path) -> Iterator[None]:
    try:
        own_data_dir(data_dir)
    except OSError as e:  # a read-only or full disk: say so, no traceback
        raise DataDirError(f"--data-dir {data_dir}: {e.strerror}") from e
    path = data_dir / "controller.lock"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                locks.holding(
                    path,
                    lambda: AlreadyRunningError(
                        f"another controller is running on {data_dir}; stop it or use --data-dir"
                    ),
                )
            )
        except OSError as e:  # a read-only or full disk: say so, no traceback
            raise DataDirError(f"--data-dir {data_dir}: cannot open {path}: {e.strerror}") from e
        yield


class GatewayConfigError(ControllerError):
    """The gateway's settings would expose plugins, or cannot be read."""


def gateway_tokens(options: Options) -> auth.Tokens | None:
    """The gateway's tokens; refuses to let anyone on the network call plugins unauthenticated."""
    if options.gateway_tokens is not None:
        return auth.Tokens.load(options.gateway_tokens)
    for address in (options.gateway_address, options.gateway_grpc_address):
        if address and not _loopback(address):
            raise GatewayConfigError(
                f"the gateway would listen on {address} without authentication: anyone who "
                "reaches it could call every plugin. Give --gateway-tokens FILE, or listen "
                "on a loopback address"
            )
    return None


def gateway_tls(
    options: Options, flags: gateway_tls_files.Flags = gateway_tls_files.RUN_FLAGS
) -> gateway_tls_files.ListenerTLS | None:
    """The listeners' TLS files, checked (None: plaintext listeners)."""
    if options.gateway_tls is None:
        return None
    cert, key, client_ca = options.gateway_tls
    if client_ca is not None and options.gateway_tokens is None:
        raise GatewayConfigError(
            f"{flags.client_ca} names callers by their certificates in the tokens file's "
            "entries: give the tokens file too"
        )
    return gateway_tls_files.ListenerTLS.load(cert, key, client_ca, flags)


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _lookup(source: sources_base.Source) -> gateway_server.Lookup:
    def lookup(key: str) -> router.Declared | None:
        desired = source.get(key)
        return router.Declared.of(desired.plugin.spec) if desired is not None else None

    return lookup


class _Clients(client.Clients):
    """The controller's plugin clients: an instance it lets go of is let go of by the
    gateway process too (a restarted instance reuses its socket's path). Remote plugins
    are reached over mutual TLS with the controller's client certificate."""

    def __init__(
        self, dropped: Callable[[str], None], remotes: remote_runtime.RemoteRuntime | None
    ) -> None:
        super().__init__(tls=functools.partial(_channel_tls, remotes) if remotes else None)
        self.dropped = dropped
        self.remotes = remotes

    async def handshake(
        self, endpoint: str, want: base.InstanceSpec, timeout: float
    ) -> client.Handshake:
        """Refused, with the reason, for a remote plugin whose certificate (or its lack of
        TLS) the last probe refused: the plugin is Failed until its spec changes."""
        refused = self.remotes.refusal(endpoint) if self.remotes is not None else None
        if refused is not None:
            raise refused
        return await super().handshake(endpoint, want, timeout)

    async def drop(self, endpoint: str) -> None:
        await super().drop(endpoint)
        self.dropped(endpoint)


class _PodClients(client.Clients):
    """The controller's clients of plugin pods on Kubernetes: over mutual TLS, with the
    plugin's token as a second factor; a pod whose certificate (or its lack of TLS) the
    last probe refused is refused with the reason, so the plugin is Failed."""

    def __init__(self, pods: kubernetes_runtime.KubernetesRuntime) -> None:
        super().__init__(tokens=pods.token, tls=functools.partial(_pod_channel_tls, pods))
        self.pods = pods

    async def handshake(
        self, endpoint: str, want: base.InstanceSpec, timeout: float
    ) -> client.Handshake:
        refused = self.pods.refusal(endpoint)
        if refused is not None:
            raise refused
        return await super().handshake(endpoint, want, timeout)


def _pod_channel_tls(
    pods: kubernetes_runtime.KubernetesRuntime, endpoint: str
) -> client.ChannelTLS | None:
    server_name = pods.server_name(endpoint)
    current = pods.credentials.current()
    if server_name is None or current is None:
        return None
    _, key, cert = current
    return client.ChannelTLS(
        ca=pods.authority.cert_pem, cert=cert, key=key, server_name=server_name
    )


def _pod_endpoint_tls(
    pods: kubernetes_runtime.KubernetesRuntime, endpoint: str
) -> control_protocol.EndpointTLS | None:
    server_name = pods.server_name(endpoint)
    if server_name is None:
        return None
    return {"serverName": server_name, "ca": pods.authority.cert_pem.decode()}


def _declared(source: sources_base.Source) -> control_protocol.DeclaredPlugins:
    def declared() -> dict[str, router.Declared]:
        found = {}
        for key in source.declared_keys():
            desired = source.get(key)
            if desired is not None:
                found[key] = router.Declared.of(desired.plugin.spec)
        return found

    return declared


async def resync_from_store(
    source: sources_base.Source, runtime: base.Runtime, routes: control_protocol.RemoteRoutes
) -> int:
    """Set each declared plugin's route to its active color as the store records it.

    The commit rule: a flip is written to the store before the gateway is
    told, so a controller killed between the two finds the new color here
    and sends it; the gateway's own table is never taken as the truth. An
    instance that is gone gets no route (the first pass sees to it).
    """
    routed = 0
    for key in source.declared_keys():
        status = await source.read_status(key)
        desired = source.get(key)
        if status is None or desired is None or status.active_color is None:
            continue
        namespace, name = split_key(key)
        serving = []  # the Ready replicas of the active color (one, unless spec.replicas)
        for record in status.instances:
            if record.color is not status.active_color or not record.ready:
                continue
            instance_name = base.instance_name(
                name, status.active_color, namespace, runtime.controller_id, record.replica
            )
            try:
                instance = await runtime.inspect(instance_name)
            except InstanceNotFoundError:
                continue
            if instance.state is base.InstanceState.RUNNING:
                serving.append(instance)
        if serving:
            first = serving[0]
            endpoints = [runtime.endpoint(i) for i in serving] if len(status.instances) > 1 else []
            color = base.instance_name(name, status.active_color, namespace, runtime.controller_id)
            endpoint = runtime.endpoint(first) if first.name == color else endpoints[0]
            routes.set_route(key, endpoint, color, desired.plugin.spec, endpoints)
            routed += 1
    return routed


def _channel_tls(remotes: remote_runtime.RemoteRuntime, endpoint: str) -> client.ChannelTLS | None:
    found = remotes.reach(endpoint)
    if found is None:
        return None
    target, key, cert = found
    return client.ChannelTLS(ca=target.ca, cert=cert, key=key, server_name=target.server_name)


def _endpoint_tls(
    remotes: remote_runtime.RemoteRuntime, endpoint: str
) -> control_protocol.EndpointTLS | None:
    target = remotes.target_at(endpoint)
    if target is None:
        return None
    return {"serverName": target.server_name, "ca": target.ca.decode()}


def client_renewers(options: Options, authority: pki.Authority) -> list[pki.Renewer]:
    """The controller's and the gateway's client certificates, each in its directory."""
    lifetime = datetime.timedelta(seconds=options.client_cert_lifetime)
    return [
        pki.Renewer(
            authority,
            pki.Identity.role(options.controller_id, role),
            client_certificates(options.data_dir, role),
            lifetime=lifetime,
        )
        for role in (pki.CONTROLLER, pki.GATEWAY)
    ]


def certificate_authority(options: Options) -> pki.Authority:
    """The CA that certifies plugins reached over TLS: the operator's, else the controller's
    own (made on first start, its key 0600 in the data directory)."""
    if options.ca is not None:
        return pki.Authority.from_files(*options.ca)
    return pki.Authority.load_or_create(options.data_dir / PKI_DIR, options.controller_id)


def registry_settings(options: Options) -> registry.Settings:
    return registry.Settings(
        options.data_dir,
        trust_dir=options.trust_dir,
        policy=options.policy,
        protocols=client.SUPPORTED_PROTOCOL_VERSIONS,
    )


async def _runtime(options: Options) -> base.Runtime:
    """The backend ``options`` ask for, checked to work on this host."""
    if options.runtime is RuntimeChoice.PROCESS:
        settings = process.Settings(
            data_dir=options.data_dir,
            controller_id=options.controller_id,
            plugin_root=options.plugin_root,
            host_path_root=options.host_path_root,
            start_cpu_millis=options.start_cpu_millis,
        )
        host = await asyncio.to_thread(process.describe, settings)
        log.info(
            "controller %s on processes (%s, cgroup v%d), plugins from %s, specs from %s, "
            "data in %s",
            options.controller_id,
            host.kernel,
            host.cgroup_version,
            settings.plugins,
            options.specs or "the admin API only",
            options.data_dir,
        )
        return process.ProcessRuntime(settings)
    engine = container.Engine(options.runtime.value)
    info = await asyncio.to_thread(container.describe, engine)
    log.info(
        "controller %s on %s %s (API %s), specs from %s, data in %s",
        options.controller_id,
        info.engine,
        info.version,
        info.api_version,
        options.specs or "the admin API only",
        options.data_dir,
    )
    return container.ContainerRuntime(
        container.Settings(
            engine=engine,
            data_dir=options.data_dir,
            controller_id=options.controller_id,
            host_path_root=options.host_path_root,
            start_cpu_millis=options.start_cpu_millis,
            threads=options.workers,
        )
    )


async def serve(options: Options) -> None:
    """Run the controller until SIGTERM/SIGINT (or, on Kubernetes, until it stops leading)."""
    map_large_buffers()
    tokens = gateway_tokens(options)
    gateway_tls(options)  # its files refused before anything starts, in every mode
    if options.webhook_secret is not None:
        webhooks.read_secret(options.webhook_secret)  # refused before anything starts
    limits = fit_gateway_limits(options.gateway_limits, open_files_limit())
    options = replace(options, gateway_limits=limits)
    with _lock(options.data_dir):
        k8s = options.kubernetes
        authority: pki.Authority | None = None
        if k8s is None or not k8s.ca_secret:  # else from its Secret, once leading
            authority = await asyncio.to_thread(certificate_authority, options)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        metrics = telemetry.Metrics(version=controller.__version__)
        exposition_server = exposition.MetricsServer(metrics.registry)
        bound: dict[str, str] = {}
        election: lease.Election | None = None
        lost = asyncio.Event()
        """Set by the Lease's renewal when another controller took it (the process exits)."""
        try:
            # /metrics answers while waiting for the Lease: a follower is healthy too.
            if options.metrics_address:
                bound["metrics"] = await exposition_server.start(options.metrics_address)
            api = None
            if options.kubernetes is not None:
                api = kubeapi.connect(
                    options.kubernetes.kubeconfig,
                    agent=f"blackhole-controller/{controller.__version__} "
                    f"({options.kubernetes.identity})",
                )
                election = lease.Election(api, options.kubernetes.lease())
                if not options.kubernetes.leader_elect:
                    await election.label(True)  # the only replica: the gateway's Service needs it
                    election = None
                elif not await election.acquire(stop):
                    return
            if authority is None:
                assert k8s is not None
                assert k8s.ca_secret is not None
                assert api is not None
                authority = await asyncio.to_thread(
                    kubernetes_runtime.authority_in_secret,
                    api,
                    k8s.controller_namespace,
                    k8s.ca_secret,
                    options.controller_id,
                    make=not k8s.ca_secret_given,
                )
            log.info(
                "plugins reached over TLS are certified by %s",
                authority.cert.subject.rfc4514_string(),
            )
            await _lead(
                options, tokens, metrics, exposition_server, bound, stop, api, election, lost,
                authority,
            )  # fmt: skip
        finally:
            if election is not None:
                await election.release()
            await exposition_server.stop()
        log.info("stopped")


async def _lead(
    options: Options,
    tokens: auth.Tokens | None,
    metrics: telemetry.Metrics,
    exposition_server: exposition.MetricsServer,
    bound: dict[str, str],
    stop: asyncio.Event,
    api: Any,
    election: lease.Election | None,
    lost: asyncio.Event,
    authority: pki.Authority,
) -> None:
    """Everything that acts: source, runtime, gateway, admin API and the reconcile loop."""
    records = store.Store(options.data_dir / "state.db", metrics.stores)
    work = queue.WorkQueue()
    plane = _Plane()
    renewers = client_renewers(options, authority)
    for renewer in renewers:  # before any pass: a remote plugin is reached with them
        await asyncio.to_thread(renewer.ensure)
    renewal = asyncio.create_task(pki.keep_renewed(renewers, stop), name="certificates")
    remotes = (
        remote_runtime.RemoteRuntime(
            options.controller_id,
            options.data_dir / remote_runtime.RECORDS_DIR,
            authority.cert_pem,
            pki.Credentials(client_certificates(options.data_dir, pki.CONTROLLER)),
        )
        if options.kubernetes is None
        else None
    )

    def enqueue(key: str) -> None:
        work.add(key)
        if plane.remote is not None:
            plane.remote.changed()  # the declared plugins may differ: the gateway's table too

    source, runtime, plugins, images = await _backend(
        options, api, records, enqueue, plane, remotes, authority
    )
    k8s = options.kubernetes
    if k8s is not None and k8s.gateway_client_secret:
        keeper = kubernetes_runtime.keep_client_secret(
            api,
            k8s.controller_namespace,
            k8s.gateway_client_secret,
            authority,
            pki.Identity.role(options.controller_id, pki.GATEWAY),
            datetime.timedelta(seconds=options.client_cert_lifetime),
            stop,
        )
        gateway_certificate = asyncio.create_task(keeper, name="gateway-certificate")
        renewal.add_done_callback(lambda _: gateway_certificate.cancel())
    _data_plane(options, plane, source, runtime, plugins, tokens, metrics, exposition_server,
                bound, api)  # fmt: skip
    runtime = remote_runtime.WithRemotes(runtime, remotes)
    if remotes is not None and plane.remote is not None:
        plane.remote.carry_tls(functools.partial(_endpoint_tls, remotes))
    routes, remote, gateway = plane.routes, plane.remote, plane.gateway
    supervisor, replicas = plane.supervisor, plane.replicas
    assert routes is not None
    states = snapshots.Snapshots(options.data_dir / "snapshots.db", health=metrics.stores)
    # On Kubernetes the nodes pull images: bundles there name images a registry serves.
    bundles = registry.Registry(registry_settings(options), images)
    if options.plugins_dir is not None:
        installed, refused = await bundles.scan(options.plugins_dir)
        for path, why in sorted(refused.items()):
            log.error("plugin bundle %s refused: %s", path, why)
        log.info("%d bundle(s) installed from %s", len(installed), options.plugins_dir)
    if remote is not None:
        remote.on_released = functools.partial(_released, source, metrics)
    control = manager.Manager(
        source,
        runtime,
        work,
        plugins,
        routes=routes,
        snapshots=states,
        metrics=metrics,
        thresholds=options.thresholds,
        bundles=bundles,
        workers=options.workers,
        may_act=election.valid if election is not None else None,
        requests=records,
        webhooks=webhooks.Sender(
            webhooks.read_secret(options.webhook_secret) if options.webhook_secret else None
        ),
        prometheus=analysis.Prometheus(options.prometheus_url),
    )
    down = Down(stop) if options.kubernetes is None else None
    admin = server.AdminServer(
        source,
        runtime,
        admin_socket(options.data_dir),
        control=control,
        plugins=plugins,
        down=down,
    )
    await admin.start()
    stop_dashboard = await _start_dashboard(options, admin, tokens, bundles, bound)
    holding = None
    renewing = asyncio.Event()
    """Set once the passes in flight are done: the Lease is renewed until then."""
    connection: asyncio.Task[None] | None = None
    try:
        if gateway is not None:
            bound.update(await gateway.start(options.gateway_address, options.gateway_grpc_address))
        if replicas is not None and remote is not None:
            connection = await _reach_replicas(source, runtime, remote, replicas, stop)
        elif remote is not None:
            connection = await _adopt_gateway(options, source, runtime, remote, supervisor, stop)
        else:
            write_addresses(options.data_dir, bound)
        if election is not None:
            holding = asyncio.create_task(_hold(election, renewing, lost), name="lease")
        await control.run(stop)
        if connection is not None and connection.done() and not connection.cancelled():
            connection.result()  # the gateway refused this controller: exit 1 with why
    finally:
        renewing.set()
        renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewal
        if holding is not None:
            await holding
        if gateway is not None:
            await gateway.stop()
        if replicas is not None:
            replicas.stop()
        if remote is not None:
            await remote.close()
        if connection is not None:
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connection
        await _close(
            down, control, options, admin, (stop_dashboard, plugins.close, runtime.close),
            (states.close, bundles.close, records.close),
        )  # fmt: skip


@dataclass
class _Plane:
    """How calls reach the plugins: the gateway in this process, or gateways of their own
    (a process on this host, or a Deployment's replicas on Kubernetes) driven over the
    control protocol."""

    routes: router.Router | control_protocol.RemoteRoutes | None = None
    remote: control_protocol.RemoteRoutes | None = None
    gateway: gateway_server.Gateway | None = None
    supervisor: gateway_process.Supervisor | None = None
    replicas: kubernetes_runtime.GatewayReplicas | None = None


async def _backend(
    options: Options,
    api: Any,
    records: store.Store,
    enqueue: Callable[[str], None],
    plane: _Plane,
    remotes: remote_runtime.RemoteRuntime | None,
    authority: pki.Authority,
) -> tuple[sources_base.Source, base.Runtime, client.Clients, registry.Images | None]:
    """Where specs come from and where instances run: Kubernetes, or a directory and an
    engine (or processes) on this host."""
    source: sources_base.Source
    runtime: base.Runtime
    plugins: client.Clients
    images: registry.Images | None = None
    if options.kubernetes is not None:
        k8s = options.kubernetes
        source = kubernetes_source.KubernetesSource(
            api,
            records,
            enqueue,
            namespaces=k8s.namespaces,
            resync_seconds=options.resync_seconds,
        )
        backend = kubernetes_runtime.KubernetesRuntime(
            kubernetes_runtime.Settings(
                controller_id=options.controller_id,
                controller_namespace=k8s.controller_namespace,
                namespaces=k8s.namespaces,
                pods=kubernetes_manifests.PodOptions(
                    image_pull_secrets=k8s.image_pull_secrets,
                    dns=kubernetes_manifests.Dns(*k8s.dns),
                    storage_class=k8s.storage_class,
                ),
                network_policy_enforced=k8s.network_policy_enforced,
                certificate_lifetime=k8s.instance_cert_lifetime,
            ),
            api,
            authority,
            pki.Credentials(client_certificates(options.data_dir, pki.CONTROLLER)),
        )
        runtime, plugins = backend, _PodClients(backend)
        log.info(
            "controller %s on Kubernetes (%s), data in %s",
            options.controller_id,
            ", ".join(k8s.namespaces) or "all namespaces",
            options.data_dir,
        )
    else:
        source = directory.DirectorySource(
            options.specs, records, enqueue, resync_seconds=options.resync_seconds
        )
        runtime = await _runtime(options)
        plugins = _Clients(
            lambda endpoint: plane.remote.dropped(endpoint) if plane.remote else None, remotes
        )
        if isinstance(runtime, container.ContainerRuntime):
            images = runtime  # bundles' images are loaded into the engine
    return source, runtime, plugins, images


def _data_plane(
    options: Options,
    plane: _Plane,
    source: sources_base.Source,
    runtime: base.Runtime,
    plugins: client.Clients,
    tokens: auth.Tokens | None,
    metrics: telemetry.Metrics,
    exposition_server: exposition.MetricsServer,
    bound: dict[str, str],
    api: Any,
) -> None:
    """Set up ``plane``: the gateway this controller runs or drives."""
    if options.separate_gateway:
        if options.gateway_mode is GatewayMode.PROCESS:
            plane.supervisor = gateway_process.Supervisor(options.gateway_options())
        plane.remote = plane.routes = remote = control_protocol.RemoteRoutes(
            gateway_process.control_socket(options.data_dir),
            _declared(source),
            lease=options.hold_lease,
            about={"pid": os.getpid(), "controllerVersion": controller.__version__},
            on_down=plane.supervisor.ensure if plane.supervisor is not None else None,
            on_up=functools.partial(_gateway_up, options.data_dir, bound, plane.supervisor),
        )
        metrics.relay_gateway()
        exposition_server.extra = functools.partial(
            control_protocol.fetch_metrics, gateway_process.control_socket(options.data_dir)
        )
    elif options.gateway_replicas:
        assert options.kubernetes is not None
        assert isinstance(runtime, kubernetes_runtime.KubernetesRuntime)
        secret = options.kubernetes.gateway_control_secret
        if secret is None:
            raise control_protocol.ControlSecretError(
                "--gateway-service needs --gateway-control-secret FILE: the gateways take "
                "routes only from a controller that proves it"
            )
        plane.remote = plane.routes = remote = control_protocol.RemoteRoutes(
            None,
            _declared(source),
            lease=options.hold_lease,
            about={"pid": os.getpid(), "controllerVersion": controller.__version__},
            secret=control_protocol.SharedSecret.load(secret),
            ack_timeout=options.ack_timeout,
        )
        remote.carry_tokens(runtime.token)
        remote.carry_tls(functools.partial(_pod_endpoint_tls, runtime))
        plane.replicas = kubernetes_runtime.GatewayReplicas(
            api,
            options.kubernetes.controller_namespace,
            options.kubernetes.gateway_service or "",
            functools.partial(_replicas_changed, remote),
        )
    else:
        plane.routes = routes = router.Router(metrics)
        plane.gateway = gateway_server.Gateway(
            _lookup(source),
            routes,
            plugins,
            tokens=tokens,
            limits=options.gateway_limits,
            tls=gateway_tls(options),
        )


async def _start_dashboard(
    options: Options,
    admin: server.AdminServer,
    tokens: auth.Tokens | None,
    bundles: registry.Registry,
    bound: dict[str, str],
) -> Callable[[], Awaitable[None]]:
    """Start the web dashboard on ``--dashboard-addr``, over what the admin API reads; what
    stops it (nothing to stop when it is off). Stops the admin API when it cannot start."""
    if options.dashboard_address is None:
        return _nothing
    dashboard = dashboard_server.DashboardServer(admin, tokens=tokens, bundles=bundles)
    try:
        bound["dashboard"] = await dashboard.start(options.dashboard_address)
    except ControllerError:
        await admin.stop()
        raise
    return dashboard.stop


async def _nothing() -> None:
    return None


async def _close(
    down: Down | None,
    control: manager.Manager,
    options: Options,
    admin: server.AdminServer,
    clients: tuple[Callable[[], Awaitable[None]], ...],
    stores: tuple[Callable[[], None], ...],
) -> None:
    """Carry out a ``bhctl down`` if one was asked, then close the admin API, the clients,
    the runtime and the stores."""
    try:
        if down is not None:
            await down.carry_out(control, options)
    finally:
        await admin.stop()
        for close in clients:
            await close()
        for close_store in stores:
            close_store()


class Down:
    """``bhctl down``, asked through the admin API: the controller stops reconciling, then
    removes every instance it owns (and its volumes, when asked), stops the gateway it runs
    and exits; each asker is answered with what was removed."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.volumes: bool | None = None
        """None until asked; then whether the named volumes go too."""
        self.done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def __call__(self, volumes: bool) -> dict[str, Any]:
        if not self.done.done():
            self.volumes = bool(self.volumes) or volumes
            self.stop.set()
        return await asyncio.shield(self.done)

    async def carry_out(self, control: manager.Manager, options: Options) -> None:
        """Remove what runs (every pass has ended), stop the gateway; answer the askers.
        Nothing when no one asked."""
        if self.volumes is None:
            return
        try:
            removed = await control.remove_all(bool(self.volumes))
            gateway: dict[str, Any] = {"mode": str(options.gateway_mode)}
            if options.gateway_mode is GatewayMode.PROCESS:
                gateway["pid"] = await asyncio.to_thread(
                    gateway_process.stop_running, options.data_dir
                )
        except ControllerError as e:
            self.done.set_exception(e)
            raise
        self.done.set_result(
            {
                "instances": removed.instances,
                "volumes": removed.volumes if self.volumes else None,
                "gateway": gateway,
                "controller": {"pid": os.getpid()},
            }
        )


ADOPT_TIMEOUT = 10.0
"""Seconds the controller waits at start for its gateway before it reconciles anyway."""


async def _adopt_gateway(
    options: Options,
    source: sources_base.Source,
    runtime: base.Runtime,
    remote: control_protocol.RemoteRoutes,
    supervisor: gateway_process.Supervisor | None,
    stop: asyncio.Event,
) -> asyncio.Task[None]:
    """Find or start the gateway, send it the table from the store; the connection's task.

    The table is sent only once the specs are read and the routes rebuilt
    from the store, so a gateway that kept serving is never sent less than
    it had.
    """
    pid = gateway_process.running(options.data_dir)
    if pid is not None:
        log.info("gateway: adopting the one running on %s (pid %s)", options.data_dir, pid)
    elif supervisor is not None:
        await supervisor.ensure()
    connection = asyncio.create_task(_connection(remote, stop), name="gateway-control")
    if isinstance(source, directory.DirectorySource):
        await asyncio.to_thread(source.rescan)
    routed = await resync_from_store(source, runtime, remote)
    remote.start_syncing()
    connected = asyncio.create_task(remote.connected.wait())
    await asyncio.wait(
        {connected, connection}, timeout=ADOPT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    connected.cancel()
    if connection.done():
        connection.result()  # a refusal (no common protocol version) ends the controller
    if not remote.connected.is_set():
        log.warning(
            "gateway: not reachable at %s after %gs; reconciling anyway, it gets its routes "
            "when it answers (its log: %s)",
            remote.path,
            ADOPT_TIMEOUT,
            options.data_dir / gateway_process.LOG_NAME,
        )
        return connection
    log.info("gateway: sent %d route(s) rebuilt from the store", routed)
    requested = remote.gateway.get("requested") or {}
    asked = {"http": options.gateway_address, "grpc": options.gateway_grpc_address or ""}
    if requested and requested != asked:
        log.warning(
            "gateway: the running gateway was started for %s, not %s: restart it "
            "(bhctl gateway --stop) to change its addresses",
            requested,
            asked,
        )
    return connection


async def _reach_replicas(
    source: sources_base.Source,
    runtime: base.Runtime,
    remote: control_protocol.RemoteRoutes,
    replicas: kubernetes_runtime.GatewayReplicas,
    stop: asyncio.Event,
) -> asyncio.Task[None]:
    """Find the gateway's replicas and send each the table rebuilt from the store."""
    replicas.start()
    connection = asyncio.create_task(remote.run(stop), name="gateway-control")
    routed = await resync_from_store(source, runtime, remote)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(replicas.synced.wait(), ADOPT_TIMEOUT)
    remote.start_syncing()
    found = replicas.replicas()
    log.info(
        "gateway: %d replica(s) behind Service %s; sending them %d route(s) rebuilt from the store",
        len(found),
        replicas.service,
        routed,
    )
    return connection


def _replicas_changed(
    remote: control_protocol.RemoteRoutes,
    found: dict[str, kubernetes_runtime.GatewayEndpoint],
) -> None:
    remote.set_gateways(
        {
            name: control_protocol.Replica(
                control_protocol.Address(host=endpoint.host, port=endpoint.port), endpoint.ready
            )
            for name, endpoint in found.items()
        }
    )


def _released(
    source: sources_base.Source, metrics: telemetry.Metrics, gateway: str, record: dict[str, Any]
) -> None:
    """A gateway released holds by itself: count it, and say so on each plugin."""
    cause = str(record.get("cause") or "Unknown")
    why = {
        "LeaseLapsed": f"this controller did not renew its hold within {record.get('lease')}s",
        "ControllerGone": "its connection to the controller closed",
    }.get(cause, cause)
    for key in record.get("plugins") or []:
        metrics.hold_releases.labels(str(key), gateway, cause).inc()
        task = asyncio.get_running_loop().create_task(
            source.record_event(
                str(key),
                "Warning",
                "GatewayHoldReleased",
                f"gateway {gateway} released the held calls by itself ({why}): they went to "
                "the last route it had",
            )
        )
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


def _gateway_up(
    data_dir: Path,
    bound: dict[str, str],
    supervisor: gateway_process.Supervisor | None,
    hello: dict[str, Any],
) -> None:
    """A gateway answered: say where it listens (for bhctl call), keep its ports for the next."""
    found = dict(hello.get("addresses") or {})
    addresses = {k: str(found[k]) for k in ("http", "grpc") if k in found}
    bound.update(addresses)
    write_addresses(data_dir, bound)
    if supervisor is not None:
        supervisor.up(addresses)


async def _connection(remote: control_protocol.RemoteRoutes, stop: asyncio.Event) -> None:
    try:
        await remote.run(stop)
    except control_protocol.GatewayProtocolError as e:
        log.critical("%s", e)
        stop.set()
        raise


async def _hold(election: lease.Election, done: asyncio.Event, lost: asyncio.Event) -> None:
    """Renew the Lease until ``done``; if it is lost, stop acting at once: exit 1.

    Not a graceful stop: the passes in flight would go on acting (flipping
    Services, draining pods) beside the new leader. Kubernetes restarts the
    pod, which then waits as a follower.
    """
    await election.hold(done, lost)
    if lost.is_set():
        log.critical("stopped leading: exiting at once (1), to be restarted as a follower")
        logging.shutdown()
        os._exit(1)
