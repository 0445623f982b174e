"""Start and stop the loopback SMSC: the npm `smpp` package's server (a real third-party
SMPP 3.4 peer) run by tests/support/smsc/server.js, for the tests and the embedded stack.

    smsc = start_smsc(port, out=state/data/smsc/messages.jsonl, log=state/logs/smsc.log)
    ... MEDCLEAR_SMSC_HOST=127.0.0.1 MEDCLEAR_SMSC_PORT=<port> for the sms job ...
    smsc.stop()

The server binds a client only with the configured system id and password, logs every
part and every reassembled message as JSON lines before it answers, and sends delivery
receipts. Stopped (SIGTERM), it stops gracefully: it unbinds its sessions, answers every
submit_sm it recorded, and refuses (ESME_RSYSERR, which the job retries) what still
comes, so a stop doubles no SMS.

`npm ci` installs the server's one dependency, pinned by its package-lock.json, the first
time (make setup does it too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medclear.infra.stack_state import StackError
from medclear.stack.process import Process

SMSC_DIR = Path(__file__).resolve().parents[2] / "tests" / "support" / "smsc"
SERVER_JS = SMSC_DIR / "server.js"
NPM_CI_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 15.0
READY_LINE = "SMSC listening on "
DEFAULT_SYSTEM_ID = "medclear"
DEFAULT_PASSWORD = "medclear"


def ensure_installed(directory: Path = SMSC_DIR) -> None:
    """`npm ci` in the server's directory unless its dependency is already there."""
    if (directory / "node_modules" / "smpp" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise StackError("npm is not on PATH: the loopback SMSC needs Node.js and npm", "smsc")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=NPM_CI_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"npm ci in {directory} failed: {result.stderr.strip()[-500:]}", "smsc")


@dataclass
class Smsc:
    process: Process
    host: str
    port: int
    out: Path  # one JSON line per received part and per complete message

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def messages(self) -> list[dict[str, Any]]:
        """Every complete message received so far (concatenated parts reassembled)."""
        return [r for r in self.records() if r.get("kind") == "message"]

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        """SIGTERM: the server stops accepting, closes its sessions, exits."""
        self.process.stop()


def smsc_argv(
    port: int,
    out: Path,
    host: str = "127.0.0.1",
    system_id: str = DEFAULT_SYSTEM_ID,
    password: str = DEFAULT_PASSWORD,
    receipt_delay_ms: int = 50,
) -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise StackError("node is not on PATH: the loopback SMSC needs Node.js", "smsc")
    return [
        node,
        str(SERVER_JS),
        "--host",
        host,
        "--port",
        str(port),
        "--system-id",
        system_id,
        "--password",
        password,
        "--out",
        str(out),
        "--receipt-delay-ms",
        str(receipt_delay_ms),
    ]


def start_smsc(
    port: int,
    out: Path,
    log: Path,
    *,
    host: str = "127.0.0.1",
    system_id: str = DEFAULT_SYSTEM_ID,
    password: str = DEFAULT_PASSWORD,
    timeout_s: float = READY_TIMEOUT_S,
) -> Smsc:
    """Start the SMSC on host:port (a fixed port, so a restart keeps the address) and
    wait until it accepts connections."""
    ensure_installed()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = smsc_argv(port, out, host, system_id, password)
    process = Process(name="smsc", argv=argv, log=log.resolve(), cwd=SMSC_DIR).start()
    deadline = time.monotonic() + timeout_s
    while True:
        if READY_LINE in process.log_tail(5):
            return Smsc(process, host, port, out)
        if not process.alive():
            raise StackError(f"the SMSC exited:\n{process.log_tail()}", "smsc")
        if time.monotonic() > deadline:
            process.stop()
            raise StackError(f"the SMSC did not listen within {timeout_s} s", "smsc")
        time.sleep(0.05)
