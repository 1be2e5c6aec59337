"""``bhctl`` commands: the controller (run), its admin client (apply, get, describe, delete,
logs) and offline tools (validate, crd, engines, version).

The CLI is the top layer: it may import every other part of the controller,
and nothing imports it. It is the only place that prints.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import platform
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

import controller
from controller.admin import client as admin_client
from controller.cli import gateway, logs, plugin, run
from controller.errors import ControllerError, EngineUnavailableError, SpecError
from controller.gateway import connections
from controller.metrics import violations
from controller.runtimes import container, process
from controller.spec import crd, loader, models

app = typer.Typer(
    name="bhctl",
    help="Blackhole plugin controller: run isolated, hot-swappable plugins from declarative specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables keep their full width when the output is piped (scripts, CI logs).
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
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
            f"{spec.version or spec.bundle} ({escape(spec.image or 'from the bundle')})"
        )


@app.command()
def engines(
    engine: list[run.RuntimeChoice] = typer.Option(
        list(run.RuntimeChoice), "--engine", "-e", help="Runtimes to check (default: all)."
    ),
) -> None:
    """Check that the container engines answer and that processes can be run; exit 1 if not."""
    table = Table("ENGINE", "ENDPOINT", "VERSION", "API", "STATUS", box=None)
    failed = False
    for kind in engine:
        try:
            if kind is run.RuntimeChoice.PROCESS:
                url = "-"
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
            err.print(f"[red]error[/]: {escape(str(e))}")
            continue
        table.add_row(str(kind), url, version, api, "[green]ready[/]")
    out.print(table)
    if failed:
        raise typer.Exit(1)


DATA_DIR = typer.Option(
    None,
    "--data-dir",
    envvar="BLACKHOLE_DATA_DIR",
    help="The controller's data directory (default /var/lib/blackhole as root).",
)


@app.command("run")
def run_controller(
    specs: Path | None = typer.Option(
        None, "--specs", help="Directory of spec files to follow (never written)."
    ),
    runtime: run.RuntimeChoice = typer.Option(
        run.RuntimeChoice.DOCKER, "--runtime", help="Where instances run."
    ),
    plugin_root: Path | None = typer.Option(
        None,
        "--plugin-root",
        help="--runtime process: plugin directories (spec.process.path) lie under it "
        "(default DATA_DIR/plugins).",
    ),
    data_dir: Path | None = DATA_DIR,
    workers: int = typer.Option(8, "--workers", min=1, max=256, help="Parallel reconcilers."),
    resync_seconds: float = typer.Option(
        300.0, "--resync-seconds", min=1.0, help="Seconds between full resyncs."
    ),
    host_path_root: Path | None = typer.Option(
        None, "--host-path-root", help="Host paths in specs must lie under it (default: none)."
    ),
    start_cpu: int = typer.Option(
        container.START_CPU_MILLIS,
        "--start-cpu",
        min=0,
        help="Docker and Podman: millicores an instance may use until its socket accepts, "
        "where its spec allows less; then the spec's limit (0: the spec's from the start).",
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
    gateway_mode: run.GatewayMode = typer.Option(
        run.GatewayMode.PROCESS,
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
    trust_dir: Path | None = plugin.TRUST_DIR,
    policy: Path | None = plugin.POLICY,
    log_format: str = typer.Option("text", "--log-format", help="text or json"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
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
) -> None:
    """Run the controller in the foreground until SIGTERM; instances keep running after it."""
    if log_format not in {"text", "json"}:
        raise typer.BadParameter(f'"{log_format}"; use text or json', param_hint="--log-format")
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
            )
            kubernetes.lease()
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--lease-seconds") from None
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
        gateway_limits=connections.Limits(
            header_timeout=gateway_header_timeout,
            idle_timeout=gateway_idle_timeout,
            max_connections=gateway_max_connections,
        ),
        metrics_address=metrics_addr or None,
        plugin_root=plugin_root,
        thresholds=violations.Thresholds(
            memory_share=memory_alert_share,
            memory_seconds=memory_alert_seconds,
            throttled_ratio=throttle_alert_ratio,
            restart_burst=restart_burst,
        ),
        kubernetes=kubernetes,
        plugins_dir=plugins_dir,
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
        err.print(f"[red]error[/]: {escape(str(e))}")
        raise typer.Exit(1) from None


@app.command("gateway")
def run_gateway(
    data_dir: Path | None = DATA_DIR,
    addr: str = typer.Option("127.0.0.1:8080", "--addr", help="HTTP address, HOST:PORT."),
    grpc_addr: str = typer.Option(
        "127.0.0.1:8081", "--grpc-addr", help='gRPC address, HOST:PORT ("" for none).'
    ),
    tokens: Path | None = typer.Option(
        None,
        "--tokens",
        help="YAML file of bearer tokens (mode 0600); without it, loopback addresses only.",
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
    stop: bool = typer.Option(
        False, "--stop", help="Stop the gateway running on the data directory, and exit."
    ),
    status: bool = typer.Option(
        False, "--status", help="Print the running gateway's routes, as JSON, and exit."
    ),
    log_format: str = typer.Option("text", "--log-format", help="text or json"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
) -> None:
    """Run the gateway in the foreground until SIGTERM; bhctl run sends it its routes."""
    directory = data_dir or run.default_data_dir()
    if stop:
        pid = gateway.stop_running(directory)
        out.print(f"stopped the gateway (pid {pid})" if pid else "no gateway was running")
        return
    if status:
        out.print(json.dumps(gateway.status(directory), indent=2))
        return
    if log_format not in {"text", "json"}:
        raise typer.BadParameter(f'"{log_format}"; use text or json', param_hint="--log-format")
    logs.configure(log_format, log_level)
    limits = connections.Limits(
        header_timeout=header_timeout, idle_timeout=idle_timeout, max_connections=max_connections
    )
    options = run.Options(
        specs=None,
        runtime=run.RuntimeChoice.PROCESS,
        data_dir=directory,
        workers=1,
        resync_seconds=300,
        host_path_root=None,
        controller_id="default",
        gateway_address=addr,
        gateway_grpc_address=grpc_addr or None,
        gateway_tokens=tokens,
    )
    try:
        found = run.gateway_tokens(options)
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
        )
        with asyncio.Runner(loop_factory=run.loop_factory()) as runner:
            runner.run(gateway.serve(settings, found))
    except ControllerError as e:
        err.print(f"[red]error[/]: {escape(str(e))}")
        raise typer.Exit(1) from None


def _client(data_dir: Path | None) -> admin_client.AdminClient:
    return admin_client.AdminClient(run.admin_socket(data_dir or run.default_data_dir()))


def _fail(e: ControllerError) -> typer.Exit:
    err.print(f"[red]error[/]: {escape(str(e))}")
    return typer.Exit(1)


@app.command()
def apply(
    files: list[Path] = typer.Option(..., "--filename", "-f", help="Spec files to apply."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Apply specs to the running controller (kept in its data directory)."""
    admin = _client(data_dir)
    for path in files:
        try:
            text = path.read_bytes()  # decoded and checked by the controller
        except OSError as e:
            err.print(f"[red]error[/]: {escape(str(path))}: {escape(e.strerror or str(e))}")
            raise typer.Exit(1) from None
        try:
            answer = admin.apply(text, str(path))
        except ControllerError as e:
            raise _fail(e) from None
        for item in answer["applied"]:
            out.print(f"plugin/{item['name']} applied (generation {item['generation']})")


