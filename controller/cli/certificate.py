"""``bhctl certificate``: certificates from the controller's CA for plugins it does not run.

A remote plugin (``spec.remote``) serves mutual TLS with a certificate that
names it; ``bhctl certificate issue`` makes one from the CA the controller
uses (its own in ``DATA_DIR/pki``, or ``--ca-cert``/``--ca-key``) into a
directory of ``tls.crt``, ``tls.key`` (0600) and ``ca.crt``, the files the
SDK's ``BLACKHOLE_TLS_CERT``, ``BLACKHOLE_TLS_KEY`` and ``BLACKHOLE_TLS_CA``
name. Issuing again into the same directory replaces the set in one rename
(the SDK serves the new one from the next connection on).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import typer

from controller.cli import flags, output
from controller.cli.paths import PKI_DIR, default_data_dir

app = typer.Typer(
    help="Certificates from the controller's CA for remote plugins.", no_args_is_help=True
)


@app.command("issue")
def issue(
    name: str = typer.Argument(..., help="The plugin's name (metadata.name of its spec)."),
    out: Path = typer.Option(
        ..., "--out", help="Directory to write tls.crt, tls.key (0600) and ca.crt into."
    ),
    host: list[str] = typer.Option(
        [], "--host", help="An address or DNS name it is reached at, put in its SAN (repeatable)."
    ),
    namespace: str | None = typer.Option(
        None, "--namespace", help='Its namespace (default "default", as on one host).'
    ),
    controller_id: str = typer.Option(
        "default", "--controller-id", help="The --controller-id of the controller that calls it."
    ),
    days: float = typer.Option(
        30.0, "--days", min=0.01, max=3650.0, help="Days it is valid; issue again before."
    ),
    ca_cert: Path | None = typer.Option(
        None, "--ca-cert", help="The operator's CA the controller runs with (with --ca-key)."
    ),
    ca_key: Path | None = typer.Option(None, "--ca-key", help="The key of --ca-cert."),
    data_dir: Path | None = flags.DATA_DIR,
) -> None:
    """Issue a remote plugin's certificate: its identity in the SAN, from the controller's CA."""
    from controller import pki  # cryptography: for this command only, not every bhctl start

    if (ca_cert is None) != (ca_key is None):
        raise typer.BadParameter("give both --ca-cert and --ca-key", param_hint="--ca-cert")
    try:
        if ca_cert is not None and ca_key is not None:
            authority = pki.Authority.from_files(ca_cert, ca_key)
        else:
            directory = (data_dir or default_data_dir()) / PKI_DIR
            if not (directory / pki.CA_CERT).exists():
                output.fail(
                    f"no CA in {directory}: start the controller once (bhctl run) to make it, "
                    "or give --ca-cert and --ca-key"
                )
            authority = pki.Authority.from_files(directory / pki.CA_CERT, directory / pki.CA_KEY)
        identity = pki.Identity.plugin(controller_id, namespace, name)
        issued = authority.issue(identity, hosts=host, lifetime=datetime.timedelta(days=days))
        issued.write(out, authority.cert_pem)
    except pki.PKIError as e:
        output.fail(str(e))
    output.err.print(
        f"issued {identity.uri} (server name {identity.server_name}) valid until "
        f"{issued.not_after:%Y-%m-%d %H:%M} UTC into {out}"
    )
