"""The stack supervisor's infrastructure part, on real servers (127.0.0.1 only).

medclear's own `serve` processes are replaced here by a tiny fake that exposes
`medclear_ready 1.0` on its metrics port, so `up`/`status`/`down` are tested without
depending on the clearing code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clickhouse_driver import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from medclear import stack
from medclear.infra.settings import Settings
from medclear.stack import supervisor
from medclear.stack.record import Component, Probe, State
from medclear.stack.watch import WATCH_INTERVAL_S
from stream_jobs.jobs import JOBS_IN_ONE

pytestmark = [pytest.mark.stack, pytest.mark.timeout(90)]

FAKE_SERVE = """
import http.server, os, socket, sys
role, args = sys.argv[1], sys.argv[2:]
def opt(name):
    return int(args[args.index(name) + 1]) if name in args else None
if role in os.environ.get("FAKE_FAIL_ROLES", "").split(","):
    print(f"boom: {role} cannot start", flush=True)
    sys.exit(3)
listener = socket.create_server(("127.0.0.1", opt("--port"))) if opt("--port") else None
body = (
    "# TYPE medclear_ready gauge\\nmedclear_ready 1.0\\n"
    f'fake_env{{bootstrap="{os.environ["MEDCLEAR_KAFKA_BOOTSTRAP"]}",'
    f'clickhouse="{os.environ["MEDCLEAR_CLICKHOUSE_URL"]}",'
    f'state="{os.environ["MEDCLEAR_STATE_DIR"]}",workers="{os.environ["MEDCLEAR_WORKERS"]}"}} 1\\n'
).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", opt("--metrics-port")), H).serve_forever()
"""


@pytest.fixture
def fake_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE)

    def argv(role: str, index: int | None, port: int | None, metrics_port: int) -> list[str]:
        out = [sys.executable, str(script), role]
        if index is not None:
            out += ["--index", str(index)]
        if port is not None:
            out += ["--port", str(port)]
        return [*out, "--metrics-port", str(metrics_port)]

    monkeypatch.setattr(supervisor, "_serve_argv", argv)
    return script


def settings_for(state_dir: Path, **kw: Any) -> Settings:
    return Settings(
        state_dir=state_dir,
        kafka_bootstrap="",
        clickhouse_url="",
        startup_timeout_s=30,
        terminal_security=False,  # the fake processes speak no gRPC (no HSM to ask)
        **kw,
    )


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            cmdline = stack.proc_cmdline(int(entry.name))
            if cmdline and any(text in arg for arg in cmdline):
                found.append((int(entry.name), " ".join(cmdline)))
    return found


def gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        stack.reap(pid)
        if stack.proc_cmdline(pid) is None:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def console() -> Console:
    return Console(width=160, record=True, force_terminal=False)


# --------------------------------------------------------------------------------------
# single servers


@pytest.mark.clickhouse
def test_clickhouse_select_1(clickhouse_url: str) -> None:
    client = Client.from_url(clickhouse_url)
    try:
        assert client.execute("SELECT 1") == [(1,)]
        client.execute(
            "CREATE TABLE IF NOT EXISTS stack_probe (n UInt32, s String) ENGINE = Memory"
        )
        client.execute("INSERT INTO stack_probe (n, s) VALUES", [(1, "一"), (2, "二")])
        assert client.execute("SELECT sum(n), count() FROM stack_probe") == [(3, 2)]
        client.execute("DROP TABLE stack_probe")
    finally:
        client.disconnect()


@pytest.mark.clickhouse
def test_clickhouse_listens_only_where_told(tmp_path: Path) -> None:
    tcp, http = stack.free_port(), stack.free_port()
    proc = stack.start_clickhouse(tmp_path / "ch", tcp, http, tmp_path / "ch.log")
    try:
        stack.wait_http_ok(f"http://127.0.0.1:{http}/ping", 30, "Ok.", proc=proc)
        ports = listening_ports(proc.pid)
        assert ports == {("127.0.0.1", tcp), ("127.0.0.1", http)}, ports
        assert (tmp_path / "ch" / "config.xml").is_file()
        assert (tmp_path / "ch" / "users.xml").is_file()
    finally:
        assert proc.stop()
    assert not proc.alive()


@pytest.mark.clickhouse
def test_clickhouse_port_taken_fails_fast_with_log_tail(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        http = stack.free_port()
        proc = stack.start_clickhouse(tmp_path / "ch", port, http, tmp_path / "ch.log")
        t0 = time.monotonic()
        try:
            with pytest.raises(stack.StackError) as err:
                stack.wait_http_ok(f"http://127.0.0.1:{http}/ping", 30, "Ok.", proc=proc)
        finally:
            proc.stop()
    assert time.monotonic() - t0 < 15, "an early exit must not wait for the timeout"
    assert err.value.component == "clickhouse"
    assert "Address already in use" in str(err.value), str(err.value)


def listening_ports(pid: int | None) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets `pid` listens on, from /proc/net/tcp."""
    assert pid is not None
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addr, port = cols[1].split(":")
                if len(addr) == 8:
                    host = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    host = addr
                found.add((host, int(port, 16)))
    return found


