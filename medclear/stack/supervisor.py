"""The local stack supervisor behind `medclear up / status / down`.

`up` starts, on 127.0.0.1 only: Apache Kafka (one KRaft node, or MEDCLEAR_KAFKA_BROKERS;
medclear/stack/kafka.py) and, while it boots, ClickHouse (Debian's 18.16, or an external
server) and the HSM; then medclear's topics and ACLs, the clearing worker(s), the
loopback SMSC (npm `smpp` server; when the sms job runs and MEDCLEAR_SMSC_EMBEDDED is
on), the POS gateway, the card registry, the stream jobs of stream_jobs/jobs.py
(MEDCLEAR_JOBS picks a subset), and Prometheus, scraping every
`/metrics` with the alert rules of monitoring/alerts.yml. Each child runs in its own
session (a Ctrl-C on the CLI does not reach it), logs to ``<state_dir>/logs/<name>.log``
and keeps its data in ``<state_dir>/data/<name>/`` (kept by `down`, deleted by `down
--wipe`; the state directory is ``.medclear`` by default). ``<state_dir>/stack.json``
records what was started (pids, argv, ports, logs, start times); ``down`` stops exactly
those processes, and only while ``/proc/<pid>/cmdline`` and the start time still match
the record, so a recycled PID is never signalled.

Secrets are written by medclear/stack/secrets.py; no child's environment holds any.
`up` records in the endpoints whether terminal security (and TLS) is on; the CLI follows
that, not its own default.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medclear.infra import kafka_access, topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import prepare_groups
from medclear.infra.pki import ensure_kafka_pki, ensure_pki
from medclear.infra.settings import (
    KafkaSecurity,
    Settings,
    keyring_file,
    smsc_password,
)
from medclear.infra.stack_state import (
    NOT_RUNNING,
    STATE_FILE,
    Endpoints,
    StackError,
)
from medclear.infra.stack_state import (
    state_dir as state_dir_of,
)
from medclear.infra.terminals import WINDOWS_MADE_AT_UP, Keyring, ensure_pvk
from medclear.stack import acls
from medclear.stack import kafka as kafka_nodes
from medclear.stack.probes import (
    run_sync,
    wait_kafka_ready,
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
from medclear.stack.record import (
    Component,
    ComponentStatus,
    Probe,
    State,
    component_status,
    locked,
)
from medclear.stack.secrets import child_env, write_secrets
from medclear.stack.servers import (
    create_database,
    create_topics,
    start_clickhouse,
    start_prometheus,
)
from medclear.stack.smsc import SMSC_DIR, ensure_installed, smsc_argv
from stream_jobs.errors import StreamJobError
from stream_jobs.jobs import JOBS, JOBS_IN_ONE, WORKER_KAFKA, selected


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
    table.add_column("restarts", justify="right")
    table.add_column("log file", overflow="fold")
    for row in rows:
        state = "[green]ok[/]" if row.healthy else f"[red]{escape(row.detail)}[/]"
        table.add_row(
            row.name,
            str(row.pid) if row.pid is not None else "external",
            row.address,
            state,
            f"{row.ready_s:.2f} s" if row.ready_s is not None else "",
            str(row.restarts) if row.restarts else "",
            _relative(row.log),
        )
    if not rows:
        table.caption = NOT_RUNNING
    return table


def status(settings: Settings) -> list[ComponentStatus]:
    """Each recorded component: its process is alive and its readiness probe passes."""
    state = State.load(state_dir_of(settings) / STATE_FILE)
    if state is None:
        return []
    return [component_status(c) for c in state.components]


def _stop_waves(components: Sequence[Component]) -> list[list[Component]]:
    """The order of a stop: the watcher first (it would restart the others), then every
    other process at once, then the broker and ClickHouse at once (the processes commit
    to them while they stop)."""
    servers = [c for c in components if c.kind.startswith(SERVER_KINDS)]
    watch = [c for c in components if c.kind == WATCH_ROLE]
    rest = [c for c in components if c not in servers and c not in watch]
    return [watch, list(reversed(rest)), list(reversed(servers))]


def _stop_components(
    components: Sequence[Component], console: Console | None, killed: list[str] | None = None
) -> list[str]:
    """Stop in waves (`_stop_waves`), each wave's components in parallel; returns the names
    that could not be stopped, and adds to `killed` those that needed SIGKILL."""
    killed = killed if killed is not None else []
    failed: list[str] = []
    for wave in _stop_waves(components):
        if not wave:
            continue
        waiting = f"stopping {', '.join(c.name for c in wave)}"
        # a spinner while a wave stops (on a terminal only): the broker's save takes seconds
        status = console.status(waiting) if console is not None else contextlib.nullcontext()
        with status, ThreadPoolExecutor(max_workers=len(wave)) as pool:
            outcomes = list(pool.map(lambda comp: _stop_one(comp, console), wave))
        for comp, outcome in zip(wave, outcomes, strict=True):
            if outcome == "failed":
                failed.append(comp.name)
            elif outcome == "killed":
                killed.append(comp.name)
    return failed


def _stop_one(comp: Component, console: Console | None) -> str:
    """Stop one component: "stopped", "killed" (it needed SIGKILL), "failed" or "" (not
    running, or its pid now another program's)."""
    proc = comp.proc
    if proc is None or proc.pid is None:
        return ""
    if not proc.alive():
        if console is not None:
            if proc_cmdline(proc.pid) is not None:
                console.print(
                    f"  [yellow]![/] {comp.name}: pid {proc.pid} now runs another "
                    "program; not touching it"
                )
            else:
                console.print(f"  [dim]-[/] {comp.name}: not running")
        return ""
    t0 = time.monotonic()
    try:
        proc.stop(STOP_TIMEOUT_S)
    except StackError as exc:
        if console is not None:
            console.print(f"  [red]x[/] {escape(str(exc))}")
        return "failed"
    if console is not None and proc.killed:
        console.print(
            f"  [yellow]![/] {comp.name} (pid {proc.pid}) did not stop within "
            f"{STOP_TIMEOUT_S:g} s of SIGTERM: killed (see its log)"
        )
    elif console is not None:
        console.print(
            f"  [green]✓[/] stopped {comp.name} (pid {proc.pid}) in {time.monotonic() - t0:.1f} s"
        )
    return "killed" if proc.killed else "stopped"


def _serve_argv(role: str, index: int | None, port: int | None, metrics_port: int) -> list[str]:
    argv = [sys.executable, "-m", "medclear.cli.serve", role]
    if index is not None:
        argv += ["--index", str(index)]
    if port is not None:
        argv += ["--port", str(port)]
    return [*argv, "--metrics-port", str(metrics_port)]


def _wait_component(comp: Component, timeout_s: float, console: Console) -> None:
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
    with locked(state_dir):
        previous = State.load(state_dir / STATE_FILE)
        if previous is not None:
            rows = [component_status(c) for c in previous.components]
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


class _Starter:
    """One `up`: starts each component in turn, records it in the state file as soon as
    it is started (so a failure or Ctrl-C stops exactly what was started), and waits for
    it to be ready before the next one that needs it."""

    def __init__(self, settings: Settings, console: Console, state_dir: Path) -> None:
        self.settings = settings
        self.console = console
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.data = state_dir / "data"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        self.state = State(path=state_dir / STATE_FILE)
        self.timeout = settings.startup_timeout_s
        self.env: dict[str, str] = {}
        self.metrics_targets: dict[str, list[str]] = {}

    def track(self, comp: Component) -> Component:
        self.state.components.append(comp)
        self.state.save()
        return comp

    def wait(self, *comps: Component) -> None:
        for comp in comps:
            _wait_component(comp, self.timeout, self.console)
        self.state.save()  # with the times they took

    def broker(self) -> tuple[KafkaAccess, list[Component]]:
        """The broker, embedded (started, not yet waited for: ClickHouse and the HSM start
        meanwhile) or the one the settings name; how the stack reaches it (as the
        operator) and its components."""
        settings = self.settings
        if settings.embedded_kafka:
            return self._kafka_cluster()
        kafka = kafka_access.from_settings(settings, kafka_access.OPERATOR)
        comps = [
            self.track(
                Component(
                    "broker",
                    "kafka:external",
                    kafka.bootstrap,
                    Probe("kafka", kafka.bootstrap, ssl_dir=str(kafka.ssl_dir or "")),
                )
            )
        ]
        return kafka, comps

    def broker_ready(self, kafka: KafkaAccess, comps: list[Component]) -> None:
        """Wait for the broker's nodes (and for them to meet), then the topics and ACLs."""
        settings = self.settings
        self.wait(*comps)
        if settings.embedded_kafka and len(comps) > 1:
            with self.console.status(f"waiting for the {len(comps)} brokers to meet …"):
                wait_kafka_ready(kafka, self.timeout, brokers_min=len(comps))
        self._topics(kafka, comps)

    def _kafka_cluster(self) -> tuple[KafkaAccess, list[Component]]:
        """Apache Kafka: MEDCLEAR_KAFKA_BROKERS KRaft nodes, with TLS the certificates of
        every principal from the stack's CA (medclear/stack/kafka.py)."""
        settings = self.settings
        ssl_dir = None
        if settings.kafka_security == KafkaSecurity.SSL:
            principals = [kafka_access.OPERATOR, *acls.CLIENT_PRINCIPALS]
            ssl_dir = ensure_kafka_pki(self.state_dir.resolve() / "pki", principals)
        nodes = kafka_nodes.plan(settings.kafka_brokers)
        base = self.data / "kafka"
        how = "TLS, ACLs" if ssl_dir is not None else "PLAINTEXT"
        with self.console.status(f"starting Apache Kafka: {len(nodes)} KRaft node(s), {how} …"):
            procs = kafka_nodes.start_nodes(nodes, base, ssl_dir, settings.kafka_heap_mb, self.logs)
        comps = [
            self.track(
                Component(
                    node.name,
                    "kafka:apache",
                    node.bootstrap,
                    Probe("kafka", node.bootstrap, ssl_dir=str(ssl_dir or "")),
                    proc,
                    str(base / node.name),
                    {
                        "kafka": node.client_port,
                        "internal": node.internal_port,
                        "controller": node.controller_port,
                    },
                )
            )
            for node, proc in zip(nodes, procs, strict=True)
        ]
        replication = kafka_access.replication(settings)
        return KafkaAccess(
            kafka_nodes.bootstrap_of(nodes), kafka_access.OPERATOR, ssl_dir, replication
        ), comps

    def _topics(self, kafka: KafkaAccess, comps: list[Component]) -> None:
        """medclear's topics, and on the embedded cluster with TLS every principal's ACLs."""
        wanted = topics.partitions(self.settings)
        with self.console.status("creating topics …"):
            try:
                create_topics(kafka, wanted)
            except Exception as exc:
                tail = comps[0].proc.log_tail() if comps[0].proc is not None else ""
                raise StackError(
                    f"broker: creating topics failed: {type(exc).__name__}: {exc}",
                    comps[0].name,
                    tail,
                ) from exc
        run_sync(prepare_groups(kafka, WORKER_KAFKA.prefix))
        listed = ", ".join(f"{name} ({count})" for name, count in wanted.items())
        self.console.print(f"  [green]✓[/] topics {listed} (replication {kafka.replication})")
        if self.settings.embedded_kafka and kafka.tls:
            with self.console.status("granting each principal its ACLs …"):
                count = acls.apply(kafka, acls.rules())
                acls.wait_effective(kafka)
            self.console.print(
                f"  [green]✓[/] {count} ACLs: each process only its own topics "
                "(`medclear kafka acls`)"
            )

    def clickhouse(self) -> tuple[str, str]:
        """ClickHouse (embedded, or the one the settings name) and medclear's database;
        returns its native URL and its HTTP address ("" for an external server)."""
        settings, data, database = self.settings, self.data, self.settings.clickhouse_database
        if settings.embedded_clickhouse:
            tcp_port, http_port = free_port(), free_port()
            ch_url = f"clickhouse://{HOST}:{tcp_port}/{database}"
            ch_http = f"http://{HOST}:{http_port}"
            with self.console.status("starting clickhouse …"):
                proc = start_clickhouse(
                    data / "clickhouse", tcp_port, http_port, self.logs / "clickhouse.log"
                )
            clickhouse = self.track(
                Component(
                    "clickhouse",
                    "clickhouse",
                    f"{HOST}:{tcp_port} (http {http_port})",
                    Probe("http", f"{ch_http}/ping", "Ok."),
                    proc,
                    str(data / "clickhouse"),
                    {"tcp": tcp_port, "http": http_port},
                )
            )
        else:
            ch_url, ch_http = settings.clickhouse_url, ""
            netloc = urllib.parse.urlsplit(ch_url).netloc.rpartition("@")[2]
            clickhouse = self.track(
                Component("clickhouse", "clickhouse:external", netloc, Probe("clickhouse", ch_url))
            )
        self.wait(clickhouse)
        with self.console.status(f"creating database {database} …"):
            try:
                create_database(ch_url, database)
            except StackError:
                raise
            except Exception as exc:
                tail = clickhouse.proc.log_tail() if clickhouse.proc is not None else ""
                raise StackError(
                    f"clickhouse: CREATE DATABASE {database} failed: {exc}", "clickhouse", tail
                ) from exc
        self.console.print(f"  [green]✓[/] database {database}")
        self.state.save()
        return ch_url, ch_http

    def serve(self, name: str, role: str, index: int | None, port: int | None) -> Component:
        """One of medclear's own processes (`python -m medclear.cli.serve <role>`)."""
        metrics_port = free_port()
        proc = Process(
            name=name,
            argv=_serve_argv(role, index, port, metrics_port),
            log=self.logs / f"{name}.log",
            env=self.env,
            cwd=Path.cwd(),
        ).start()
        self.metrics_targets.setdefault(f"medclear-{role}", []).append(f"{HOST}:{metrics_port}")
        address = f"{HOST}:{port}" if port is not None else f"metrics {HOST}:{metrics_port}"
        ports = {"metrics": metrics_port} | ({"port": port} if port is not None else {})
        probe = Probe("metrics", f"http://{HOST}:{metrics_port}/metrics")
        return self.track(Component(name, role, address, probe, proc, None, ports))

    def hsm(self) -> str:
        """The HSM, then (terminal security on) the card PIN verification key and the
        service windows' keys, so that `medclear card change-pin` works at once."""
        settings, state_dir = self.settings, self.state_dir
        hsm_port = settings.hsm_port or free_port()
        address = f"{HOST}:{hsm_port}"
        write_secrets(settings, state_dir)  # files each process reads; never the environment
        self.env["MEDCLEAR_HSM_ADDRESS"] = address  # for the processes after it
        if settings.tls:
            ensure_pki(state_dir.resolve() / "pki")
        with self.console.status("starting the HSM …"):
            hsm = self.serve("hsm", "hsm", None, hsm_port)
        self.wait(hsm)
        if settings.terminal_security:
            hsm_pki = state_dir.resolve() / "pki" if settings.tls else None
            run_sync(ensure_pvk(address, hsm_pki))
            keyring = Keyring(keyring_file(settings.model_copy(update={"state_dir": state_dir})))
            run_sync(keyring.provision(address, list(WINDOWS_MADE_AT_UP), hsm_pki))
        return address

    def smsc(self) -> None:
        """The loopback SMSC (npm `smpp` server) for the sms job, and its address in the
        environment of the processes after it."""
        settings, data = self.settings, self.data
        port = free_port()
        with self.console.status("starting the SMSC (npm smpp server) …"):
            ensure_installed()
            (data / "smsc").mkdir(parents=True, exist_ok=True)
            argv = smsc_argv(
                port,
                (data / "smsc" / "messages.jsonl").resolve(),
                HOST,
                settings.smsc_system_id,
                smsc_password(settings),
            )
            proc = Process(
                name="smsc", argv=argv, log=(self.logs / "smsc.log").resolve(), cwd=SMSC_DIR
            ).start()
        smsc = self.track(
            Component(
                "smsc",
                "smsc",
                f"{HOST}:{port}",
                Probe("tcp", f"{HOST}:{port}"),
                proc,
                str(data / "smsc"),
                {"smpp": port},
            )
        )
        self.wait(smsc)
        self.env.update(_smsc_env(self.state.components))

    def medclear(self) -> tuple[int, int, list[Component]]:
        """The SMSC (the sms job binds to it), then the workers, the gateway, the card
        registry and the stream jobs all at once, not waited for (none needs another);
        returns the gateway's and the registry's ports and the components to wait for."""
        settings = self.settings
        jobs = selected_jobs(settings)
        if "sms" in jobs and settings.sms_enabled and settings.smsc_embedded:
            self.smsc()
        if settings.jobs_in_one_process and jobs:
            jobs = [JOBS_IN_ONE]  # `serve jobs` reads MEDCLEAR_JOBS itself
        gateway_port = settings.gateway_port or free_port()
        registry_port = settings.registry_port or free_port()
        with self.console.status("starting workers, gateway, registry and stream jobs …"):
            started = [
                self.serve(f"worker-{i}", "worker", i, None) for i in range(settings.workers)
            ]
            started += [
                self.serve("gateway", "gateway", None, gateway_port),
                self.serve("registry", "registry", None, registry_port),
                *(self.serve(name, name, None, None) for name in jobs),
            ]
            if settings.restart_on_exit:
                started.append(self.serve(WATCH_ROLE, WATCH_ROLE, None, None))
        self.state.save()
        return gateway_port, registry_port, started

    def prometheus(self) -> str:
        """Prometheus scraping every /metrics started so far, with the alert rules."""
        port = self.settings.prometheus_port or free_port()
        url = f"http://{HOST}:{port}"
        with self.console.status("starting prometheus …"):
            targets = {**self.metrics_targets, "prometheus": [f"{HOST}:{port}"]}
            proc = start_prometheus(
                self.data / "prometheus",
                port,
                targets,
                self.logs / "prometheus.log",
                rule_files=[ALERT_RULES],
            )
        prometheus = self.track(
            Component(
                "prometheus",
                "prometheus",
                url,
                Probe("http", f"{url}/-/ready"),
                proc,
                str(self.data / "prometheus"),
                {"http": port},
            )
        )
        self.wait(prometheus)
        return url

    def run(self) -> Endpoints:
        t_start = time.monotonic()
        kafka, brokers = self.broker()
        ch_url, ch_http = self.clickhouse()
        self.env = child_env(self.settings, self.state_dir, kafka, ch_url)
        hsm = self.hsm()
        # the broker first: started beside it, the processes would wait for it anyway
        # (kafka_admin.wait_for_topics), and their start-up took the CPU its start needs
        # (up 8.3-10.0 -> 10.7-11.6 s, two cores)
        self.broker_ready(kafka, brokers)
        gateway_port, registry_port, processes = self.medclear()
        self.wait(*processes)
        prom_url = self.prometheus()
        state = self.state
        state.endpoints = Endpoints(
            kafka_bootstrap=kafka.bootstrap,
            clickhouse_url=ch_url,
            clickhouse_http=ch_http,
            gateway=f"{HOST}:{gateway_port}",
            registry=f"{HOST}:{registry_port}",
            prometheus=prom_url,
            hsm=hsm,
            terminal_security=self.settings.terminal_security,
            tls=self.settings.tls,
            kafka_ssl_dir=str(kafka.ssl_dir or ""),
            kafka_replication=kafka.replication,
        )
        state.settings_env = {
            k: v for k, v in self.env.items() if k.startswith("MEDCLEAR_") and k not in SECRET_ENV
        }
        state.complete = True
        state.ready_s = time.monotonic() - t_start
        state.save()
        return state.endpoints


def _up(settings: Settings, console: Console, state_dir: Path) -> Endpoints:
    starter = _Starter(settings, console, state_dir)
    state = starter.state
    try:
        endpoints = starter.run()
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


def _smsc_env(components: Sequence[Component]) -> dict[str, str]:
    """Where the embedded SMSC listens, for the sms job (nothing if there is none)."""
    for comp in components:
        if comp.kind == "smsc" and "smpp" in comp.ports:
            return {"MEDCLEAR_SMSC_HOST": HOST, "MEDCLEAR_SMSC_PORT": str(comp.ports["smpp"])}
    return {}


def selected_jobs(settings: Settings) -> list[str]:
    """The stream jobs `up` starts: all of stream_jobs/jobs.py, or those MEDCLEAR_JOBS names
    (in one process, component `jobs`, unless MEDCLEAR_JOBS_IN_ONE_PROCESS=false)."""
    try:
        return selected(settings)
    except StreamJobError as exc:
        raise StackError(str(exc)) from exc


ALERT_RULES = Path(__file__).resolve().parents[2] / "monitoring" / "alerts.yml"
WATCH_ROLE = "watch"  # restarts what exits (medclear/stack/watch.py)
SERVER_KINDS = ("kafka:", "clickhouse")  # stopped last: every process writes to them
MEDCLEAR_ROLES = ("hsm", "worker", "gateway", "registry", *JOBS, JOBS_IN_ONE, WATCH_ROLE)
WATCH_PAUSE_FILE = "watch.paused"  # while it exists, the watcher restarts nothing


@contextlib.contextmanager
def watcher_paused(settings: Settings) -> Iterator[None]:
    """The watcher restarts nothing meanwhile: the drills and benchmarks stop, freeze and
    restart components on purpose, and repair them themselves."""
    marker = state_dir_of(settings) / WATCH_PAUSE_FILE
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def restart_component(
    settings: Settings,
    name: str,
    console: Console | None = None,
    env_overrides: Mapping[str, str] | None = None,
    while_stopped: Callable[[], None] | None = None,
    only_if_exited: bool = False,
) -> ComponentStatus:
    """Stop one recorded component (if it still runs) and start it again with the same
    argv, ports, log and data (`while_stopped` runs in between: the benchmarks delete a
    worker's stores there); waits until it is ready and updates ``stack.json``. With
    `only_if_exited` (the watcher), a component found running is left as it is."""
    state_dir = state_dir_of(settings)
    with locked(state_dir, timeout_s=settings.startup_timeout_s):
        state = State.load(state_dir / STATE_FILE)
        if state is None or not state.complete or state.endpoints is None:
            raise StackError(NOT_RUNNING)
        comp = next((c for c in state.components if c.name == name), None)
        if comp is None:
            known = ", ".join(c.name for c in state.components)
            raise StackError(f"no component named {name!r} (known: {known})")
        old = comp.proc
        if old is None:
            raise StackError(f"{name} is an external server; medclear does not run it", name)
        if only_if_exited and old.alive():
            return component_status(comp)
        if not old.alive():
            comp.restarts += 1
            comp.gave_up = False
        old.stop(STOP_TIMEOUT_S)
        if while_stopped is not None:
            while_stopped()
        if comp.kind in MEDCLEAR_ROLES:
            own_env = child_env(
                settings, state_dir, state.endpoints.kafka(), state.endpoints.clickhouse_url
            )
            own_env["MEDCLEAR_HSM_ADDRESS"] = state.endpoints.hsm
            own_env.update(_smsc_env(state.components))
            # What `up` ran with (TLS, terminal security, partitions, …), not the caller's.
            own_env.update(state.settings_env)
            own_env.update(env_overrides or {})  # on purpose, e.g. the bench's echo worker
            env: dict[str, str] | None = own_env
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
    return component_status(comp)


def _safe_to_wipe(path: Path) -> bool:
    path = path.resolve()
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    return path not in protected and path not in Path.cwd().resolve().parents


def down(settings: Settings, console: Console, wipe: bool = False) -> list[str]:
    """Stop every recorded process in reverse order (data kept); `wipe` deletes state_dir.
    Returns the components that had to be killed (none should: each stops on SIGTERM)."""
    killed: list[str] = []
    state_dir = state_dir_of(settings)
    if not state_dir.exists():
        console.print(f"nothing to stop: {_relative(str(state_dir))} does not exist")
        return killed
    with locked(state_dir):
        state = State.load(state_dir / STATE_FILE)
        failed: list[str] = []
        if state is None:
            console.print("no stack recorded; nothing to stop")
        else:
            failed = _stop_components(state.components, console, killed)
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
    return killed


def exited(settings: Settings) -> list[str]:
    """The components medclear started that are not running now (read without the lock:
    the record is replaced atomically); none while the stack is not complete."""
    state = State.load(state_dir_of(settings) / STATE_FILE)
    if state is None or not state.complete:
        return []
    return [
        c.name
        for c in state.components
        if c.proc is not None and c.kind != WATCH_ROLE and not c.proc.alive()
    ]


def mark_gave_up(settings: Settings, name: str) -> None:
    """Record that the watcher no longer restarts `name` (shown by `medclear status`)."""
    state_dir = state_dir_of(settings)
    with locked(state_dir, timeout_s=settings.startup_timeout_s):
        state = State.load(state_dir / STATE_FILE)
        for comp in state.components if state is not None else []:
            if comp.name == name:
                comp.gave_up = True
        if state is not None:
            state.save()