def _condition(document: dict[str, Any], type_: str) -> dict[str, Any]:
    for condition in (document.get("status") or {}).get("conditions", []):
        if condition["type"] == type_:
            return dict(condition)
    return {}


def _age(since: str | None) -> str:
    if not since:
        return "-"
    seconds = int((datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


_PHASE_STYLE = {"Running": "green", "Pending": "yellow", "Degraded": "red", "Failed": "red"}


@app.command()
def get(
    name: str | None = typer.Argument(None, help="One plugin (default: all)."),
    output: str = typer.Option("table", "--output", "-o", help="table, wide, json or yaml"),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """List plugins with their status."""
    if output not in {"table", "wide", "json", "yaml"}:
        raise typer.BadParameter(f'"{output}"; use table, wide, json or yaml', param_hint="-o")
    admin = _client(data_dir)
    try:
        if name is None:
            answer = admin.list()
            items, errors = answer["items"], answer["errors"]
            controller_conditions = (answer.get("controller") or {}).get("conditions", [])
        else:
            items, errors, controller_conditions = [admin.get(name)["plugin"]], [], []
    except ControllerError as e:
        raise _fail(e) from None
    if output in {"json", "yaml"}:
        document: Any = items[0] if name else {"apiVersion": "v1", "kind": "List", "items": items}
        if output == "json":
            sys.stdout.write(json.dumps(document, indent=2) + "\n")
        else:
            sys.stdout.write(yaml.safe_dump(document, sort_keys=False))
        return
    columns = ["NAME", "VERSION", "PHASE", "READY", "RESTARTS", "ACTIVE", "AGE"]
    if output == "wide":
        columns += ["IMAGE", "REASON", "MESSAGE"]
    table = Table(*columns, box=None)
    for item in items:
        status = item.get("status") or {}
        ready = _condition(item, "Ready")
        phase = status.get("phase", "Pending")
        restarts = sum(i.get("restarts", 0) for i in status.get("instances", []))
        row = [
            item["metadata"]["name"],
            str(item["spec"].get("version") or status.get("activeVersion") or "-"),
            f"[{_PHASE_STYLE.get(phase, 'white')}]{phase}[/]",
            ready.get("status", "Unknown"),
            str(restarts),
            status.get("activeColor", "-"),
            _age(ready.get("lastTransitionTime")),
        ]
        if output == "wide":
            message = ready.get("message", "").splitlines()
            image = item["spec"].get("image") or item["spec"]["bundle"]
            row += [image, ready.get("reason", "-"), message[0] if message else ""]
        table.add_row(*(escape(c) if "[" not in c else c for c in row))
    out.print(table)
    for error in errors:
        err.print(f"[yellow]warning[/]: {escape(error['origin'])}: {escape(error['message'])}")
    for condition in controller_conditions:  # the controller's own stores
        err.print(
            f"[red]controller[/]: {condition['type']} ({condition['reason']}): "
            f"{escape(condition.get('message', ''))}"
        )


@app.command()
def describe(name: str = typer.Argument(...), data_dir: Path | None = DATA_DIR) -> None:
    """Show one plugin: spec, status, conditions, instances and events."""
    try:
        answer = _client(data_dir).get(name)
    except ControllerError as e:
        raise _fail(e) from None
    plugin, status = answer["plugin"], answer["plugin"].get("status") or {}
    spec = plugin["spec"]
    resources = spec.get("resources", {})
    out.print(f"[bold]Name:[/]        {escape(plugin['metadata']['name'])}")
    out.print(f"[bold]Declared in:[/] {escape(answer['origin'])}")
    if "bundle" in spec:
        out.print(f"[bold]Bundle:[/]      {escape(spec['bundle'])}")
    out.print(f"[bold]Image:[/]       {escape(spec.get('image', '(from the bundle)'))}")
    out.print(f"[bold]Version:[/]     {spec.get('version', status.get('activeVersion', '-'))}")
    out.print(
        f"[bold]Resources:[/]   cpu {resources.get('cpu')}, memory {resources.get('memory')}, "
        f"pids {resources.get('pids')}"
    )
    out.print(f"[bold]Network:[/]     {spec.get('permissions', {}).get('network', 'none')}")
    out.print(
        f"[bold]Phase:[/]       {status.get('phase', 'Pending')} "
        f"(generation {plugin['metadata'].get('generation')}, observed "
        f"{status.get('observedGeneration', '-')})"
    )
    if swap := status.get("swap"):
        out.print(
            f"[bold]Swap:[/]        {swap['fromVersion']} ({swap['fromColor']}) -> "
            f"{swap['toVersion']} ({swap['toColor']}): {swap['step']}"
        )
    if last := status.get("lastSwap"):
        pause = last.get("pauseMilliseconds")
        out.print(
            f"[bold]Last swap:[/]   {last['from']} -> {last['to']}: {last['result']}"
            + (f" ({last['reason']})" if last.get("reason") else "")
            + (f", calls held {pause} ms" if pause is not None else "")
        )
    conditions = Table("TYPE", "STATUS", "REASON", "SINCE", "MESSAGE", box=None, title="Conditions")
    for c in status.get("conditions", []):
        conditions.add_row(
            c["type"],
            c["status"],
            c["reason"],
            _age(c["lastTransitionTime"]),
            escape(c.get("message", "")),
        )
    out.print(conditions)
    instances = Table(
        "COLOR", "VERSION", "STATE", "READY", "RESTARTS", "LAST EXIT", box=None, title="Instances"
    )
    for i in status.get("instances", []):
        exit_code = i.get("lastExitCode")
        last = "-" if exit_code is None else str(exit_code) + (" OOM" if i.get("oomKilled") else "")
        instances.add_row(
            i["color"],
            i["version"],
            i["state"],
            str(i.get("ready", False)),
            str(i.get("restarts", 0)),
            last,
        )
    out.print(instances)
    events = Table("TYPE", "REASON", "AGE", "COUNT", "MESSAGE", box=None, title="Events")
    for event in answer["events"]:
        events.add_row(
            event["type"],
            event["reason"],
            _age(event["lastTimestamp"]),
            str(event["count"]),
            escape(event["message"]),
        )
    out.print(events)


@app.command()
def delete(name: str = typer.Argument(...), data_dir: Path | None = DATA_DIR) -> None:
    """Delete an applied plugin: its instances and networks go; named volumes stay."""
    try:
        _client(data_dir).delete(name)
    except ControllerError as e:
        raise _fail(e) from None
    out.print(f"plugin/{name} deleted")


@app.command("logs")
def show_logs(
    name: str = typer.Argument(...),
    color: str | None = typer.Option(None, "--color", help="blue or green (default: active)."),
    tail: int = typer.Option(100, "--tail", min=0, help="Lines to show."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Print the last lines an instance wrote."""
    try:
        answer = _client(data_dir).logs(name, color, tail)
    except ControllerError as e:
        raise _fail(e) from None
    for line in answer["lines"]:
        sys.stdout.write(line + "\n")


@app.command()
def top(
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until Ctrl-C."),
    interval: float = typer.Option(2.0, "--interval", min=0.5, help="Seconds between refreshes."),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """The plugins' resource use, read from their cgroups (as /metrics is)."""
    admin = _client(data_dir)

    def table() -> Table:
        rows = admin.top()["instances"]
        grid = Table("PLUGIN", "COLOR", "VERSION", "CPU", "MEMORY", "LIMIT", "MEM%", "PIDS",
                     "NET RX/TX", "DISK R/W")  # fmt: skip
        for row in rows:
            limit = row["memoryLimitBytes"]
            share = f"{row['memoryWorkingSetBytes'] / limit:.0%}" if limit else "-"
            grid.add_row(
                (f"{row['namespace']}/" if row["namespace"] else "") + row["plugin"],
                row["color"],
                row["version"],
                f"{row['cpuCores'] * 1000:.0f}m",
                _bytes(row["memoryWorkingSetBytes"]),
                _bytes(limit) if limit else "-",
                share,
                str(row["pids"]),
                f"{_bytes(row['networkReceiveBytes'])}/{_bytes(row['networkTransmitBytes'])}",
                f"{_bytes(row['fsReadBytes'])}/{_bytes(row['fsWriteBytes'])}",
            )
        return grid

    try:
        if not watch:
            out.print(table())
            return
        with Live(table(), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(table())
    except ControllerError as e:
        raise _fail(e) from None
    except KeyboardInterrupt:
        return


def _bytes(value: float) -> str:
    for unit in ("B", "Ki", "Mi", "Gi"):
        if value < 1024 or unit == "Gi":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}Gi"


swap_app = typer.Typer(
    help="Steer a blue/green swap: promote, abort, undo, retry.", no_args_is_help=True
)
state_app = typer.Typer(help="Plugins' state snapshots.", no_args_is_help=True)
app.add_typer(plugin.app, name="plugin")
app.add_typer(swap_app, name="swap")
app.add_typer(state_app, name="state")


@swap_app.command("promote")
def swap_promote(name: str = typer.Argument(...), data_dir: Path | None = DATA_DIR) -> None:
    """Promote a new version that waits for it (hotSwap.autoPromote: false)."""
    _swap(name, "promote", data_dir)


@swap_app.command("abort")
def swap_abort(name: str = typer.Argument(...), data_dir: Path | None = DATA_DIR) -> None:
    """Roll a swap back: before promotion, or within the scale-down window after it."""
    _swap(name, "abort", data_dir)


@swap_app.command("undo")
def swap_undo(name: str = typer.Argument(...), data_dir: Path | None = DATA_DIR) -> None:
    """Go back to the version the last swap came from, its state from the latest snapshot.

    It stays (condition Pinned) until the plugin's spec changes.
    """
    _swap(name, "undo", data_dir)


@swap_app.command("retry")
def swap_retry(name: str = typer.Argument(...), data_dir: Path | None = DATA_DIR) -> None:
    """Try a rolled-back swap again with the same spec (editing the spec does too)."""
    _swap(name, "retry", data_dir)


def _swap(name: str, action: str, data_dir: Path | None) -> None:
    try:
        _client(data_dir).swap(name, action)
    except ControllerError as e:
        raise _fail(e) from None
    out.print(f"{action} requested for {escape(name)}; watch bhctl describe {escape(name)}")


@state_app.command("history")
def state_history(name: str = typer.Argument(...), data_dir: Path | None = DATA_DIR) -> None:
    """The state snapshots kept for a plugin, oldest first."""
    try:
        snapshots = _client(data_dir).state_history(name)["snapshots"]
    except ControllerError as e:
        raise _fail(e) from None
    table = Table("ID", "TAKEN", "VERSION", "STATE VERSION", "SIZE", "SHA256", "REASON", "KIND")
    for s in snapshots:
        table.add_row(
            str(s["id"]), _age(s["takenAt"]), s["pluginVersion"], str(s["stateVersion"]),
            str(s["size"]), s["sha256"][:12], s["reason"], "delta" if s.get("delta") else "full",
        )  # fmt: skip
    out.print(table)


@state_app.command("export")
def state_export(
    name: str = typer.Argument(...),
    output: Path = typer.Option(..., "--output", "-o", help="File to write the state to."),
    snapshot: int | None = typer.Option(
        None, "--snapshot", help="A stored snapshot's id (default: the live state, kept too)."
    ),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Write a plugin's state (live, or a stored snapshot) to a file."""
    try:
        answer = _client(data_dir).state_export(name, snapshot)
    except ControllerError as e:
        raise _fail(e) from None
    data = base64.b64decode(answer["data"])
    # A plugin's state may hold its secrets: the file is private from its first byte.
    descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(descriptor, 0o600)  # a file that was there keeps its mode otherwise
        handle.write(data)
    meta = answer["snapshot"]
    out.print(
        f"wrote {meta['size']} bytes of state version {meta['stateVersion']} "
        f"(sha256 {meta['sha256'][:12]}..., snapshot {meta['id']}) to {escape(str(output))}"
    )


@state_app.command("import")
def state_import(
    name: str = typer.Argument(...),
    source: Path = typer.Argument(..., help="File of state bytes, e.g. from bhctl state export."),
    state_version: int = typer.Option(
        ..., "--state-version", min=1, help="The state version the bytes are in."
    ),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Replace a plugin's state (calls held meanwhile); what it had is kept as a snapshot."""
    try:
        data = source.read_bytes()
    except OSError as e:
        raise typer.BadParameter(f"{source}: {e.strerror}", param_hint="SOURCE") from None
    try:
        answer = _client(data_dir).state_import(name, state_version, data)
    except ControllerError as e:
        raise _fail(e) from None
    out.print(
        f"imported {len(data)} bytes into {escape(name)} (now state version "
        f"{answer['stateVersion']}); its previous state is snapshot {answer['previous']['id']}"
    )


@app.command()
def call(
    name: str = typer.Argument(..., help="The plugin."),
    method: str = typer.Argument(..., help="The method to call."),
    data: str = typer.Option(
        "", "--data", "-d", help="The payload: JSON, or @FILE to read it from a file."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", min=0.001, help="Seconds (at most the plugin's own timeout)."
    ),
    gateway: str | None = typer.Option(
        None,
        "--gateway",
        envvar="BLACKHOLE_GATEWAY",
        help="The gateway's HOST:PORT (default: what the running controller says).",
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="BLACKHOLE_TOKEN", help="Bearer token, when the gateway asks."
    ),
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Call a plugin through the gateway and print its answer."""
    payload = data.encode()
    if data.startswith("@"):
        try:
            payload = Path(data[1:]).read_bytes()
        except OSError as e:
            raise typer.BadParameter(f"{data[1:]}: {e.strerror}", param_hint="--data") from None
    if payload:
        try:
            json.loads(payload)
        except ValueError as e:
            raise typer.BadParameter(f"not JSON: {e}", param_hint="--data") from None
    address = gateway or run.gateway_address(data_dir or run.default_data_dir())
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if timeout is not None:
        headers["X-Timeout-Seconds"] = f"{timeout:g}"
    url = (
        f"http://{address}/v1/plugins/{urllib.parse.quote(name)}/call/{urllib.parse.quote(method)}"
    )
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=(timeout or 30) + 5) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        answer = e.read()
        try:
            problem = json.loads(answer)
            message = f"{problem['error']} ({e.code} {problem.get('reason', '')})"
        except (ValueError, KeyError, TypeError):
            message = f"{e.code} {answer.decode(errors='replace')}"
        err.print(f"[red]error[/]: {escape(message)}")
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        err.print(f"[red]error[/]: cannot reach the gateway at {address}: {escape(str(reason))}")
        raise typer.Exit(1) from None
    try:
        print(json.dumps(json.loads(body), indent=2) if body else "")
    except ValueError:
        sys.stdout.buffer.write(body)


def main() -> None:
    app()