def test_prometheus_ready_and_scrapes_the_given_targets(tmp_path: Path) -> None:
    port, other = stack.free_port(), stack.free_port()
    targets = {"prometheus": [f"127.0.0.1:{port}"], "medclear-worker": [f"127.0.0.1:{other}"]}
    proc = stack.start_prometheus(tmp_path / "prom", port, targets, tmp_path / "prom.log")
    try:
        t0 = time.monotonic()
        stack.wait_http_ok(f"http://127.0.0.1:{port}/-/ready", 30, proc=proc)
        assert time.monotonic() - t0 < 10
        _, body = stack.http_get(f"http://127.0.0.1:{port}/api/v1/status/config")
        loaded = json.loads(body)["data"]["yaml"]
        assert "scrape_interval: 5s" in loaded and "job_name: medclear-worker" in loaded
        # the scrape manager picks targets up a few seconds after ready: wait for a scrape
        deadline = time.monotonic() + 20
        while True:
            _, body = stack.http_get(f"http://127.0.0.1:{port}/api/v1/targets")
            active = json.loads(body)["data"]["activeTargets"]
            health = {(t["labels"]["job"], t["labels"]["instance"]): t["health"] for t in active}
            if health.get(("prometheus", f"127.0.0.1:{port}")) == "up":
                break
            assert time.monotonic() < deadline, f"no successful self-scrape: {health}"
            time.sleep(0.2)
        print(f"first self-scrape {time.monotonic() - t0:.1f} s after start")
        assert health == {
            ("prometheus", f"127.0.0.1:{port}"): "up",
            ("medclear-worker", f"127.0.0.1:{other}"): health[
                ("medclear-worker", f"127.0.0.1:{other}")
            ],
        }
        assert {t["scrapeInterval"] for t in active} == {"5s"}
        assert listening_ports(proc.pid) == {("127.0.0.1", port)}
    finally:
        assert proc.stop()


# --------------------------------------------------------------------------------------
# processes


def test_free_port_never_repeats_and_is_bindable() -> None:
    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(stack.can_bind(p) for p in ports)


def wait_output(proc: stack.Process, prefix: str, timeout_s: float = 10.0) -> str:
    """The first line starting with `prefix` that `proc` printed (after the log header)."""
    deadline = time.monotonic() + timeout_s
    while True:
        output = proc.log.read_bytes()[proc.log_offset :].decode()
        for line in output.splitlines():
            if line.startswith(prefix):
                return line
        assert time.monotonic() < deadline, f"{proc.name} printed no {prefix!r}: {output!r}"
        time.sleep(0.05)


def test_process_stop_stops_it_and_its_children(tmp_path: Path) -> None:
    code = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
        "print('child', p.pid, flush=True); time.sleep(300)"
    )
    proc = stack.Process("parent", [sys.executable, "-c", code], tmp_path / "p.log").start()
    assert proc.pid is not None and proc.alive()
    assert os.getpgid(proc.pid) == proc.pid, "must run in its own session/process group"
    child = int(wait_output(proc, "child").split()[1])
    t0 = time.monotonic()
    assert proc.stop(timeout=5)
    assert time.monotonic() - t0 < 3, "a SIGTERM-able process must stop without the SIGKILL wait"
    assert not proc.alive() and proc.exit_code() == -signal.SIGTERM
    assert gone(child), "the child in its process group survived"
    assert not proc.stop(), "stopping twice is a no-op"


