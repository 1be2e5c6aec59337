"""``bhctl``: the command line of the controller.

Commands group by what they reach: the controller process itself (``run``,
``gateway``), a running controller through its admin socket
(:mod:`controller.cli.control`, :mod:`controller.cli.swap`,
:mod:`controller.cli.state`), bundles and the registry on the data
directory (:mod:`controller.cli.plugin`) and offline tools (``validate``,
``crd``, ``engines``, ``version``). Each command imports what it needs when
it runs, so that one talking to a running controller starts in a blink.

The CLI is the top layer: it may import every other part of the controller,
and nothing imports it. It is the only place that prints.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

import controller
from controller.cli import certificate, control, flags, output, plugin, state, swap

if TYPE_CHECKING:
    from controller.spec import models

app = typer.Typer(
    name="bhctl",
    help="Blackhole plugin controller: run isolated, hot-swappable plugins from declarative specs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"bhctl {controller.__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Blackhole plugin controller: run isolated, hot-swappable plugins from declarative specs."""


@app.command()
def version(
    fmt: flags.Format = flags.output(flags.Format.TEXT, flags.Format.TEXT, flags.Format.JSON),
) -> None:
    """Print the controller's version (and the spec API's and Python's)."""
    flags.check_format(fmt, flags.Format.TEXT, flags.Format.JSON)
    from controller.spec import models

    info = {
        "version": controller.__version__,
        "apiVersion": models.API_VERSION,
        "python": platform.python_version(),
    }
    if fmt is flags.Format.JSON:
        output.document(info, "json")
    else:
        output.out.print(
            f"bhctl {info['version']} (API {info['apiVersion']}, Python {info['python']})"
        )


@app.command("crd")
def print_crd() -> None:
    """Print the Plugin CustomResourceDefinition (generated from the spec models)."""
    from controller.spec import crd

    sys.stdout.write(crd.render())


@app.command()
def explain(
    path: str = typer.Argument(
        "plugin", help="An object of the spec, e.g. plugin.spec.hotSwap (default: plugin)."
    ),
) -> None:
    """Print the fields of a Plugin's object: type, limits, default and meaning (the same
    text as the docs' spec reference)."""
    from controller.errors import ControllerError
    from controller.spec import reference

    try:
        sys.stdout.write(reference.explain(path))
    except ControllerError as e:
        sys.stderr.write(f"error: {e}\n")
        raise typer.Exit(1) from None


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Spec files or directories of them."),
) -> None:
    """Check plugin specs; exit 1 and list every problem if any spec is invalid."""
    from rich.markup import escape

    from controller.errors import SpecError
    from controller.spec import loader

    missing = [f for f in files if not f.exists()]
    if missing:
        for path in missing:
            output.error(f"{path}: no such file or directory")
        raise typer.Exit(1)
    try:
        loaded = loader.load_paths(files)
    except SpecError as e:
        for issue in e.issues:
            output.error(str(issue))
        output.err.print(f"{len(e.issues)} problem{'s' if len(e.issues) != 1 else ''} found")
        raise typer.Exit(1) from None
    for item in loaded:
        spec = item.plugin.spec
        output.out.print(
            f"[green]valid[/]  {escape(item.source)}: {item.plugin.key} "
            f"{spec.version or spec.bundle} ({escape(spec.image or _remote_or_bundle(spec))})"
        )


@app.command()
def engines(
    engine: list[flags.RuntimeChoice] = typer.Option(
        list(flags.RuntimeChoice), "--engine", "-e", help="Runtimes to check (default: all)."
    ),
) -> None:
    """Check that the container engines answer and that processes can be run; exit 1 if not."""
    from controller.errors import EngineUnavailableError
    from controller.runtimes import container, process

    table = output.table("ENGINE", "ENDPOINT", "VERSION", "API", "STATUS")
    failed = False
    for kind in engine:
        url = "-"
        try:
            if kind is flags.RuntimeChoice.PROCESS:
                host = process.describe()
                version = host.kernel
                api = f"cgroup v{host.cgroup_version}" + (", SDK preloaded" if host.warm else "")
            else:
                url = container.engine_url(container.Engine(kind.value))
                info = container.describe(container.Engine(kind.value), url)
                version, api = info.version, info.api_version
        except EngineUnavailableError as e:
            failed = True
            table.add_row(str(kind), url, "-", "-", "[red]unavailable[/]")
            output.error(str(e))
            continue
        table.add_row(str(kind), url, version, api, "[green]ready[/]")
    output.out.print(table)
    if failed:
        raise typer.Exit(1)


