"""Processes of the local stack: free ports on loopback, and a started process that is
stopped only while /proc still shows the very process that was started."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medclear.infra.settings import SECRET_FIELDS
from medclear.infra.stack_state import (
    StackError,
)

HOST = "127.0.0.1"
LOG_TAIL_LINES = 30
STOP_TIMEOUT_S = 10.0
SECRET_ENV = frozenset(f"MEDCLEAR_{name.upper()}" for name in SECRET_FIELDS)


def without_secrets(env: dict[str, str] | None) -> dict[str, str]:
    """A child's environment (None: this process's) without any medclear secret: whoever
    started `up` with MEDCLEAR_HSM_LMK set, no child inherits it (medclear.stack.secrets)."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in SECRET_ENV}


# --------------------------------------------------------------------------------------
# ports


_handed_out: set[int] = set()
_port_lock = threading.Lock()
_random = random.SystemRandom()  # independent of any seeding of `random` (e.g. by tests)


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, never twice from one process.

    Chosen below the kernel's ephemeral range, so the port cannot be taken meanwhile by
    an outgoing connection's source port or by a server binding port 0.
    """
    low = _ephemeral_low()
    with _port_lock:
        if low > 12_000:
            for _ in range(500):
                port = _random.randint(10_000, low - 1)
                if port not in _handed_out and can_bind(port):
                    _handed_out.add(port)
                    return port
        while True:  # no room below the ephemeral range: let the kernel pick
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


# --------------------------------------------------------------------------------------
# processes


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:  # a zombie or a kernel thread
        return None
    return raw.rstrip(b"\0").decode("utf-8", "surrogateescape").split("\0")


def proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        # the command name (field 2) may contain spaces and parentheses: split after it
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def reap(pid: int) -> None:
    """Collect an exit status if `pid` is a child of this process (no zombie is left)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class Process:
    """A child process started in its own session, its output appended to `log`.

    Made by ``start()``, or rebuilt from ``stack.json`` by ``from_record`` (then it is
    signalled only while its cmdline and start time still match the record).
    """

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    extra_logs: tuple[Path, ...] = ()  # other files worth showing when it fails
    pid: int | None = None
    started_at: float | None = None  # wall clock (time.time())
    start_ticks: int | None = None
    log_offset: int = 0  # where this run's output starts in `log`
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    killed: bool = field(default=False, compare=False)  # the last stop needed SIGKILL

    def start(self) -> Process:
        if self.pid is not None:
            raise StackError(f"{self.name} already started (pid {self.pid})", self.name)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}: "
                f"{' '.join(self.argv)}\n".encode()
            )
            out.flush()
            self.log_offset = out.tell()
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=without_secrets(self.env),
                    cwd=self.cwd,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise StackError(
                    f"{self.name}: cannot run {self.argv[0]}: {exc}", self.name
                ) from exc
        self.pid = self._popen.pid
        self.started_at = time.time()
        self.start_ticks = proc_start_ticks(self.pid)
        return self

    def is_ours(self) -> bool:
        """The recorded pid is still this very process (not exited, not a recycled pid)."""
        if self.pid is None:
            return False
        if proc_cmdline(self.pid) != self.argv:
            return False
        ticks = proc_start_ticks(self.pid)
        return self.start_ticks is None or ticks == self.start_ticks

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        reap(self.pid)
        return self.is_ours()

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def _signal(self, sig: int) -> None:
        if self.pid is None or not self.alive():  # re-checked right before every signal
            return
        try:
            if os.getpgid(self.pid) == self.pid:  # our session leader: the whole group
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM (to its process group), wait up to `timeout`, then SIGKILL.

        Returns False if the process was not ours to stop (already gone, or its pid now
        belongs to another program); True once it has stopped.
        """
        if self.pid is None or not self.alive():
            if self._popen is not None:
                self._popen.poll()
            return False
        pid = self.pid
        self._signal(signal.SIGTERM)
        if not self._wait_gone(timeout):
            self.killed = True
            with open(self.log, "ab") as out:
                out.write(
                    f"=== {self.name}: no exit {timeout:g} s after SIGTERM; SIGKILL\n".encode()
                )
            self._signal(signal.SIGKILL)
            if not self._wait_gone(5.0):
                raise StackError(f"{self.name} (pid {pid}) survived SIGKILL", self.name)
        if self._popen is not None:
            self._popen.wait()
        # anything its leader left behind in the group (the group id cannot be reused
        # while a member of the group is alive)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return True

    def kill(self) -> None:
        """SIGKILL to its process group now, no stop command first: a crash."""
        if self.pid is None or not self.alive():
            return
        self._signal(signal.SIGKILL)
        if not self._wait_gone(5.0):
            raise StackError(f"{self.name} (pid {self.pid}) survived SIGKILL", self.name)
        if self._popen is not None:
            self._popen.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = [tail(self.log, lines, self.log_offset)]
        for extra in self.extra_logs:
            text = tail(extra, lines)
            if text:
                parts.append(f"--- {extra} ---\n{text}")
        return "\n".join(p for p in parts if p)

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": list(self.argv),
            "pid": self.pid,
            "log": str(self.log),
            "extra_logs": [str(p) for p in self.extra_logs],
            "cwd": str(self.cwd) if self.cwd is not None else None,
            "started_at": self.started_at,
            "start_ticks": self.start_ticks,
            "log_offset": self.log_offset,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Process:
        return cls(
            name=str(rec["name"]),
            argv=[str(a) for a in rec["argv"]],
            log=Path(rec["log"]),
            extra_logs=tuple(Path(p) for p in rec.get("extra_logs", [])),
            cwd=Path(rec["cwd"]) if rec.get("cwd") else None,
            pid=None if rec.get("pid") is None else int(rec["pid"]),
            started_at=rec.get("started_at"),
            start_ticks=rec.get("start_ticks"),
            log_offset=int(rec.get("log_offset", 0)),
        )


def tail(path: Path, lines: int, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(offset if offset <= size else 0, size - 256 * 1024)
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", data.decode("utf-8", "replace"))
    return "\n".join(text.splitlines()[-lines:])
