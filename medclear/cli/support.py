"""What the CLI's command groups share: errors, the running stack's certificates, the
simulated terminals' and windows' keys, and asking for a PIN."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from medclear.infra.terminals import DEFAULT_WINDOW

err = Console(stderr=True)

__all__ = ["DEFAULT_WINDOW", "fail", "read_pin"]
PIN_DIGITS = "4 to 12 digits; 6 for a social security card"


def fail(message: str) -> typer.Exit:
    """An error the user can act on, printed once, without a traceback (exit 1)."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code=1)


def read_pin(given: str, prompt: str) -> str:
    """The PIN given with --pin, else asked for on the terminal (hidden). Without a
    terminal to ask on (a script, a pipe), a clear error instead of a hung prompt."""
    if given:
        return given
    if not sys.stdin.isatty():
        raise fail(f"{prompt}: give it with --pin ({PIN_DIGITS}); there is no terminal to ask on")
    pin: str = typer.prompt(prompt, hide_input=True)
    return pin
