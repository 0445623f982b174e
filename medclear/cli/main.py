"""`medclear`: run the local stack, swipe a card, seed a city, run the demo.

Every command explains itself with --help. Commands that talk to the stack find it
through the state directory written by `medclear up` (or MEDCLEAR_* settings).

This module is only the router: each command's module is imported when that command
runs, so `medclear --help` loads typer and rich, not gRPC, Kafka or ClickHouse clients.
`COMMANDS` says where each command lives and the line `--help` shows for it;
tests/unit/test_cli.py checks that line against the command's own help.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import version
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from medclear.errors import MedclearError
from medclear.infra.exits import EPILOG, Exit


@dataclass(frozen=True)
class Entry:
    target: str  # "module:attribute" of the typer app that holds the command
    help: str  # the first sentence of the command's help, shown by `medclear --help`
    command: str | None = None  # one command of that app; None: the app is the group
    panel: str = "Commands"


STACK = "The local stack"
CITY = "The simulated city"
COUNTERS = "At the counters and windows"
OPERATIONS = "Operations and analysis"

COMMANDS: dict[str, Entry] = {
    "up": Entry(
        "medclear.cli.stack:stack_app",
        "Start the whole local stack on 127.0.0.1 and wait until every part is ready.",
        "up",
        STACK,
    ),
    "status": Entry(
        "medclear.cli.stack:stack_app",
        "Show every component of the local stack, its address and whether it is healthy.",
        "status",
        STACK,
    ),
    "down": Entry(
        "medclear.cli.stack:stack_app",
        "Stop everything `medclear up` started (by recorded PID).",
        "down",
        STACK,
    ),
    "restart": Entry(
        "medclear.cli.stack:stack_app",
        "Stop one component of the running stack "
        "and start it again (same ports, data and log), waiting until it is "
        "ready.",
        "restart",
        STACK,
    ),
    "serve": Entry(
        "medclear.cli.serve:serve_app",
        "Run one medclear process in the foreground (used by `up`).",
        None,
        STACK,
    ),
    "demo": Entry(
        "medclear.cli.demo:demo_app",
        "The main job: start the whole stack, seed a "
        "city, run a few minutes of a day at its counters — swipes (some with a wrong "
        "PIN), reversals, refunds, loss reports with a thief trying the card, "
        "releases, pre-losses lapsing, a pharmacy limit reached — with a live panel, "
        "then a summary and the reconciliation of the day.",
        "demo",
        CITY,
    ),
    "seed": Entry(
        "medclear.cli.city:city_app",
        "Create a synthetic city through the card registry: persons, cards, opening balances.",
        "seed",
        CITY,
    ),
    "simulate": Entry(
        "medclear.cli.city:city_app",
        "Run the pure clearing core against a "
        "simulated city: many terminals, cards and window operations, a simulated "
        "clock across midnights and holidays (from 2026-09-28, through National "
        "Day), redelivered commands and early reversals.",
        "simulate",
        CITY,
    ),
    "pos": Entry(
        "medclear.cli.pos:pos_app",
        "Act as a POS terminal at a designated institution (swipe, balance, reverse, refund).",
        None,
        COUNTERS,
    ),
    "card": Entry(
        "medclear.cli.card:card_app",
        "Service-window operations on a person's cards (loss reports, replacement, …).",
        None,
        COUNTERS,
    ),
    "agent": Entry(
        "medclear.cli.agent:agent_app",
        "The POS reader agent: the card through PC/SC, the PIN on the pad, then medclear.",
        None,
        COUNTERS,
    ),
    "card-emulator": Entry(
        "medclear.cli.agent:emulator_app",
        "A virtual 社保卡 in a vpcd reader of pcscd, personalised from the issuance data.",
        None,
        COUNTERS,
    ),
    "recon": Entry(
        "medclear.cli.recon:recon_app",
        "Reconciliation (对账) per designated "
        "institution per Beijing day: medclear's settlement (topic "
        "medclear.settlements), the ClickHouse event log and the institution's "
        "file.",
        None,
        OPERATIONS,
    ),
    "hsm": Entry(
        "medclear.cli.hsm:hsm_app",
        "Keys of the HSM (加密机): list, generate, rotate, provision terminals.",
        None,
        OPERATIONS,
    ),
    "kafka": Entry(
        "medclear.cli.kafka:kafka_app",
        "The broker: the ACLs of medclear's "
        "principals (print, or apply to an existing cluster), a third-party "
        "client's settings for a principal, the embedded broker's class archive.",
        None,
        OPERATIONS,
    ),
    "bench": Entry(
        "medclear.cli.bench:bench_app",
        "Measure the running stack (prints figures, asserts nothing).",
        None,
        OPERATIONS,
    ),
    "drill": Entry(
        "medclear.drills.cli:drill_app",
        "Fault drills under steady POS traffic: "
        "kill or stop one part of the stack, repair it, then check conservation, "
        "state, ClickHouse (exactly once), SMS (no doubles) and print the time to "
        "recover.",
        None,
        OPERATIONS,
    ),
}


def first_sentence(text: str) -> str:
    """The help's first sentence on one line: what `medclear --help` shows for a command."""
    paragraph = inspect.cleandoc(text).split("\n\n")[0].replace("\n", " ")
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def unwrapped(text: str | None) -> str | None:
    """A help text with each paragraph on one line, for the terminal to wrap. typer 0.29
    keeps a docstring's single line breaks, so rich wrapped its ~90-character lines again
    at the terminal's width and left every other line a word or two long. A line that
    starts a list item ("- ", "1. ") or is indented keeps its own line."""
    if not text:
        return text
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        lines = paragraph.split("\n")
        joined = lines[0]
        for line in lines[1:]:
            own_line = (
                line[:1].isspace()
                or line.startswith(("- ", "* "))
                or (line.split(". ", 1)[0].isdigit())
            )
            joined += ("\n" if own_line else " ") + (line if own_line else line.strip())
        paragraphs.append(joined)
    return "\n\n".join(paragraphs)


def _unwrap_help(command: Any) -> None:
    command.help = unwrapped(command.help)
    for sub in getattr(command, "commands", {}).values():
        _unwrap_help(sub)


def load(name: str) -> Any:
    """The command `name` (a typer group or one command of a typer app), imported now."""
    entry = COMMANDS[name]
    module, attribute = entry.target.split(":")
    group = typer.main.get_group(getattr(importlib.import_module(module), attribute))
    _unwrap_help(group)
    if entry.command is None:
        group.name = name
        return group
    return group.commands[entry.command]


class _Router(TyperGroup):
    """Lists every command from COMMANDS and imports a command's module only to run it."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        placeholder = TyperCommand(name=cmd_name, help=entry.help)
        placeholder.rich_help_panel = entry.panel
        return placeholder

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] in COMMANDS:
            return args[0], load(args[0]), args[1:]
        return super().resolve_command(ctx, args)  # an unknown name: click's message


app = typer.Typer(
    cls=_Router,
    help="medclear — real-time clearing of medical-insurance personal accounts on social "
    "security cards. Start with `medclear demo`, or `medclear up`, then `medclear seed` and "
    "`medclear pos swipe`.",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medclear {version('medclear')}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """The group itself does nothing; a command runs."""


def main() -> None:
    """The `medclear` command. An error medclear can explain (the stack not running, a
    component that failed, a file it cannot use) is printed once, without a traceback,
    and exits 1."""
    try:
        app()
    except MedclearError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(Exit.ERROR) from None