@app.command("run")
def run_controller(
    specs: Path | None = typer.Option(
        None, "--specs", help="Directory of spec files to follow (never written)."
    ),
    runtime: flags.RuntimeChoice = typer.Option(
        flags.RuntimeChoice.DOCKER, "--runtime", help="Where instances run."
    ),
    plugin_root: Path | None = typer.Option(
        None,
        "--plugin-root",
        help="--runtime process: plugin directories (spec.process.path) lie under it "
        "(default DATA_DIR/plugins).",
    ),
    data_dir: Path | None = flags.DATA_DIR,
    workers: int = typer.Option(8, "--workers", min=1, max=256, help="Parallel reconcilers."),
    resync_seconds: float = typer.Option(
        300.0, "--resync-seconds", min=1.0, help="Seconds between full resyncs."
    ),
    host_path_root: Path | None = typer.Option(
        None, "--host-path-root", help="Host paths in specs must lie under it (default: none)."
    ),
    start_cpu: int = typer.Option(
        flags.START_CPU_MILLIS,
        "--start-cpu",
        min=0,
        help="Docker, Podman and processes: millicores an instance may use until its socket "
        "accepts, where its spec allows less; then the spec's limit (0: the spec's from the "
        "start). A spec's resources.startCpu overrides it.",
    ),
    controller_id: str = typer.Option(
        "default",
        "--controller-id",
        help="Identity on the engine: a controller owns only what carries its id.",
    ),
    gateway_addr: str = typer.Option(
        "127.0.0.1:8080", "--gateway-addr", help="The gateway's HTTP address, HOST:PORT."
    ),
    gateway_grpc_addr: str = typer.Option(
        "127.0.0.1:8081",
        "--gateway-grpc-addr",
        help='The gateway\'s gRPC address, HOST:PORT ("" for none).',
    ),
    gateway_tokens: Path | None = typer.Option(
        None,
        "--gateway-tokens",
        help="YAML file of bearer tokens and the plugins each may call (mode 0600). "
        "Without it the gateway listens on loopback only and asks for no token.",
    ),
    gateway_tls_cert: Path | None = typer.Option(
        None,
        "--gateway-tls-cert",
        help="PEM certificate (chain) the gateway serves HTTPS and gRPC over TLS with; "
        "needs --gateway-tls-key.",
    ),
    gateway_tls_key: Path | None = typer.Option(
        None, "--gateway-tls-key", help="PEM private key of --gateway-tls-cert (mode 0600)."
    ),
    gateway_tls_client_ca: Path | None = typer.Option(
        None,
        "--gateway-tls-client-ca",
        help="PEM CA the gateway requires callers' client certificates from; a caller "
        "without a token is the --gateway-tokens entry that lists its certificate.",
    ),
    gateway_header_timeout: float = typer.Option(
        10.0,
        "--gateway-header-timeout",
        min=0.001,
        help="Seconds a new gateway connection has to send its first request's headers.",
    ),
    gateway_idle_timeout: float = typer.Option(
        60.0,
        "--gateway-idle-timeout",
        min=0.001,
        help="Seconds a gateway connection with no call in progress stays open.",
    ),
    gateway_max_connections: int = typer.Option(
        4096,
        "--gateway-max-connections",
        min=1,
        help="Open connections per gateway listener; past it the oldest idle one is closed.",
    ),
    gateway_mode: flags.GatewayMode = typer.Option(
        flags.GatewayMode.PROCESS,
        "--gateway",
        help="process: the gateway in a process of its own, adopted if one runs on the data "
        "directory, else started and supervised (it outlives the controller); external: one "
        "started with bhctl gateway, never started here; in-process: inside the controller. "
        "On Kubernetes: in the leader's pod, unless --gateway-service.",
    ),
    gateway_service: str = typer.Option(
        "",
        "--gateway-service",
        help="With --kubernetes: the headless Service of the gateway's own Deployment; the "
        "controller sends its routes to every endpoint (port named control).",
    ),
    gateway_control_secret: Path | None = typer.Option(
        None,
        "--gateway-control-secret",
        help="With --gateway-service: the file of the secret the gateways ask for.",
    ),
    ca_secret: str = typer.Option(
        "",
        "--ca-secret",
        help="With --kubernetes: the Secret (kubernetes.io/tls, in the controller's namespace) "
        "of the CA that certifies the plugins' pods; made there on first start.",
    ),
    ca_existing_secret: str = typer.Option(
        "",
        "--ca-existing-secret",
        help="With --kubernetes: as --ca-secret, an operator's CA (tls.crt, tls.key: an ECDSA "
        "CA, e.g. cert-manager's), which must exist; the controller never writes it.",
    ),
    instance_cert_lifetime: float = typer.Option(
        3600.0,
        "--instance-cert-lifetime",
        min=10.0,
        max=30 * 86400.0,
        help="With --kubernetes: seconds the certificates of the plugins' pods live; each is "
        "renewed in its Secret at two thirds of it (the kubelet takes up to a minute or so to "
        "refresh the files: keep it well above that).",
    ),
    gateway_client_secret: str = typer.Option(
        "",
        "--gateway-client-secret",
        help="With --gateway-service: the Secret (in the controller's namespace) the leader "
        "keeps the gateways' client certificate renewed in; their pods mount it.",
    ),
    gateway_ack_timeout: float = typer.Option(
        2.0,
        "--gateway-ack-timeout",
        min=0.05,
        help="Seconds every gateway has to acknowledge a swap's hold and flip, else it rolls back.",
    ),
    gateway_hold_lease: float = typer.Option(
        3.0,
        "--gateway-hold-lease",
        min=0.1,
        max=60.0,
        help="Seconds the gateway keeps calls held for a controller that stops renewing "
        "the hold (it renews every third of it).",
    ),
    metrics_addr: str = typer.Option(
        "127.0.0.1:9100",
        "--metrics-addr",
        help='Where /metrics is served, HOST:PORT ("" for none).',
    ),
    dashboard_addr: str = typer.Option(
        "",
        "--dashboard-addr",
        help="Serve the web dashboard on HOST:PORT (off unless given; keep it on loopback, "
        "or behind a proxy). Read-only, but for --gateway-tokens entries with "
        "dashboard: admin.",
    ),
    memory_alert_share: float = typer.Option(
        0.9,
        "--memory-alert-share",
        min=0.01,
        max=1.0,
        help="MemoryNearLimit: working set above this share of the limit ...",
    ),
    memory_alert_seconds: float = typer.Option(
        60.0, "--memory-alert-seconds", min=0, help="... for this many seconds."
    ),
    throttle_alert_ratio: float = typer.Option(
        0.25,
        "--throttle-alert-ratio",
        min=0.0,
        max=1.0,
        help="CPUThrottled: the share of CPU periods throttled above this.",
    ),
    restart_burst: int = typer.Option(
        3, "--restart-burst", min=1, help="RestartBurst: this many restarts within 5 minutes."
    ),
    plugins_dir: Path | None = typer.Option(
        None, "--plugins-dir", help="Install every plugin bundle in this directory at start."
    ),
    webhook_secret: Path | None = typer.Option(
        None,
        "--webhook-secret",
        help="File of the secret (mode 0600, 16 bytes or more) that signs the swaps' "
        "webhooks (HMAC-SHA256); without it they are sent unsigned.",
    ),
    prometheus_url: str | None = typer.Option(
        None,
        "--prometheus-url",
        help="The Prometheus (http(s)://HOST:PORT) that swaps' Prometheus analyses query.",
    ),
    ca_cert: Path | None = typer.Option(
        None,
        "--ca-cert",
        help="The CA certificate (PEM) that certifies plugins reached over TLS, with "
        "--ca-key; default a CA the controller makes in its data directory.",
    ),
    ca_key: Path | None = typer.Option(
        None, "--ca-key", help="The private key (PEM, ECDSA, mode 0600) of --ca-cert."
    ),
    client_cert_lifetime: float = typer.Option(
        3600.0,
        "--client-cert-lifetime",
        min=10.0,
        max=30 * 86400.0,
        help="Seconds the client certificates of the controller and of the gateway (with "
        "which they reach remote plugins) live; each is renewed at two thirds of it.",
    ),
    trust_dir: Path | None = flags.TRUST_DIR,
    policy: Path | None = flags.POLICY,
    log_format: flags.LogFormat = typer.Option(flags.LogFormat.TEXT, "--log-format"),
    log_level: flags.LogLevel = typer.Option(flags.LogLevel.INFO, "--log-level"),
    on_kubernetes: bool = typer.Option(
        False,
        "--kubernetes",
        help="Follow Plugin objects on Kubernetes and run them as pods (instead of --specs "
        "and --runtime).",
    ),
    kubeconfig: str | None = typer.Option(
        None, "--kubeconfig", help="With --kubernetes: default the pod's service account."
    ),
    watch_namespace: list[str] | None = typer.Option(
        None,
        "--watch-namespace",
        help="With --kubernetes: a namespace to follow (repeat); default all.",
    ),
    leader_elect: bool = typer.Option(
        True,
        "--leader-elect/--no-leader-elect",
        help="With --kubernetes: act only while holding the Lease, so replicas are safe.",
    ),
    lease_name: str = typer.Option("blackhole-controller", "--lease-name"),
    lease_namespace: str | None = typer.Option(
        None, "--lease-namespace", help="Default: $POD_NAMESPACE, else default."
    ),
    lease_seconds: float = typer.Option(15.0, "--lease-seconds", min=1.0),
    renew_seconds: float = typer.Option(10.0, "--renew-seconds", min=0.5),
    retry_seconds: float = typer.Option(2.0, "--retry-seconds", min=0.1),
    image_pull_secret: list[str] | None = typer.Option(
        None,
        "--image-pull-secret",
        help="With --kubernetes: a Secret (in each plugin's namespace) that plugin images are "
        "pulled with (repeat).",
    ),
    dns_namespace: str = typer.Option(
        "kube-system",
        "--dns-namespace",
        help="With --kubernetes: the namespace of the cluster DNS pods that plugins with named "
        "egress destinations may query.",
    ),
    dns_selector: str = typer.Option(
        "k8s-app=kube-dns",
        "--dns-selector",
        help="With --kubernetes: the labels of those DNS pods (key=value[,key=value]).",
    ),
    storage_class: str | None = typer.Option(
        None,
        "--storage-class",
        help="With --kubernetes: the StorageClass of plugins' volume claims; default the "
        "cluster's default class.",
    ),
    network_policy_enforced: bool = typer.Option(
        False,
        "--network-policy-enforced",
        help="With --kubernetes: you checked that the cluster enforces NetworkPolicy (the API "
        "cannot tell); without it every plugin's status says its isolation is unverified.",
    ),
) -> None:
    """Run the controller in the foreground until SIGTERM; instances keep running after it."""
    from controller.cli import logs, run
    from controller.errors import ControllerError
    from controller.gateway import connections
    from controller.metrics import violations

    if specs is not None and not specs.is_dir():
        raise typer.BadParameter(f"{specs} is not a directory", param_hint="--specs")
    if on_kubernetes and specs is not None:
        raise typer.BadParameter(
            "Plugin objects are the specs on Kubernetes; drop --specs", param_hint="--specs"
        )
    kubernetes = None
    if on_kubernetes:
        namespace = lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
        pod = os.environ.get("POD_NAME") or None
        try:
            kubernetes = run.KubernetesOptions(
                kubeconfig=kubeconfig,
                namespaces=tuple(watch_namespace or ()),
                controller_namespace=namespace,
                leader_elect=leader_elect,
                lease_name=lease_name,
                lease_seconds=lease_seconds,
                renew_seconds=renew_seconds,
                retry_seconds=retry_seconds,
                identity=pod or f"{socket.gethostname()}-{os.getpid()}",
                pod=pod,
                gateway_service=gateway_service or None,
                gateway_control_secret=gateway_control_secret,
                image_pull_secrets=tuple(image_pull_secret or ()),
                dns=_dns(dns_namespace, dns_selector),
                storage_class=storage_class or None,
                network_policy_enforced=network_policy_enforced,
                ca_secret=ca_existing_secret or ca_secret or None,
                ca_secret_given=bool(ca_existing_secret),
                gateway_client_secret=gateway_client_secret or None,
                instance_cert_lifetime=instance_cert_lifetime,
            )
            kubernetes.lease()
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--lease-seconds") from None
    if (ca_cert is None) != (ca_key is None):
        raise typer.BadParameter("give both --ca-cert and --ca-key", param_hint="--ca-cert")
    listener_files = _tls_files(
        gateway_tls_cert, gateway_tls_key, gateway_tls_client_ca, "--gateway-tls"
    )
    logs.configure(log_format, log_level)
    options = run.Options(
        specs=specs,
        runtime=runtime,
        data_dir=data_dir or run.default_data_dir(),
        workers=workers,
        resync_seconds=resync_seconds,
        host_path_root=host_path_root,
        start_cpu_millis=start_cpu,
        controller_id=controller_id,
        gateway_address=gateway_addr,
        gateway_grpc_address=gateway_grpc_addr or None,
        gateway_tokens=gateway_tokens,
        gateway_tls=listener_files,
        gateway_limits=connections.Limits(
            header_timeout=gateway_header_timeout,
            idle_timeout=gateway_idle_timeout,
            max_connections=gateway_max_connections,
        ),
        metrics_address=metrics_addr or None,
        dashboard_address=dashboard_addr or None,
        plugin_root=plugin_root,
        thresholds=violations.Thresholds(
            memory_share=memory_alert_share,
            memory_seconds=memory_alert_seconds,
            throttled_ratio=throttle_alert_ratio,
            restart_burst=restart_burst,
        ),
        kubernetes=kubernetes,
        plugins_dir=plugins_dir,
        webhook_secret=webhook_secret,
        prometheus_url=prometheus_url,
        ca=(ca_cert, ca_key) if ca_cert is not None and ca_key is not None else None,
        client_cert_lifetime=client_cert_lifetime,
        trust_dir=trust_dir,
        policy=policy,
        gateway_mode=gateway_mode,
        hold_lease=gateway_hold_lease,
        ack_timeout=gateway_ack_timeout,
    )
    try:
        with asyncio.Runner(loop_factory=run.loop_factory()) as runner:
            runner.run(run.serve(options))
    except ControllerError as e:
        output.fail(str(e))


