"""`medclear up / status / down / restart`: the local stack (medclear/stack)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated

import typer
from rich.console import Console

from medclear import stack
from medclear.cli.support import fail
from medclear.infra.settings import get_settings

stack_app = typer.Typer(rich_markup_mode="rich")
console = Console()


@stack_app.command()
def up(
    brokers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=5,
            help="Apache Kafka nodes (default 1, MEDCLEAR_KAFKA_BROKERS); with 3, "
            "every topic has 3 replicas and min.insync.replicas 2",
        ),
    ] = None,
) -> None:
    """Start the whole local stack on 127.0.0.1 and wait until every part is ready.

    Starts Apache Kafka (KRaft; TLS on every listener, a certificate per process from the
    stack's CA, ACLs), creates the topics, starts ClickHouse, the HSM, the clearing
    worker(s), the POS gateway, the card registry, the stream jobs and Prometheus, then
    prints where each runs. State lives in .medclear/ (MEDCLEAR_STATE_DIR). With
    MEDCLEAR_KAFKA_BOOTSTRAP / MEDCLEAR_CLICKHOUSE_URL set, those external servers are
    used and not started (docs/RUNBOOK.md, "An existing Kafka cluster").
    """
    settings = get_settings()
    if brokers is not None:
        settings = settings.model_copy(update={"kafka_brokers": brokers})
    stack.up(settings, console)


@stack_app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print the components as JSON")] = False,
) -> None:
    """Show every component of the local stack, its address and whether it is healthy.
    Exit 1 if any is not."""
    rows = stack.status(get_settings())
    if not rows:
        raise fail("no stack recorded in the state directory; run `medclear up`")
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        console.print(stack.status_table(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(code=1)


@stack_app.command()
def down(
    wipe: Annotated[bool, typer.Option(help="also delete all data (topics, tables, logs)")] = False,
) -> None:
    """Stop everything `medclear up` started (by recorded PID). Data is kept unless --wipe.
    Each component is asked to stop (SIGTERM) and given STOP_TIMEOUT_S; one that needs
    SIGKILL is named."""
    started = time.monotonic()
    killed = stack.down(get_settings(), console, wipe=wipe)
    note = f"; killed: {', '.join(killed)}" if killed else "; nothing killed"
    console.print(f"down in {time.monotonic() - started:.1f} s{note}")


@stack_app.command()
def restart(
    component: Annotated[str, typer.Argument(help="a name from `medclear status`, e.g. worker-0")],
) -> None:
    """Stop one component of the running stack and start it again (same ports, data and
    log), waiting until it is ready. Safe at any time: nothing is lost or applied twice."""
    row = stack.restart_component(get_settings(), component, console)
    console.print(f"[green]✓[/] {row.name} ready again (pid {row.pid})")
