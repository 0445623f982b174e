"""What the CLI's command groups share: errors, the running stack's certificates, the
simulated terminals' and windows' keys, and asking for a PIN."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from medclear.infra.settings import Settings, keyring_file
from medclear.infra.terminals import DEFAULT_WINDOW, Keyring

err = Console(stderr=True)

__all__ = ["DEFAULT_WINDOW", "client_pki", "fail", "keyring_for", "read_pin"]
PIN_DIGITS = "4 to 12 digits; 6 for a social security card"


def fail(message: str) -> typer.Exit:
    """An error the user can act on, printed once, without a traceback (exit 1)."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code=1)


def client_pki(settings: Settings) -> Path | None:
    """Certificates for talking to the running stack (None when it runs without TLS)."""
    from medclear import stack

    return stack.client_pki_dir(settings)


def keyring_for(settings: Settings, ids: list[str]) -> Keyring | None:
    """The simulated terminals' and windows' keys, provisioned through the HSM on first
    use; None when the running stack has terminal security off."""
    from medclear import stack

    try:
        endpoints = stack.load_endpoints(settings)
    except stack.StackError as exc:
        raise fail(str(exc)) from exc
    if not endpoints.terminal_security:  # what the running stack does, not this process
        return None
    keyring = Keyring(keyring_file(settings))
    asyncio.run(keyring.provision(endpoints.hsm, ids, client_pki(settings)))
    return keyring


def read_pin(given: str, prompt: str) -> str:
    """The PIN given with --pin, else asked for on the terminal (hidden). Without a
    terminal to ask on (a script, a pipe), a clear error instead of a hung prompt."""
    if given:
        return given
    if not sys.stdin.isatty():
        raise fail(f"{prompt}: give it with --pin ({PIN_DIGITS}); there is no terminal to ask on")
    pin: str = typer.prompt(prompt, hide_input=True)
    return pin
