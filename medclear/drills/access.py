"""How a drill reaches the running stack and acts on its parts: StackAccess (endpoints,
TLS material, the terminal keyring, the state directory), and signalling, stopping and
restarting one component by its recorded pid, as `medclear down` and `medclear restart`
do."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from medclear import stack
from medclear.drills.bounds import STOP_WAIT_S, DrillError
from medclear.infra.settings import Settings, keyring_file
from medclear.infra.terminals import Keyring


@dataclass
class StackAccess:
    settings: Settings
    endpoints: stack.Endpoints
    pki_dir: Path | None
    keyring: Keyring | None
    state_dir: Path

    def component(self, name: str) -> stack.ComponentStatus:
        rows = {r.name: r for r in stack.status(self.settings)}
        if name not in rows:
            raise DrillError(f"the stack has no component {name!r} (has: {', '.join(rows)})")
        return rows[name]

    def has(self, name: str) -> bool:
        return any(r.name == name for r in stack.status(self.settings))

    def smsc_messages_file(self) -> Path:
        return self.state_dir / "data" / "smsc" / "messages.jsonl"


def access(settings: Settings) -> StackAccess:
    """The running stack of `settings.state_dir`. A component restarted by a drill gets
    this process's MEDCLEAR_* settings (stack.restart_component), so TLS and terminal
    security are taken from what the stack recorded; other settings (partitions, ...)
    must match the ones `medclear up` was given."""
    try:
        endpoints = stack.load_endpoints(settings)
    except stack.StackError as exc:
        raise DrillError(str(exc)) from exc
    settings = settings.model_copy(
        update={"tls": endpoints.tls, "terminal_security": endpoints.terminal_security}
    )
    pki = stack.client_pki_dir(settings)
    keyring = Keyring(keyring_file(settings)) if endpoints.terminal_security else None
    return StackAccess(settings, endpoints, pki, keyring, settings.state_dir.resolve())


def pid_gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # our own child (a --fresh stack): reap it
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def signal_component(a: StackAccess, name: str, sig: signal.Signals) -> int:
    """Send `sig` to a running component of the stack (its process group when it leads
    one), as `medclear down` does. Returns its pid."""
    row = a.component(name)
    if row.pid is None:
        raise DrillError(f"{name} is an external server; a drill cannot stop it")
    if not row.healthy and sig != signal.SIGCONT:
        raise DrillError(f"{name} is not healthy before the drill: {row.detail}")
    try:
        if os.getpgid(row.pid) == row.pid:
            os.killpg(row.pid, sig)
        else:
            os.kill(row.pid, sig)
    except ProcessLookupError as exc:
        raise DrillError(f"{name} (pid {row.pid}) is gone") from exc
    return row.pid


def stop_component(a: StackAccess, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop a component as `medclear down` does: the signal, wait for its leader, then
    SIGKILL whatever it left in its process group; and wait until its port is free (a
    restart at once could find it still taken)."""
    address = a.component(name).address.split(" ")[0]
    pid = signal_component(a, name, sig)
    deadline = time.monotonic() + STOP_WAIT_S
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            raise DrillError(f"{name} (pid {pid}) did not exit within {STOP_WAIT_S:.0f} s")
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    host, _, port = address.rpartition(":")
    while port.isdigit() and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) != 0:
                return
        time.sleep(0.1)


def restart(a: StackAccess, name: str) -> None:
    try:
        stack.restart_component(a.settings, name)
    except stack.StackError as exc:
        raise DrillError(f"restarting {name}: {exc}") from exc
