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

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medclear.infra import topics
from medclear.infra.settings import SECRET_FIELDS, Settings, smsc_password
from medclear.infra.stack_state import (
    NOT_RUNNING,
    STATE_FILE,
    Endpoints,
    StackError,
)
from medclear.infra.stack_state import (
    state_dir as state_dir_of,
)
from medclear.stack.probes import (
    http_probe,
    kafka_probe,
    metrics_probe,
    run_sync,
    tcp_probe,
    wait_until,
)
from medclear.stack.process import (
    HOST,
    SECRET_ENV,
    STOP_TIMEOUT_S,
    Process,
    free_port,
    proc_cmdline,
)
from medclear.stack.servers import (
    broker_env,
    clickhouse_probe,
    create_database,
    create_topics,
    start_broker,
    start_clickhouse,
    start_prometheus,
)
from stream_jobs.jobs import JOBS

STATE_VERSION = 1


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
# the stack and its record


ProbeKind = Literal["kafka", "http", "metrics", "clickhouse", "tcp"]


@dataclass(frozen=True)
class _Probe:
    kind: ProbeKind
    target: str
    expect: str | None = None

    def check(self) -> str | None:
        if self.kind == "kafka":
            return kafka_probe(self.target)
        if self.kind == "metrics":
            return metrics_probe(self.target)
        if self.kind == "clickhouse":
            return clickhouse_probe(self.target)
        if self.kind == "tcp":
            return tcp_probe(self.target)
        return http_probe(self.target, self.expect)


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
        if comp.proc.pid is not None and proc_cmdline(comp.proc.pid) is not None:
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
    state = _State.load(state_dir_of(settings) / STATE_FILE)
    if state is None:
        return []
    return [_component_status(c) for c in state.components]


def _stop_components(components: Sequence[_Component], console: Console | None) -> list[str]:
    """Stop in reverse order; returns the names that could not be stopped."""
    failed: list[str] = []
    for comp in reversed(components):
        proc = comp.proc
        if proc is None or proc.pid is None:
            continue
        if not proc.alive():
            if console is not None:
                if proc_cmdline(proc.pid) is not None:
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
    argv = [sys.executable, "-m", "medclear.cli.serve", role]
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
    from medclear.infra.settings import smsc_password_file
    from medclear.infra.tokens import card_token_key_file, data_key_file, ensure_key_file

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
        waited = wait_until(comp.name, comp.probe.check, timeout_s, comp.proc)
    started = comp.proc.started_at if comp.proc is not None else None
    # from its own start (siblings started together are waited for one after another)
    comp.ready_s = time.time() - started if started is not None else waited
    console.print(
        f"  [green]✓[/] {comp.name} ready in {comp.ready_s:.2f} s  [dim]{escape(comp.address)}[/]"
    )


def up(settings: Settings, console: Console) -> Endpoints:
    """Start the whole local stack (or report the one already running) and return where."""
    state_dir = state_dir_of(settings)
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
                create_database(ch_url, settings.clickhouse_database)
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
            from medclear.infra.pki import ensure_pki

            ensure_pki(state_dir.resolve() / "pki")
        with console.status("starting the HSM …"):
            hsm = serve("hsm", "hsm", None, hsm_port)
        _wait_component(hsm, timeout, console)
        if settings.terminal_security:  # the operator makes the card PIN verification key
            from medclear.infra.settings import keyring_file
            from medclear.infra.terminals import WINDOWS_MADE_AT_UP, Keyring, ensure_pvk

            hsm_pki = state_dir.resolve() / "pki" if settings.tls else None
            run_sync(ensure_pvk(f"{HOST}:{hsm_port}", hsm_pki))
            # the service windows' keys, so that `medclear card change-pin` works at once
            keyring = Keyring(keyring_file(settings.model_copy(update={"state_dir": state_dir})))
            run_sync(keyring.provision(f"{HOST}:{hsm_port}", list(WINDOWS_MADE_AT_UP), hsm_pki))
        with console.status(f"starting {settings.workers} worker(s) …"):
            workers = [serve(f"worker-{i}", "worker", i, None) for i in range(settings.workers)]
        for comp in workers:
            _wait_component(comp, timeout, console)
        jobs = selected_jobs(settings)
        if "sms" in jobs and settings.sms_enabled and settings.smsc_embedded:
            from medclear.stack.smsc import SMSC_DIR, ensure_installed, smsc_argv

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


ALERT_RULES = Path(__file__).resolve().parents[2] / "monitoring" / "alerts.yml"
MEDCLEAR_ROLES = ("hsm", "worker", "gateway", "registry", *JOBS)


def run_stop_first(settings: Settings, name: str) -> None:
    """Run the recorded stop command of one running component (Process.stop_first), and
    nothing else: the caller signals it next (a drill)."""
    state = _State.load(state_dir_of(settings) / STATE_FILE)
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
    state_dir = state_dir_of(settings)
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
            env = broker_env()
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
        waited = wait_until(name, comp.probe.check, settings.startup_timeout_s, comp.proc)
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
    state_dir = state_dir_of(settings)
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
