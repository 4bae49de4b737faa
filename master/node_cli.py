"""`distill-swarm node add|remove`: one RabbitMQ user per pupil node (run on the server side).

The new node's password is printed once, on stdout, inside the AMQP URL to give the node; it is
never logged. With ``--password-file FILE`` it is written to a new file only its owner can read
instead, and the command prints the Pi installer's command line that reads that file
(``deploy/pupil/install.sh --password-file``). Prefer the generated password: one given with
``--password`` stays in the shell's history and is visible in the process list while the command
runs.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError

from master.access import ManagementAPI, add_node, generate_password, node_url, remove_node
from shared.cli_support import exit_on_errors, fail
from shared.config import BrokerConfig
from shared.messages import NodeId
from shared.topology import Topology

app = typer.Typer(
    help="Per-node RabbitMQ users with least-privilege permissions (management HTTP API).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

DEFAULT_ADMIN_URL = "http://127.0.0.1:15672"
DEFAULT_AMQP_PORT = 5672

NameArg = Annotated[str, typer.Argument(help="The node id; also its RabbitMQ user name.")]
VhostOpt = Annotated[str, typer.Option(help="RabbitMQ virtual host of the swarm.")]
NamespaceOpt = Annotated[str, typer.Option(help="The swarm's broker.namespace.")]
AdminUrlOpt = Annotated[
    str,
    typer.Option(envvar="RABBITMQ_ADMIN_URL", help="Management API base URL."),
]
AdminUserOpt = Annotated[
    str,
    typer.Option(envvar="RABBITMQ_ADMIN_USER", help="A user with the administrator tag."),
]
AdminPasswordOpt = Annotated[
    str | None,
    typer.Option(
        envvar="RABBITMQ_ADMIN_PASSWORD",
        help="Its password (asked for on a terminal when neither given nor in the environment).",
    ),
]
AdminCaOpt = Annotated[
    Path | None,
    typer.Option(help="CA file to verify an https:// management API with."),
]


def _checked(name: str, namespace: str) -> Topology:
    """The swarm's topology, after checking both names with the rules the services use."""
    try:
        TypeAdapter(NodeId).validate_python(name)
    except ValidationError:
        fail(f"node name {name!r}: use letters, digits and . _ - (at most 63, letter/digit first)")
    try:
        BrokerConfig(namespace=namespace)
    except ValidationError:
        fail(f"--namespace {namespace!r}: use lowercase letters, digits, _ and - (letter first)")
    return Topology(namespace)


def _api(url: str, user: str, password: str | None, ca_file: Path | None) -> ManagementAPI:
    if password is None:
        if not sys.stdin.isatty():
            fail("no admin password: give --admin-password or set RABBITMQ_ADMIN_PASSWORD")
        password = typer.prompt(f"RabbitMQ password of '{user}'", hide_input=True)
    return ManagementAPI(url, user, password, ca_file)


