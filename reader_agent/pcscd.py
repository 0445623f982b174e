"""A private pcscd with vpcd readers, for tests, benchmarks and the demo.

pcsc-lite 1.9.9's daemon ignores PCSCLITE_CSOCK_NAME and always listens on
/run/pcscd/pcscd.comm; only its client library (pyscard, opensc-tool) reads it. So the
daemon runs in its own mount namespace (`unshare -m`) with a private directory bound over
/run/pcscd, and a reader configuration of its own (`-c`) whose vpcd readers listen on a
chosen TCP port and the next one (`free_port_pair` finds two free ones). Nothing of the
machine's own pcscd, if any, is touched. Where a mount namespace is not allowed,
`PrivatePcscd.start` raises `PcscdUnavailable` with the reason.

Found: when a card's connection closes during a command, vpcd takes no new card until
pcscd's poll (every 0.4 s) has seen the removal. `PrivatePcscd.wait_card` waits for
pcscd's own event before the next card is inserted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from reader_agent.errors import ReaderAgentError

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
READY_TIMEOUT_S = 10.0
SOCKET_ENV = "PCSCLITE_CSOCK_NAME"
STOP_TIMEOUT_S = 5.0  # after SIGTERM, before SIGKILL


class PcscdUnavailable(ReaderAgentError):
    """pcscd or vpcd cannot run here; the message says why."""


def free_port_pair() -> int:
    """A port p with p and p+1 free (vpcd's two readers)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise PcscdUnavailable("no two consecutive free TCP ports")


class PrivatePcscd:
    """pcscd -f in its own mount namespace, with readers '<name> 00 00' on `port` and
    '<name> 00 01' on `port + 1`. `socket_path` is what clients put in
    PCSCLITE_CSOCK_NAME (`activate()` sets it in this process)."""

    def __init__(self, base: Path, port: int = 0, name: str = "Medclear VPCD") -> None:
        self.base = base
        self.port = port or free_port_pair()
        self.name = name
        self.run_dir = base / "run"
        self.conf_dir = base / "reader.conf.d"
        self.log_path = base / "pcscd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "pcscd.comm"

    @property
    def readers(self) -> list[str]:
        return [f"{self.name} 00 00", f"{self.name} 00 01"]

    def start(self) -> PrivatePcscd:
        for tool in ("pcscd", "unshare", "mount"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise PcscdUnavailable(f"{tool} is not installed (scripts/setup-system.sh)")
        if not VPCD_DRIVER.exists():
            raise PcscdUnavailable(f"vsmartcard-vpcd is not installed ({VPCD_DRIVER} missing)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "vpcd").write_text(
            f'FRIENDLYNAME "{self.name}"\n'
            f"DEVICENAME /dev/null:0x{self.port:04X}\n"
            f"LIBPATH {VPCD_DRIVER}\n"
            f"CHANNELID 0x{self.port:04X}\n"
        )
        script = (
            'mkdir -p /run/pcscd && mount --bind "$1" /run/pcscd && '
            'exec pcscd --foreground --info -c "$2"'
        )
        argv = ["unshare", "-m", "sh", "-c", script, "sh", str(self.run_dir), str(self.conf_dir)]
        if os.geteuid() != 0:
            argv = ["unshare", "-r", *argv]  # a user namespace makes the mount allowed
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.socket_path.exists() and self._vpcd_listening()):
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-600:]
                self.process = None
                raise PcscdUnavailable(f"pcscd exited at start: {tail.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PcscdUnavailable(f"pcscd not ready in {READY_TIMEOUT_S} s")
            time.sleep(0.05)
        return self

    def _vpcd_listening(self) -> bool:
        """Ready when the daemon says so (vpcd listens from then on)."""
        return "daemon ready" in self.log_path.read_text(errors="replace")

    def card_present(self, reader: str) -> bool:
        """Whether pcscd's own event handler last saw a card in `reader` (its log)."""
        log = self.log_path.read_text(errors="replace")
        inserted = log.rfind(f"Card inserted into {reader}")
        removed = log.rfind(f"Card Removed From {reader}")
        return inserted > removed

    def wait_card(self, reader: str, present: bool, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until pcscd has seen the card go in (or out). A card pulled during a command
        leaves vpcd unable to take the next card until pcscd's poll (every 0.4 s) has
        noticed the removal; waiting for that keeps the next insertion from being lost."""
        deadline = time.monotonic() + timeout_s
        while self.card_present(reader) != present:
            if time.monotonic() > deadline:
                state = "inserted" if present else "removed"
                raise PcscdUnavailable(f"pcscd did not see the card {state} in {timeout_s} s")
            time.sleep(0.02)

    def activate(self) -> None:
        """Point this process's PC/SC client library at this daemon (before the first
        PC/SC call: the library reads the variable once)."""
        os.environ[SOCKET_ENV] = str(self.socket_path)

    def env(self) -> dict[str, str]:
        """The environment for a PC/SC client subprocess (e.g. opensc-tool)."""
        return {**os.environ, SOCKET_ENV: str(self.socket_path)}

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