def test_process_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(300)"
    )
    proc = stack.Process("stubborn", [sys.executable, "-c", code], tmp_path / "s.log").start()
    wait_output(proc, "ready")
    t0 = time.monotonic()
    assert proc.stop(timeout=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5
    assert proc.exit_code() == -signal.SIGKILL


def test_down_never_signals_a_pid_whose_cmdline_or_start_differs(
    tmp_path: Path, console: Console
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # a process that is not ours any more: the same pid now runs another command line
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    # one recorded with the right command line but another start time (a recycled pid)
    twin = subprocess.Popen(["sleep", "301"], start_new_session=True)
    ours = stack.Process("ours", ["sleep", "302"], tmp_path / "ours.log").start()
    try:
        recorded_stranger = stack.Process(
            "stranger", ["/bin/sleep", "300"], tmp_path / "x.log", pid=stranger.pid
        )
        recorded_twin = stack.Process(
            "twin",
            ["sleep", "301"],
            tmp_path / "t.log",
            pid=twin.pid,
            start_ticks=(stack.proc_start_ticks(twin.pid) or 0) - 1,
        )
        state = State(path=state_dir / stack.STATE_FILE)
        probe = Probe("http", "http://127.0.0.1:9/")
        state.components = [
            Component(p.name, "test", "-", probe, proc=p)
            for p in (recorded_stranger, recorded_twin, ours)
        ]
        state.save()
        # a copy of `ours` as another CLI process would load it: no Popen handle
        rows = {r.name: r for r in stack.status(settings_for(state_dir))}
        assert "another program" in rows["stranger"].detail
        assert not rows["twin"].healthy

        stack.down(settings_for(state_dir), console)

        assert stranger.poll() is None, "down killed a pid whose cmdline does not match"
        assert twin.poll() is None, "down killed a pid whose start time does not match"
        assert ours.pid is not None and gone(ours.pid)
        assert not (state_dir / stack.STATE_FILE).exists()
        out = console.export_text()
        assert "not touching it" in out
        with pytest.raises(stack.StackError, match="stack not running"):
            stack.load_endpoints(settings_for(state_dir))
        stack.down(settings_for(state_dir), console, wipe=True)
        assert not state_dir.exists()
    finally:
        for p in (stranger, twin):
            p.kill()
            p.wait()
        ours.stop()


def test_wipe_refuses_the_working_directory(
    tmp_path: Path, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(stack.StackError, match="refusing to delete"):
        stack.down(settings_for(Path(".")), console, wipe=True)
    assert tmp_path.exists()


# --------------------------------------------------------------------------------------
# the whole supervisor, with fake medclear processes


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    leftovers = processes_mentioning(str(tmp_path))
    for pid, _ in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"processes left running: {leftovers}"


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_up_status_down(state_dir: Path, fake_serve: Path, console: Console) -> None:
    settings = settings_for(state_dir, workers=2)
    t0 = time.monotonic()
    endpoints = stack.up(settings, console)
    took = time.monotonic() - t0
    try:
        assert endpoints == stack.load_endpoints(settings)
        assert endpoints.clickhouse_url.startswith("clickhouse://127.0.0.1:")
        assert endpoints.clickhouse_url.endswith("/medclear")
        assert endpoints.prometheus.startswith("http://127.0.0.1:")
        rows = stack.status(settings)
        jobs = stack.selected_jobs(settings)
        smsc = ["smsc"] if "sms" in jobs and settings.sms_enabled else []
        hosts = [JOBS_IN_ONE] if settings.jobs_in_one_process else jobs
        expected = [
            "broker-0",
            "clickhouse",
            "hsm",
            *smsc,
            "worker-0",
            "worker-1",
            "gateway",
            "registry",
            *hosts,
            "prometheus",
        ]
        assert [r.name for r in rows] == expected
        assert all(r.healthy for r in rows), [(r.name, r.detail) for r in rows]
        record = json.loads((state_dir / "stack.json").read_text())
        assert record["complete"] and len(record["components"]) == len(expected)
        for comp in record["components"]:
            assert comp["process"]["pid"] and comp["process"]["argv"]
            assert Path(comp["process"]["log"]).parent == state_dir.resolve() / "logs"
        assert (state_dir / "data" / "kafka" / "broker-0" / "log" / "meta.properties").is_file()
        assert (state_dir / "data" / "clickhouse" / "config.xml").is_file()

        # the children got the stack's addresses in their environment
        worker = record["components"][2]
        _, metrics = stack.http_get(Probe(**worker["probe"]).target)
        assert f'bootstrap="{endpoints.kafka_bootstrap}"' in metrics
        assert f'clickhouse="{endpoints.clickhouse_url}"' in metrics
        assert f'state="{state_dir.resolve()}"' in metrics and 'workers="2"' in metrics

        # the database exists; topics exist with their partition counts
        client = Client.from_url(endpoints.clickhouse_url)
        assert client.execute("SELECT currentDatabase()") == [("medclear",)]
        client.disconnect()
        stack.create_topics(endpoints.kafka(), {"medclear.commands": 6, "medclear.card-index": 1})

        # `up` again: nothing new is started
        again = stack.up(settings, console)
        assert again == endpoints
        assert "already running" in console.export_text()
        assert [r.pid for r in stack.status(settings)] == [r.pid for r in rows]
        table = stack.status_table(stack.status(settings))
        assert table.row_count == len(expected)

        # a worker killed with -9 shows as down; restart_component brings it back
        worker = next(i for i, r in enumerate(rows) if r.name == "worker-0")
        worker_pid = rows[worker].pid
        assert worker_pid is not None
        os.kill(worker_pid, signal.SIGKILL)
        assert gone(worker_pid)
        assert stack.status(settings)[worker].detail == "process not running"
        back = stack.restart_component(settings, "worker-0", console)
        assert back.healthy and back.pid not in (None, worker_pid)
        # the broker restarts on its port and data (topics are still there)
        broker = stack.restart_component(settings, "broker-0")
        assert broker.healthy and broker.address == endpoints.kafka_bootstrap
        stack.create_topics(endpoints.kafka(), {"medclear.events": 6})
        rows = stack.status(settings)
        assert all(r.healthy for r in rows), [(r.name, r.detail) for r in rows]
        with pytest.raises(stack.StackError, match="no component named"):
            stack.restart_component(settings, "nope")
    finally:
        stack.down(settings, console)
    print(f"up took {took:.2f} s")
    assert all(r.pid is not None and gone(r.pid) for r in rows)
    assert stack.status(settings) == []
    assert (state_dir / "data" / "kafka" / "broker-0").is_dir(), (
        "down (without --wipe) keeps the data"
    )


@pytest.mark.kafka
@pytest.mark.clickhouse
def test_up_failure_stops_everything_and_reports_the_log_tail(
    state_dir: Path, fake_serve: Path, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL_ROLES", "gateway")
    settings = settings_for(state_dir)
    with pytest.raises(stack.StackError) as err:
        stack.up(settings, console)
    assert err.value.component == "gateway"
    assert "boom: gateway cannot start" in str(err.value)
    assert "exited with code 3" in str(err.value)
    assert not (state_dir / "stack.json").exists()
    assert processes_mentioning(str(state_dir.parent)) == []
    with pytest.raises(stack.StackError, match="stack not running"):
        stack.load_endpoints(settings)


# --------------------------------------------------------------------------------------
# the testcontainers path


@pytest.mark.docker
@pytest.mark.kafka
@pytest.mark.clickhouse
def test_docker_backed_fixtures(
    docker_engine: None, kafka_bootstrap: str, clickhouse_url: str
) -> None:
    stack.wait_kafka_ready(kafka_bootstrap, 30)
    stack.create_topics(kafka_bootstrap, {"medclear.docker-probe": 3})
    client = Client.from_url(clickhouse_url)
    try:
        assert client.execute("SELECT 1") == [(1,)]
    finally:
        client.disconnect()


DOWN_S_MAX = 10.0  # issue 18: `medclear down` in at most this, nothing killed


def test_down_stops_every_real_component_on_sigterm_and_in_time(tmp_path: Path) -> None:
    """The real stack (every stream job, the SMSC, Prometheus), idle for a few seconds:
    each component exits on its SIGTERM; none needs the SIGKILL after the stop timeout.
    (The ClickHouse sink used to: its three feeds each set a signal handler, and each
    replaced the one before, so two feeds never heard SIGTERM.)"""
    settings = Settings(state_dir=tmp_path / "state", startup_timeout_s=60)
    console = Console(stderr=True)
    try:
        stack.up(settings, console)
        time.sleep(3)  # every consumer in its group, polling
    finally:
        started = time.monotonic()
        killed = stack.down(settings, console, wipe=True)
        took = time.monotonic() - started
    assert killed == []
    assert took < DOWN_S_MAX


def _pid_of(settings: Settings, name: str) -> int | None:
    return next((row.pid for row in stack.status(settings) if row.name == name), None)


def _wait_for(check: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_the_watcher_restarts_a_component_that_exits_and_not_while_paused(
    tmp_path: Path,
) -> None:
    """kill -9 of the stream jobs' process: the watcher starts it again (one restart, shown
    by `status` and counted in its metrics); while the drills' pause file exists, nothing."""
    settings = Settings(
        state_dir=tmp_path / "state",
        startup_timeout_s=60,
        jobs="abnormal",
        restart_on_exit=True,
        tls=False,
        terminal_security=False,
    )
    console = Console(stderr=True)
    try:
        stack.up(settings, console)
        first = _pid_of(settings, JOBS_IN_ONE)
        assert first is not None
        with supervisor.watcher_paused(settings):
            os.kill(first, signal.SIGKILL)
            time.sleep(3 * WATCH_INTERVAL_S + 1)
            assert JOBS_IN_ONE in supervisor.exited(settings)  # paused: left down

        def restarted() -> bool:
            row = next(r for r in stack.status(settings) if r.name == JOBS_IN_ONE)
            return row.healthy and row.pid != first

        assert _wait_for(restarted, 30)
        row = next(r for r in stack.status(settings) if r.name == JOBS_IN_ONE)
        assert row.restarts == 1
        watch = next(
            c
            for c in json.loads((settings.state_dir / "stack.json").read_text())["components"]
            if c["name"] == "watch"
        )
        url = f"http://127.0.0.1:{watch['ports']['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        assert 'medclear_component_restarts_total{component="jobs"} 1.0' in text
        env = {**os.environ, "MEDCLEAR_STATE_DIR": str(settings.state_dir)}
        shown = subprocess.run(
            [sys.executable, "-m", "medclear", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows = {r["name"]: r for r in json.loads(shown.stdout)}
        assert rows[JOBS_IN_ONE]["restarts"] == 1 and rows[JOBS_IN_ONE]["healthy"]
    finally:
        stack.down(settings, console, wipe=True)


def test_a_graceful_stop_says_not_serving_before_the_server_goes(tmp_path: Path) -> None:
    """SIGTERM to the gateway: a client watching its health sees NOT_SERVING first (so a
    balancer moves traffic away), then the process exits cleanly."""
    settings = Settings(
        state_dir=tmp_path / "state",
        startup_timeout_s=60,
        jobs="abnormal",
        tls=False,
        terminal_security=False,
    )
    console = Console(stderr=True)
    try:
        endpoints = stack.up(settings, console)
        gateway = _pid_of(settings, "gateway")
        assert gateway is not None
        env = {**os.environ, "MEDCLEAR_STATE_DIR": str(settings.state_dir)}
        idle = subprocess.run(
            [sys.executable, "-m", "medclear", "bench", "idle", "--seconds", "5", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        figures = json.loads(idle.stdout)  # the JSON alone on stdout, progress on stderr
        assert {"gateway", "worker-0", "broker-0"} <= set(figures["percent_of_one_core"])
        assert figures["whole_stack"] == sum(figures["percent_of_one_core"].values())
        with grpc.insecure_channel(endpoints.gateway) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="medclear.v1.PosService"), timeout=30
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            os.kill(gateway, signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert gone(gateway)
    finally:
        stack.down(settings, console, wipe=True)