@app.command("add")
def add(
    name: NameArg,
    password: Annotated[
        str | None,
        typer.Option(help="The node's password (default: 32 random URL-safe characters)."),
    ] = None,
    vhost: VhostOpt = "swarm",
    namespace: NamespaceOpt = "swarm",
    broker_url: Annotated[
        str | None,
        typer.Option(
            help="Where nodes reach RabbitMQ, e.g. amqps://broker.example:5671 "
            f"(default: amqp://<admin-url host>:{DEFAULT_AMQP_PORT})."
        ),
    ] = None,
    admin_url: AdminUrlOpt = DEFAULT_ADMIN_URL,
    admin_user: AdminUserOpt = "admin",
    admin_password: AdminPasswordOpt = None,
    admin_ca_file: AdminCaOpt = None,
    password_file: Annotated[
        Path | None,
        typer.Option(
            help="Write the password to this new file (mode 0600) instead of printing it, and "
            "print the Pi installer's command that reads it."
        ),
    ] = None,
) -> None:
    """Create NAME's user: its own queue, reports, control, dead letters, and reading jobs."""
    topology = _checked(name, namespace)
    secret = password or generate_password()
    base = broker_url or f"amqp://{urllib.parse.urlsplit(admin_url).hostname}:{DEFAULT_AMQP_PORT}"
    if password_file is not None and (password_file.exists() or not password_file.parent.is_dir()):
        fail(f"--password-file {password_file}: give a new file in an existing directory")
    with exit_on_errors():
        url = node_url(base, name, secret, vhost)  # checked before anything is created
    if password_file is not None:
        _write_secret(password_file, secret)  # first: a user is never left without its password
    try:
        with exit_on_errors():
            api = _api(admin_url, admin_user, admin_password, admin_ca_file)
            permissions = add_node(api, topology, vhost, name, secret)
    except SystemExit:
        if password_file is not None:
            password_file.unlink(missing_ok=True)
        raise
    typer.echo(f"created RabbitMQ user '{name}' on vhost '{vhost}':")
    typer.echo(f"  configure {permissions.configure}")
    typer.echo(f"  write     {permissions.write}")
    typer.echo(f"  read      {permissions.read}")
    if password_file is not None:
        _print_installer(base, vhost, name, namespace, password_file)
        return
    typer.echo("Run the node with (the password is not shown again):")
    typer.echo(f"AMQP_URL={url}")
    typer.echo(f"DISTILL_SWARM__PUPIL__NODE_ID={name}")
    typer.echo(f"DISTILL_SWARM__BROKER__NAMESPACE={namespace}")
    typer.echo("DISTILL_SWARM__BROKER__DECLARE_EXCHANGES=false")
    if url.startswith("amqps:"):
        typer.echo("DISTILL_SWARM__BROKER__TLS_CA_FILE=/path/to/ca.pem   # if not a public CA")


def _write_secret(path: Path, secret: str) -> None:
    # O_EXCL: never overwrite a file, and the mode is set at creation, before a byte is written.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
    except OSError as exc:
        fail(f"--password-file {path}: {exc.strerror or exc}")


def _print_installer(base: str, vhost: str, name: str, namespace: str, secret_file: Path) -> None:
    broker_url = base.rstrip("/") + "/" + urllib.parse.quote(vhost, safe="")
    extra = ["--env DISTILL_SWARM__BROKER__DECLARE_EXCHANGES=false"]
    if namespace != "swarm":
        extra.append(f"--env DISTILL_SWARM__BROKER__NAMESPACE={namespace}")
    if base.startswith("amqps:"):
        extra.append("--env DISTILL_SWARM__BROKER__TLS_CA_FILE=/path/to/ca.pem")
    typer.echo(f"wrote the password to {secret_file} (mode 0600); copy it to the node, then run:")
    typer.echo(
        f"sudo pupil/install.sh --broker-url {broker_url} --node-id {name} --user {name} "
        f"--password-file /root/{secret_file.name} {' '.join(extra)}"
    )


@app.command("remove")
def remove(
    name: NameArg,
    vhost: VhostOpt = "swarm",
    namespace: NamespaceOpt = "swarm",
    keep_queue: Annotated[
        bool, typer.Option("--keep-queue", help="Keep the node's lesson queue.")
    ] = False,
    admin_url: AdminUrlOpt = DEFAULT_ADMIN_URL,
    admin_user: AdminUserOpt = "admin",
    admin_password: AdminPasswordOpt = None,
    admin_ca_file: AdminCaOpt = None,
) -> None:
    """Delete NAME's user (its connections close) and its lesson queue."""
    topology = _checked(name, namespace)
    with exit_on_errors():
        api = _api(admin_url, admin_user, admin_password, admin_ca_file)
        queue_deleted = remove_node(api, topology, vhost, name, delete_queue=not keep_queue)
    queue_note = "deleted" if queue_deleted else ("kept" if keep_queue else "not found")
    typer.echo(f"removed RabbitMQ user '{name}'; queue '{topology.pupil_queue(name)}' {queue_note}")