def _tls_files(
    cert: Path | None, key: Path | None, client_ca: Path | None, prefix: str
) -> tuple[Path, Path, Path | None] | None:
    """The listeners' TLS files, given together (checked when the gateway starts)."""
    if (cert is None) != (key is None):
        raise typer.BadParameter(
            f"give both {prefix}-cert and {prefix}-key", param_hint=f"{prefix}-cert"
        )
    if cert is None or key is None:
        if client_ca is not None:
            raise typer.BadParameter(
                f"{prefix}-client-ca needs {prefix}-cert and {prefix}-key",
                param_hint=f"{prefix}-client-ca",
            )
        return None
    return cert, key, client_ca


@app.command("gateway")
def run_gateway(
    data_dir: Path | None = flags.DATA_DIR,
    addr: str = typer.Option("127.0.0.1:8080", "--addr", help="HTTP address, HOST:PORT."),
    grpc_addr: str = typer.Option(
        "127.0.0.1:8081", "--grpc-addr", help='gRPC address, HOST:PORT ("" for none).'
    ),
    tokens: Path | None = typer.Option(
        None,
        "--tokens",
        help="YAML file of bearer tokens (mode 0600); without it, loopback addresses only.",
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="PEM certificate (chain): serve HTTPS and gRPC over TLS."
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", help="PEM private key of --tls-cert (mode 0600)."
    ),
    tls_client_ca: Path | None = typer.Option(
        None,
        "--tls-client-ca",
        help="PEM CA callers' client certificates must come from (see --tokens).",
    ),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.001),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", min=0.001),
    max_connections: int = typer.Option(4096, "--max-connections", min=1),
    metrics_addr: str = typer.Option(
        "",
        "--metrics-addr",
        help="Its own /metrics, HOST:PORT (default none: the controller's /metrics carries "
        "the gateway's series).",
    ),
    ready_timeout: float = typer.Option(
        10.0,
        "--ready-timeout",
        min=0.0,
        help="Seconds a call waits for the first route table after a start, then 503.",
    ),
    control_addr: str = typer.Option(
        "",
        "--control-addr",
        help="Also take controllers on TCP, HOST:PORT (Kubernetes), with --control-secret.",
    ),
    control_secret: Path | None = typer.Option(
        None,
        "--control-secret",
        help="File of the secret a controller proves on --control-addr (16 bytes or more).",
    ),
    controller_id: str = typer.Option(
        "default", "--controller-id", help="The --controller-id of the controller it serves."
    ),
    ca_cert: Path | None = typer.Option(
        None,
        "--ca-cert",
        help="The operator's CA the controller runs with (with --ca-key): the gateway renews "
        "its client certificate with it when due. Default the controller's own CA, if any.",
    ),
    ca_key: Path | None = typer.Option(None, "--ca-key", help="The key of --ca-cert."),
    client_cert_lifetime: float = typer.Option(
        3600.0,
        "--client-cert-lifetime",
        min=10.0,
        max=30 * 86400.0,
        help="Seconds its client certificate lives when it renews it (as bhctl run's).",
    ),
    stop: bool = typer.Option(
        False, "--stop", help="Stop the gateway running on the data directory, and exit."
    ),
    status: bool = typer.Option(
        False, "--status", help="Print the running gateway's routes, as JSON, and exit."
    ),
    log_format: flags.LogFormat = typer.Option(flags.LogFormat.TEXT, "--log-format"),
    log_level: flags.LogLevel = typer.Option(flags.LogLevel.INFO, "--log-level"),
) -> None:
    """Run the gateway in the foreground until SIGTERM; bhctl run sends it its routes."""
    from controller.cli import gateway, logs, run
    from controller.errors import ControllerError
    from controller.gateway import connections, tls

    directory = data_dir or run.default_data_dir()
    if stop:
        pid = gateway.stop_running(directory)
        output.out.print(f"stopped the gateway (pid {pid})" if pid else "no gateway was running")
        return
    if status:
        output.out.print(json.dumps(gateway.status(directory), indent=2))
        return
    if (ca_cert is None) != (ca_key is None):
        raise typer.BadParameter("give both --ca-cert and --ca-key", param_hint="--ca-cert")
    logs.configure(log_format, log_level)
    listener_files = _tls_files(tls_cert, tls_key, tls_client_ca, "--tls")
    limits = connections.Limits(
        header_timeout=header_timeout, idle_timeout=idle_timeout, max_connections=max_connections
    )
    options = run.Options(
        specs=None,
        runtime=flags.RuntimeChoice.PROCESS,
        data_dir=directory,
        workers=1,
        resync_seconds=300,
        host_path_root=None,
        controller_id="default",
        gateway_address=addr,
        gateway_grpc_address=grpc_addr or None,
        gateway_tokens=tokens,
        gateway_tls=listener_files,
    )
    try:
        found = run.gateway_tokens(options)
        listener_tls = run.gateway_tls(options, tls.GATEWAY_FLAGS)
        run.own_data_dir(directory)
        limits = run.fit_gateway_limits(limits, run.open_files_limit())
        settings = gateway.GatewayOptions(
            data_dir=directory,
            address=addr,
            grpc_address=grpc_addr or None,
            tokens=tokens,
            limits=limits,
            metrics_address=metrics_addr or None,
            ready_timeout=ready_timeout,
            control_address=control_addr or None,
            control_secret=control_secret,
            controller_id=controller_id,
            ca=(ca_cert, ca_key) if ca_cert is not None and ca_key is not None else None,
            client_cert_lifetime=client_cert_lifetime,
            tls=listener_files,
        )
        with asyncio.Runner(loop_factory=run.loop_factory()) as runner:
            runner.run(gateway.serve(settings, found, listener_tls))
    except ControllerError as e:
        output.fail(str(e))


control.register(app)
app.add_typer(swap.app, name="swap")
app.add_typer(state.app, name="state")
app.add_typer(plugin.app, name="plugin")
app.add_typer(certificate.app, name="certificate")


def _remote_or_bundle(spec: models.PluginSpec) -> str:
    return f"remote at {spec.remote.address}" if spec.remote else "from the bundle"


def main() -> None:
    app()


def _dns(namespace: str, selector: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``--dns-namespace`` and ``--dns-selector`` as (namespace, labels)."""
    labels = []
    for term in selector.split(","):
        key, equals, value = term.strip().partition("=")
        if not equals or not key or not value:
            raise typer.BadParameter(
                f"{term.strip()!r} is not key=value, e.g. k8s-app=kube-dns",
                param_hint="--dns-selector",
            )
        labels.append((key, value))
    return namespace, tuple(labels)
