"""``bhctl gateway``: the gateway as its own process, and how ``bhctl run`` finds or starts it.

The gateway process owns ``DATA_DIR/gateway.lock`` (an flock, holding its
pid), listens on HTTP and gRPC for callers and on ``DATA_DIR/gateway.sock``
(0600) for its controller (:mod:`controller.gateway.control`). It holds
early calls until a controller sends it a route table, then routes with the
last table it got for as long as it runs: a controller killed, restarted or
upgraded leaves it serving. SIGTERM stops it. With ``--control-addr`` it
also takes controllers over TCP (Kubernetes, where the controller is
another pod), each proving ``--control-secret``; the Unix socket stays.

:class:`Supervisor` is ``bhctl run``'s side: it adopts a gateway that is
already running on the data directory, else starts one (a session of its
own, so it outlives the controller), and starts it again when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import controller
from controller import pki
from controller.cli import locks, paths
from controller.errors import ControllerError
from controller.gateway import auth, connections, control, router
from controller.gateway import server as gateway_server
from controller.gateway import tls as gateway_tls
from controller.metrics import exposition, telemetry
from controller.protocol import client

log = logging.getLogger(__name__)

LOCK_NAME = "gateway.lock"
SOCKET_NAME = "gateway.sock"
LOG_NAME = "gateway.log"
STOP_TIMEOUT = 10.0


def control_socket(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


class GatewayRunningError(ControllerError):
    """Another gateway holds the data directory."""


@dataclass(frozen=True)
class GatewayOptions:
    """What ``bhctl gateway`` is started with (``bhctl run`` passes its ``--gateway-*``)."""

    data_dir: Path
    address: str = "127.0.0.1:8080"
    grpc_address: str | None = "127.0.0.1:8081"
    tokens: Path | None = None
    limits: connections.Limits = field(default_factory=connections.Limits)
    metrics_address: str | None = None
    """Its own /metrics (the controller's /metrics carries its series in any case)."""
    ready_timeout: float = gateway_server.READY_TIMEOUT
    control_address: str | None = None
    """Also take controllers on TCP, HOST:PORT (Kubernetes: the controller is another pod)."""
    control_secret: Path | None = None
    """The secret a controller proves on ``control_address``."""
    controller_id: str = "default"
    ca: tuple[Path, Path] | None = None
    """The operator's CA its controller runs with; default the controller's own, if any."""
    client_cert_lifetime: float = pki.INSTANCE_LIFETIME.total_seconds()
    tls: tuple[Path, Path, Path | None] | None = None
    """The listeners' certificate, key and client CA (None: plaintext)."""

    def arguments(self) -> list[str]:
        """This, as ``bhctl gateway`` options."""
        args = [
            "--data-dir", str(self.data_dir), "--addr", self.address,
            "--grpc-addr", self.grpc_address or "",
            "--header-timeout", repr(self.limits.header_timeout),
            "--idle-timeout", repr(self.limits.idle_timeout),
            "--max-connections", str(self.limits.max_connections),
            "--ready-timeout", repr(self.ready_timeout),
        ]  # fmt: skip
        if self.tokens is not None:
            args += ["--tokens", str(self.tokens)]
        if self.metrics_address:
            args += ["--metrics-addr", self.metrics_address]
        if self.control_address:
            args += ["--control-addr", self.control_address]
        if self.control_secret is not None:
            args += ["--control-secret", str(self.control_secret)]
        args += ["--controller-id", self.controller_id]
        args += ["--client-cert-lifetime", repr(self.client_cert_lifetime)]
        if self.ca is not None:
            args += ["--ca-cert", str(self.ca[0]), "--ca-key", str(self.ca[1])]
        if self.tls is not None:
            cert, key, client_ca = self.tls
            args += ["--tls-cert", str(cert), "--tls-key", str(key)]
            if client_ca is not None:
                args += ["--tls-client-ca", str(client_ca)]
        return args


def running(data_dir: Path) -> int | None:
    """The pid of the gateway that holds ``data_dir``'s lock, or None."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock(data_dir: Path) -> contextlib.AbstractContextManager[None]:
    return locks.holding(
        data_dir / LOCK_NAME,
        lambda: GatewayRunningError(
            f"a gateway is already running on {data_dir}; stop it with "
            f"bhctl gateway --stop --data-dir {data_dir}"
        ),
    )


async def serve(
    options: GatewayOptions,
    tokens: auth.Tokens | None,
    listener_tls: gateway_tls.ListenerTLS | None = None,
) -> None:
    """Run the gateway until SIGTERM/SIGINT (``listener_tls``: HTTPS and gRPC over TLS)."""
    secret = None
    if options.control_address:
        if options.control_secret is None:
            raise control.ControlSecretError(
                "--control-addr takes controllers over the network: give --control-secret FILE"
            )
        secret = control.SharedSecret.load(options.control_secret)
    with _lock(options.data_dir):
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        metrics = telemetry.Metrics(version=controller.__version__)
        routes = router.Router(metrics)
        about = {"pid": os.getpid(), "gatewayVersion": controller.__version__}
        credentials = pki.Credentials(paths.client_certificates(options.data_dir, pki.GATEWAY))
        renewal = asyncio.create_task(
            pki.keep_renewed(await asyncio.to_thread(_renewers, options), stop), name="certificate"
        )
        plugins = client.Clients(
            tokens=lambda endpoint: controls.tokens.get(endpoint),
            tls=lambda endpoint: _tls(controls, credentials, endpoint),
        )
        # At once, while the table that routes calls there is applied: see Clients.forget.
        controls = control.ControlServer(routes, about=about, replaced=plugins.forget)
        gateway = gateway_server.Gateway(
            controls.lookup,
            routes,
            plugins,
            tokens=tokens,
            limits=options.limits,
            ready=controls.ready,
            ready_timeout=options.ready_timeout,
            tls=listener_tls,
        )
        own_metrics = exposition.MetricsServer(metrics.registry)
        try:
            bound = await gateway.start(options.address, options.grpc_address)
            if options.metrics_address:
                bound["metrics"] = await own_metrics.start(options.metrics_address)
            about["addresses"] = bound
            about["requested"] = {"http": options.address, "grpc": options.grpc_address or ""}
            # Callers may connect from now on: their calls wait for the first table.
            await controls.start(control_socket(options.data_dir))
            if options.control_address and secret is not None:
                bound["control"] = await controls.start_tcp(options.control_address, secret)
                log.info("gateway: control on %s (shared secret)", bound["control"])
            log.info("gateway %s: waiting for routes (pid %d)", controller.__version__, os.getpid())
            await stop.wait()
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            await controls.stop()
            await gateway.stop()
            await own_metrics.stop()
            await plugins.close()
            with contextlib.suppress(FileNotFoundError):
                control_socket(options.data_dir).unlink()
        log.info("gateway stopped")


def _renewers(options: GatewayOptions) -> list[pki.Renewer]:
    """The gateway's own client certificate, renewed here too when due, so that a gateway
    serving on without its controller still reaches remote plugins: with the CA it was
    issued from only (the controller's, in the data directory, or ``--ca-cert``), which the
    controller decides; none when the gateway cannot read that CA's key."""
    if options.ca is not None:
        cert, key = options.ca
    else:
        cert, key = (options.data_dir / paths.PKI_DIR / n for n in (pki.CA_CERT, pki.CA_KEY))
        if not cert.exists():
            return []
    try:
        authority = pki.Authority.from_files(cert, key)
    except pki.PKIError as e:
        log.warning("gateway: its client certificate is renewed by the controller only: %s", e)
        return []
    return [
        pki.Renewer(
            authority,
            pki.Identity.role(options.controller_id, pki.GATEWAY),
            paths.client_certificates(options.data_dir, pki.GATEWAY),
            lifetime=datetime.timedelta(seconds=options.client_cert_lifetime),
            follow=True,
        )
    ]


def _tls(
    controls: control.ControlServer, credentials: pki.Credentials, endpoint: str
) -> client.ChannelTLS | None:
    """How the gateway reaches ``endpoint`` over mutual TLS (a remote plugin): checked as the
    table says, with the gateway's own client certificate, which the controller renews."""
    entry = controls.tls.get(endpoint)
    if entry is None:
        return None
    current = credentials.current()
    if current is None:
        return None
    _, key, cert = current
    return client.ChannelTLS(
        ca=entry["ca"].encode(), cert=cert, key=key, server_name=entry["serverName"]
    )


def status(data_dir: Path) -> dict[str, object]:
    """What the gateway running on ``data_dir`` routes (raises when none answers)."""
    answer = control.ask(control_socket(data_dir), {"type": "status"})
    answer.pop("id", None)
    answer.pop("ok", None)
    return {"pid": running(data_dir), **answer}


def stop_running(data_dir: Path, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the gateway on ``data_dir`` and wait for it to exit; its pid, or None."""
    pid = running(data_dir)
    if not pid:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    if running(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid


class Supervisor:
    """``bhctl run``'s gateway: adopted when one runs on the data directory, else started."""

    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.started: list[subprocess.Popen[bytes]] = []
        """Gateways this controller started (reaped when they exit)."""
        self._failures = 0

    async def ensure(self) -> None:
        """Start a gateway unless one runs (or is starting); back off when they keep failing."""
        self.started = [p for p in self.started if p.poll() is None]
        if running(self.options.data_dir) is not None:
            return
        if self.started:
            return  # started, and not yet holding its lock
        if self._failures:
            await asyncio.sleep(min(5.0, 0.1 * 2 ** min(self._failures, 6)))
        self._failures += 1
        self.started.append(await asyncio.to_thread(self._spawn))

    def up(self, addresses: dict[str, str]) -> None:
        """The gateway answered, on ``addresses``: forget earlier failures, and start the
        next one on the same ports (callers keep their address when it was port 0)."""
        self._failures = 0
        self.options = replace(
            self.options,
            address=addresses.get("http", self.options.address),
            grpc_address=addresses.get("grpc", self.options.grpc_address),
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        path = self.options.data_dir / LOG_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", "gateway", *self.options.arguments()],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not in the controller's group: it outlives it
            )
        log.info("gateway: started pid %d (log: %s)", process.pid, path)
        return process
