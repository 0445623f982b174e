"""`medclear kafka`: the broker's side of the stack. Who may do what (`acls`, printed or
applied to an existing cluster), how a third-party client acts as one of medclear's
principals (`client`), and the embedded broker's class archive (`class-archive`, run by
`make setup`)."""

from __future__ import annotations

import json
import shlex
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medclear.cli.support import fail
from medclear.infra import kafka_access
from medclear.infra.kafka_access import KafkaAccess, KafkaAccessError
from medclear.infra.settings import get_settings
from medclear.infra.stack_state import StackError, load_endpoints
from medclear.stack import acls
from medclear.stack import kafka as kafka_nodes

kafka_app = typer.Typer(
    help="The broker: the ACLs of medclear's principals (print, or apply to an existing "
    "cluster), a third-party client's settings for a principal, the embedded broker's "
    "class archive.",
    no_args_is_help=True,
)
console = Console()
PRINCIPALS = (kafka_access.OPERATOR, *acls.CLIENT_PRINCIPALS)


def _cluster(principal: str) -> KafkaAccess:
    """The cluster MEDCLEAR_KAFKA_BOOTSTRAP names (with MEDCLEAR_KAFKA_SSL_DIR's
    certificates), else the running stack's."""
    settings = get_settings()
    if settings.kafka_bootstrap:
        return kafka_access.from_settings(settings, principal)
    try:
        return load_endpoints(settings).kafka(principal)
    except StackError as exc:
        raise fail(f"{exc} (or set MEDCLEAR_KAFKA_BOOTSTRAP and MEDCLEAR_KAFKA_SSL_DIR)") from exc


@kafka_app.command("acls")
def acls_cmd(
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="create them on the cluster (as the operator, who must be allowed "
            "to alter ACLs: a super user)",
        ),
    ] = False,
    user_format: Annotated[
        str,
        typer.Option(
            help="how a principal's name becomes the broker's: {principal} is worker, sms, …; "
            "for a cluster whose mapping rules keep the whole DN, e.g. 'User:CN=medclear-"
            "{principal},OU=payments'"
        ),
    ] = acls.DEFAULT_USER_FORMAT,
    as_json: Annotated[bool, typer.Option("--json", help="one object per ACL")] = False,
) -> None:
    """The ACLs medclear's principals need, each only what it uses: a table (or --json),
    or --apply them to the cluster MEDCLEAR_KAFKA_BOOTSTRAP names (else the running
    stack's; `medclear up` applies them to its own). The operator and the brokers are
    super users and need none; anyone else gets nothing (allow.everyone.if.no.acl.found
    false). docs/RUNBOOK.md, "An existing Kafka cluster"."""
    rules = acls.rules()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "principal": user_format.format(principal=r.principal),
                        "resource": r.resource,
                        "name": r.name,
                        "pattern": "prefixed" if r.prefixed else "literal",
                        "operation": r.operation,
                    }
                    for r in rules
                ],
                indent=2,
            )
        )
    else:
        table = Table(title=f"ACLs of medclear's principals ({len(rules)})")
        for column in ("principal", "resource", "name (* = prefix)", "operations"):
            table.add_column(column)
        for (principal, resource, pattern), ops in acls.grouped(rules).items():
            table.add_row(
                user_format.format(principal=principal), resource, pattern, ", ".join(sorted(ops))
            )
        console.print(table)
    if apply:
        kafka = _cluster(kafka_access.OPERATOR)
        try:
            count = acls.apply(kafka, rules, user_format)
        except (StackError, KafkaAccessError) as exc:
            raise fail(str(exc)) from exc
        console.print(
            f"[green]✓[/] {count} ACLs created on {kafka.bootstrap} (those there "
            "already are unchanged)"
        )


@kafka_app.command("client")
def client_cmd(
    principal: Annotated[str, typer.Argument(help=f"one of: {', '.join(PRINCIPALS)}")],
) -> None:
    """kcat's options to act as one of medclear's principals on the running stack's
    broker (its certificate and the CA), e.g.
    kcat $(medclear kafka client analyst) -C -t medclear.events -e"""
    if principal not in PRINCIPALS:
        raise fail(f"no principal {principal!r}; medclear's are {', '.join(PRINCIPALS)}")
    kafka = _cluster(principal)
    args = ["-b", kafka.bootstrap]
    files = kafka.files()
    if files:
        args += [
            "-X",
            "security.protocol=ssl",
            "-X",
            f"ssl.ca.location={files['ca']}",
            "-X",
            f"ssl.certificate.location={files['certificate']}",
            "-X",
            f"ssl.key.location={files['key']}",
        ]
    print(shlex.join(args))


@kafka_app.command("class-archive")
def class_archive_cmd() -> None:
    """Archive the classes a broker loads (JDK AppCDS), so every node starts about 2 s
    sooner: starts a throwaway node and stops it (make setup runs this once)."""
    with console.status("starting a throwaway broker to archive its classes …"):
        try:
            path = kafka_nodes.build_class_archive()
        except StackError as exc:
            raise fail(str(exc)) from exc
    console.print(f"[green]✓[/] {path} ({path.stat().st_size / 1e6:.0f} MB)")
