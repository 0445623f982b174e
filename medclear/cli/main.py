"""`medclear`: run the local stack, swipe a card, seed a city, run the demo.

Every command explains itself with --help. Commands that talk to the stack find it
through the state directory written by `medclear up` (or MEDCLEAR_* settings).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clearing.money import format_yuan
from medclear.bench import cpu_use
from medclear.bench import fuzz as bench_fuzz
from medclear.bench import pipeline as bench_pipeline
from medclear.bench import state as bench_state
from medclear.cli.card import card_app
from medclear.cli.hsm import hsm_app
from medclear.cli.pos import endpoint, pos_app
from medclear.cli.recon import recon_app
from medclear.cli.support import client_pki, fail, keyring_for
from medclear.cli.tables import result_codes_table
from medclear.drills.drill import drill_app
from medclear.infra.settings import Settings, get_settings, pki_dir
from medclear.infra.terminals import SEED_WINDOW
from medclear.sim.traffic import LatencyStats
from reader_agent.cli import agent_app, emulator_app
from stream_jobs import jobs

app = typer.Typer(
    help="medclear — real-time clearing of medical-insurance personal accounts on social "
    "security cards. Start with `medclear up`, then `medclear seed` and `medclear pos swipe`.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
serve_app = typer.Typer(
    help="Run one medclear process in the foreground (used by `up`).", no_args_is_help=True
)
bench_app = typer.Typer(
    help="Measure the running stack (prints figures, asserts nothing).", no_args_is_help=True
)
app.add_typer(serve_app, name="serve")
app.add_typer(pos_app, name="pos")
app.add_typer(bench_app, name="bench")
app.add_typer(card_app, name="card")
app.add_typer(hsm_app, name="hsm")
app.add_typer(recon_app, name="recon")
app.add_typer(agent_app, name="agent")
app.add_typer(emulator_app, name="card-emulator")
app.add_typer(drill_app, name="drill")

console = Console()
err = Console(stderr=True)


# ---------------------------------------------------------------------------- stack


@app.command()
def up() -> None:
    """Start the whole local stack on 127.0.0.1 and wait until every part is ready.

    Starts the Kafka-protocol broker (noida-db; MEDCLEAR_BROKER=tansu for tansu), creates
    the topics, starts ClickHouse, the clearing worker(s), the POS gateway, the card
    registry and Prometheus, then prints where each runs. State lives in .medclear/
    (MEDCLEAR_STATE_DIR). With MEDCLEAR_KAFKA_BOOTSTRAP / MEDCLEAR_CLICKHOUSE_URL set,
    those external servers are used and not started.
    """
    from medclear import stack

    try:
        stack.up(get_settings(), console)
    except stack.StackError as exc:
        raise fail(str(exc)) from exc


@app.command()
def status() -> None:
    """Show every component of the local stack, its address and whether it is healthy."""
    from medclear import stack

    rows = stack.status(get_settings())
    if not rows:
        raise fail("no stack recorded in the state directory; run `medclear up`")
    console.print(stack.status_table(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(code=1)


@app.command()
def down(
    wipe: Annotated[bool, typer.Option(help="also delete all data (topics, tables, logs)")] = False,
) -> None:
    """Stop everything `medclear up` started (by recorded PID). Data is kept unless --wipe."""
    from medclear import stack

    stack.down(get_settings(), console, wipe=wipe)


@app.command()
def restart(
    component: Annotated[str, typer.Argument(help="a name from `medclear status`, e.g. worker-0")],
) -> None:
    """Stop one component of the running stack and start it again (same ports, data and
    log), waiting until it is ready. Safe at any time: nothing is lost or applied twice."""
    from medclear import stack

    try:
        row = stack.restart_component(get_settings(), component, console)
    except stack.StackError as exc:
        raise fail(str(exc)) from exc
    console.print(f"[green]✓[/] {row.name} ready again (pid {row.pid})")


# ---------------------------------------------------------------------------- serve


def _prepare_process(name: str, metrics_port: int) -> Settings:
    """Set-up shared by every long-running medclear process: logging (aiokafka's debug
    records quieted) and /metrics on `metrics_port` (0: a free port)."""
    from medclear.infra import log
    from monitoring import metrics

    log.configure(name)
    settings = get_settings()
    metrics.serve(metrics_port, settings.host)
    return settings


def _bootstrap(settings: Settings) -> str:
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    from medclear import stack

    return stack.load_endpoints(settings).kafka_bootstrap


@serve_app.command("worker")
def serve_worker(
    index: Annotated[int, typer.Option(help="worker number, for logs and metrics")] = 0,
    metrics_port: Annotated[int, typer.Option(help="port of /metrics")] = 0,
) -> None:
    """A clearing worker: consumes commands, decides them, emits events and replies."""
    from medclear.infra.policy import load_policy
    from stream_jobs import worker

    settings = _prepare_process(f"worker-{index}", metrics_port)
    worker.run(settings, load_policy(settings), _bootstrap(settings), index)


def _serve_command_server(
    name: str, run: Callable[..., None], port: int, metrics_port: int, instance: str
) -> None:
    """A gRPC server in front of the command topic (gateway, registry): its settings, the
    HSM when terminal security is on, mutual TLS when there is a PKI."""
    settings = _prepare_process(name, metrics_port)
    hsm = settings.hsm_address if settings.terminal_security else ""
    run(
        _bootstrap(settings),
        settings.host,
        port,
        settings.decision_deadline_ms,
        instance,
        hsm,
        pki_dir(settings),
    )


@serve_app.command("gateway")
def serve_gateway(
    port: Annotated[int, typer.Option(help="gRPC port of the POS service")] = 0,
    metrics_port: Annotated[int, typer.Option(help="port of /metrics")] = 0,
    instance: Annotated[str, typer.Option(help="names this gateway's reply topic")] = "gw-0",
) -> None:
    """The POS gateway: gRPC PosService in front of the command topic."""
    from medclear import gateway

    _serve_command_server("gateway", gateway.run, port, metrics_port, instance)


@serve_app.command("registry")
def serve_registry(
    port: Annotated[int, typer.Option(help="gRPC port of the card registry service")] = 0,
    metrics_port: Annotated[int, typer.Option(help="port of /metrics")] = 0,
    instance: Annotated[str, typer.Option(help="names this registry's reply topic")] = "reg-0",
) -> None:
    """The card registry: gRPC service for service windows and the 12333 hotline."""
    from card_registry import service

    _serve_command_server("registry", service.run, port, metrics_port, instance)


@serve_app.command("hsm")
def serve_hsm(
    port: Annotated[int, typer.Option(help="gRPC port of the HSM service")] = 0,
    metrics_port: Annotated[int, typer.Option(help="port of /metrics")] = 0,
) -> None:
    """The HSM simulator: key store under the LMK, PIN / MAC / cryptogram operations."""
    from hsm_sim import service
    from hsm_sim.keystore import KeyStore, KeyStoreError, load_lmk
    from medclear.infra.rpc import system_clock_ms
    from medclear.infra.settings import key_store_file, lmk_file

    settings = _prepare_process("hsm", metrics_port)
    try:
        lmk = (
            load_lmk(hex_value=settings.hsm_lmk.get_secret_value())
            if settings.hsm_lmk.get_secret_value()
            else load_lmk(path=lmk_file(settings))
        )
        store = KeyStore(key_store_file(settings), lmk, system_clock_ms)
    except (KeyStoreError, OSError) as exc:
        raise fail(f"hsm: {exc}") from exc
    service.run(store, f"{settings.host}:{port}", pki_dir(settings))


def _job_command(name: str) -> None:
    def serve_job(
        metrics_port: Annotated[int, typer.Option(help="port of /metrics")] = 0,
    ) -> None:
        settings = _prepare_process(name, metrics_port)
        jobs.runner(name)(settings, _bootstrap(settings))

    serve_job.__doc__ = f"The {name} stream job: {jobs.JOB_HELP.get(name, 'see stream_jobs/')}."
    serve_app.command(name)(serve_job)


for _job in jobs.JOBS:  # one `medclear serve <job>` per entry of stream_jobs/jobs.py
    _job_command(_job)


# ---------------------------------------------------------------------------- seed, demo


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


def _seed(
    persons: int,
    seed: int,
    concurrency: int,
    settings: Settings | None = None,
    *,
    district: bool = False,
) -> float:
    """Enrol a synthetic city through the registry; with `district`, every 100th resident
    (index 7 mod 100) lives in the demo district (short pre-loss, see demo.py)."""
    from medclear.sim import city, demo, traffic

    settings = settings or get_settings()
    residents = city.residents(persons, seed)
    registry = endpoint("registry")
    keyring = keyring_for(settings, [SEED_WINDOW])
    started = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("seeding persons", total=len(residents), info="")
        asyncio.run(
            traffic.seed(
                registry,
                residents,
                concurrency,
                lambda: progress.advance(task),
                keyring,
                client_pki(settings),
                (lambda i: demo.DEMO_DISTRICT if i % 100 == 7 else traffic.DEFAULT_REGION)
                if district
                else None,
            )
        )
    elapsed = time.perf_counter() - started
    path = seed_cards_file(settings)
    _write_private(path, city.cards_csv(residents))
    console.print(f"the city's cards and their PINs: {path} (readable by you only)")
    return elapsed


def seed_cards_file(settings: Settings) -> Path:
    """Where `medclear seed` writes the seeded city's cards and PINs."""
    return settings.state_dir / "seed" / "cards.csv"


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it holds PINs)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # also when it existed with other permissions


def _demo_traffic(settings: Settings, persons: int, minutes: float, concurrency: int) -> None:
    """The demo's day at the counters (medclear/sim/demo.py), then its summary and 对账."""
    from rich.live import Live

    from medclear import stack
    from medclear.cli.recon import _print as print_recon
    from medclear.cli.recon import import_, reconcile, render_html, summary
    from medclear.infra.policy import load_institutions
    from medclear.sim import city, demo

    endpoints = stack.load_endpoints(settings)
    residents = city.residents(persons, 2026)
    institutions = list(load_institutions(settings.institutions_file).values())
    terminals = sorted({f"T{i.institution_id}" for i in institutions} | {SEED_WINDOW})
    keyring = keyring_for(settings, terminals)
    stats = demo.DemoStats()
    with Live(demo.panel(stats, minutes), console=console, refresh_per_second=2) as live:
        asyncio.run(
            demo.run(endpoints.gateway, endpoints.registry, endpoints.prometheus, residents,
                     institutions, minutes, concurrency, keyring, client_pki(settings), live, stats)
        )  # fmt: skip
    table = Table(title="the demo day")
    for column in ("swipes", "approved", "p50 ms", "p99 ms", "reversals", "refunds",
                   "loss reports", "releases", "limit reached", "SMS sent", "alerts"):  # fmt: skip
        table.add_column(column, justify="right")
    approved = sum(stats.results[c.name] for c in demo.APPROVED)
    time.sleep(3)  # the stream jobs catch up with the last swipes
    stats.sms_sent = demo.prometheus_sum(endpoints.prometheus, "medclear_sms_sent_total")
    stats.alerts = demo.prometheus_sum(endpoints.prometheus, "medclear_abnormal_alerts_total")
    table.add_row(f"{sum(stats.results.values()):,}", f"{approved:,}",
                  f"{stats.percentile(0.5):.1f}", f"{stats.percentile(0.99):.1f}",
                  f"{stats.ops['reverse']:,}", f"{stats.ops['refund']:,}",
                  f"{stats.ops['loss_report']:,}", f"{stats.ops['release']:,}",
                  "yes" if stats.ops["limit_reached"] else "no", f"{stats.sms_sent:,.0f}",
                  f"{stats.alerts:,.0f}")  # fmt: skip
    console.print(table)
    files = demo.institution_files(stats, settings.state_dir / "reports" / "institution-files")
    from medclear.cli import recon as cli_recon

    with cli_recon.console.capture():  # one line here instead of a table per institution
        for totals, detail in files:
            import_(totals, detail)
    console.print(f"imported the institutions' own files ({len(files)}): what their POS saw")
    from clearing import settlement

    day = settlement.day_number(time.strftime("%Y-%m-%d", time.gmtime(time.time() + 8 * 3600)))
    deadline = time.monotonic() + 30
    report = reconcile(settings, day, None)
    while report.differences and time.monotonic() < deadline:  # settlement / sink catching up
        time.sleep(2)
        report = reconcile(settings, day, None)
    print_recon(report)
    path = settings.state_dir / "reports" / "recon-demo.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    console.print(f"reconciliation: {summary(report)} — report {path}")


@app.command("seed")
def seed_cmd(
    persons: Annotated[int, typer.Option(min=1, max=10_000_000, help="how many persons")] = 1000,
    seed: Annotated[int, typer.Option(help="city seed; the same seed gives the same city")] = 2026,
    concurrency: Annotated[int, typer.Option(min=1, max=512, help="requests in flight")] = 32,
) -> None:
    """Create a synthetic city through the card registry: persons, cards, opening balances.

    Everything goes through commands: one EnrolPerson per person (register, issue,
    activate, change the initial PIN, credit, decided as one), so it is decided and
    logged like any window operation. Seeding the same city twice changes nothing.
    """
    from medclear.sim.traffic import SeedError

    try:
        elapsed = _seed(persons, seed, concurrency)
    except SeedError as exc:
        raise fail(str(exc)) from exc
    except grpc.RpcError as exc:
        raise fail(f"registry: {exc.code().name} {exc.details()}") from exc
    console.print(
        f"seeded {persons:,} persons in {elapsed:.1f} s "
        f"({persons / elapsed:,.0f} persons/s, one EnrolPerson command each)"
    )


def _swipe_run(
    persons: int,
    seed: int,
    count: int,
    concurrency: int,
    label: str,
    settings: Settings | None = None,
) -> LatencyStats:
    from medclear.infra.policy import load_institutions
    from medclear.sim import city, traffic

    settings = settings or get_settings()
    residents = city.residents(persons, seed)
    institutions = [i for i in load_institutions(settings.institutions_file).values()]
    plan = traffic.plan_swipes(residents, institutions, count, seed, time.time_ns() // 1000)
    keyring = keyring_for(settings, traffic.terminal_ids(plan))
    stats = LatencyStats()
    gateway = endpoint("gateway")
    with _progress() as progress:
        task = progress.add_task(label, total=count, info="")

        def done() -> None:
            approved = stats.results.get("OK", 0) + stats.results.get("PARTIALLY_APPROVED", 0)
            progress.update(
                task,
                advance=1,
                info=(
                    f"{stats.rate_per_s:,.0f}/s  p99 {stats.percentile(0.99):.1f} ms  "
                    f"approved {approved}  declined {stats.count - approved}"
                ),
            )

        asyncio.run(
            traffic.run_swipes(
                gateway, plan, concurrency, stats, done, keyring, client_pki(settings)
            )
        )
    return stats


def _stats_table(title: str, stats: LatencyStats) -> Table:
    table = Table(title=title)
    for column in ("swipes", "rate /s", "p50 ms", "p95 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{stats.count:,}",
        f"{stats.rate_per_s:,.0f}",
        f"{stats.percentile(0.50):.2f}",
        f"{stats.percentile(0.95):.2f}",
        f"{stats.percentile(0.99):.2f}",
        f"{max(stats.latencies_ms, default=0):.2f}",
    )
    return table


@app.command()
def simulate(
    seed: Annotated[int, typer.Option(help="the run's seed; the same seed replays it")] = 1,
    persons: Annotated[int, typer.Option(min=1, max=1_000_000, help="insured persons")] = 2000,
    days: Annotated[int, typer.Option(min=1, max=3650, help="simulated days")] = 14,
) -> None:
    """Run the pure clearing core against a simulated city: many terminals, cards and
    window operations, a simulated clock across midnights and holidays (from 2026-09-28,
    through National Day), redelivered commands and early reversals. Invariants are
    checked after every step; a violation prints the seed that replays it. No servers."""
    from clearing.simulator import SimulationFailure, Simulator, Summary
    from medclear.infra.policy import load_policy

    policy = load_policy(get_settings())
    with _progress() as progress:
        task = progress.add_task("simulating days", total=days, info="")

        def on_day(day: int, summary: Summary) -> None:
            progress.update(task, completed=day, info=f"{summary.decisions:,} decisions")

        try:
            summary = Simulator(policy, seed, persons, days, on_day).run()
        except SimulationFailure as exc:
            raise fail(str(exc)) from exc
    table = Table(title=f"simulation: seed {seed}, {persons:,} persons, {days} days")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in [
        ("decisions", f"{summary.decisions:,}"),
        ("events", f"{summary.events:,}"),
        ("redelivered commands (no effect)", f"{summary.redeliveries:,}"),
        ("paid from accounts", format_yuan(summary.approved_fen)),
        ("returned by reversals and refunds", format_yuan(summary.returned_fen)),
        ("credited", format_yuan(summary.credited_fen)),
        ("core decisions/s (one core)", f"{summary.decisions_per_s:,.0f}"),
        ("wall time", f"{summary.wall_seconds:.1f} s"),
    ]:
        table.add_row(name, value)
    console.print(table)
    console.print(result_codes_table(summary.results, "count"))
    console.print("[green]all invariants held after every step[/]")


@bench_app.command("swipes")
def bench_swipes(
    count: Annotated[int, typer.Option(min=1, max=1_000_000, help="swipes to send")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="in flight; 1: sequential")] = 1,
    persons: Annotated[int, typer.Option(help="the seeded city's size (see `seed`)")] = 1000,
    seed: Annotated[int, typer.Option(help="the seeded city's seed")] = 2026,
) -> None:
    """Swipe seeded cards through the running stack; print p50/p95/p99/max and rate.

    Run `medclear seed` with the same --persons/--seed first. Declines (daily pharmacy
    limit, balance, green/red cards) are real decisions and count like approvals.
    """
    stats = _swipe_run(persons, seed, count, concurrency, "swiping")
    console.print(_stats_table(f"{count:,} swipes, {concurrency} in flight", stats))
    console.print(result_codes_table(stats.results))


bench_app.command("pipeline")(bench_pipeline.command)
bench_app.command("state")(bench_state.command)
bench_app.command("fuzz")(bench_fuzz.command)


def _by_process_table(title: str, used: dict[str, dict[str, float]], digits: int) -> Table:
    """One row per process, one column per measurement, busiest first, then the total."""
    table = Table(title=title)
    table.add_column("process")
    columns = list(used)
    for column in columns:
        table.add_column(column, justify="right")
    busiest = {n: max(f.get(n, 0.0) for f in used.values()) for f in used.values() for n in f}
    names = sorted(busiest, key=lambda n: -busiest[n])
    for name in names:
        table.add_row(name, *(f"{used[c].get(name, 0.0):.{digits}f}" for c in columns))
    totals = [sum(used[c].values()) for c in columns]
    table.add_row("[bold]total[/]", *(f"[bold]{t:.{digits}f}[/]" for t in totals))
    return table


def _cpu_table(cpu_ms: dict[str, dict[str, float]]) -> Table:
    """CPU milliseconds per swipe of each process; the total bounds the rate the
    machine's cores allow."""
    table = _by_process_table("CPU ms per swipe, by process (user + system)", cpu_ms, 2)
    cores = os.cpu_count() or 1
    totals = [sum(figures.values()) for figures in cpu_ms.values()]
    table.add_row(f"swipes/s its {cores} cores allow",
                  *(f"{cores * 1000 / t:,.0f}" if t else "—" for t in totals))  # fmt: skip
    return table


IDLE_SETTLE_S = 2.0  # after READY, before the idle measurement: start-up work ends


def _idle_cpu(settings: Settings, seconds: float) -> dict[str, float]:
    """Each process's CPU over `seconds` of an idle stack, in % of one core."""
    from medclear import stack

    time.sleep(IDLE_SETTLE_S)
    processes = [(c.name, c.pid) for c in stack.status(settings)]
    before = cpu_use.snapshot(processes)
    with _progress() as progress:
        task = progress.add_task("idle stack, CPU", total=seconds, info="")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            progress.update(task, completed=seconds - max(0.0, deadline - time.monotonic()))
    used = cpu_use.per_unit_ms(before, cpu_use.snapshot(processes), 1)
    used.pop(cpu_use.LOAD_GENERATOR, None)
    return {name: ms / 1000 / seconds * 100 for name, ms in used.items()}


def _idle_table(idle: dict[str, dict[str, float]], seconds: float) -> Table:
    return _by_process_table(f"idle stack: CPU in % of one core, over {seconds:g} s", idle, 1)


@bench_app.command("run")
def bench_run(
    persons: Annotated[int, typer.Option(min=1, help="persons to seed")] = 1000,
    swipes: Annotated[int, typer.Option(min=1, help="swipes per measurement")] = 1000,
    concurrency: Annotated[str, typer.Option(help="comma-separated in-flight levels")] = "1,8",
    security: Annotated[
        str,
        typer.Option(
            help="terminal security: off, on, or both (the "
            "HSM's added latency, measured in one run)"
        ),
    ] = "both",
    idle_seconds: Annotated[
        float,
        typer.Option(min=0, help="seconds of idle-stack CPU measured before seeding (0: skip)"),
    ] = 10.0,
) -> None:
    """The swipe benchmark: for each terminal-security setting, start the stack (timed to
    ready), measure each process's CPU while the stack is idle, seed, swipe at each
    concurrency level (1 = sequential), then stop the stack and wipe it, so every
    measurement starts empty (the embedded broker rewrites its whole data file twice a
    second: old data skews figures). Prints the latencies, the CPU milliseconds each
    process spent per swipe, and the idle CPU; asserts nothing."""
    from medclear import stack

    modes = {"off": [False], "on": [True], "both": [False, True]}.get(security)
    if modes is None:
        raise fail("--security is off, on or both")
    table = Table(title=f"medclear bench run: {persons:,} persons, {swipes:,} swipes per row")
    for column in (
        "terminal security",
        "in flight",
        "rate /s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
    ):
        table.add_column(column, justify="right")
    sequential: dict[bool, LatencyStats] = {}
    notes: list[str] = []
    cpu_ms: dict[str, dict[str, float]] = {}  # column → process → CPU ms per swipe
    idle: dict[str, dict[str, float]] = {}  # column → process → % of one core, idle stack
    for secure in modes:
        settings = get_settings().model_copy(update={"terminal_security": secure})
        started = time.perf_counter()
        try:
            stack.up(settings, console)
        except stack.StackError as exc:
            raise fail(str(exc)) from exc
        ready_s = time.perf_counter() - started
        try:
            if idle_seconds:
                idle[f"security {'on' if secure else 'off'}"] = _idle_cpu(settings, idle_seconds)
            seed_s = _seed(persons, 2026, 32, settings)
            for level in (int(x) for x in concurrency.split(",")):
                processes = [(c.name, c.pid) for c in stack.status(settings)]
                before = cpu_use.snapshot(processes)
                stats = _swipe_run(persons, 2026, swipes, level, f"{level} in flight", settings)
                column = f"security {'on' if secure else 'off'}, {level} in flight"
                cpu_ms[column] = cpu_use.per_unit_ms(before, cpu_use.snapshot(processes), swipes)
                if level == 1:
                    sequential[secure] = stats
                table.add_row("on (MAC + PIN via HSM)" if secure else "off", str(level),
                              f"{stats.rate_per_s:,.0f}", f"{stats.percentile(0.5):.2f}",
                              f"{stats.percentile(0.95):.2f}", f"{stats.percentile(0.99):.2f}",
                              f"{max(stats.latencies_ms, default=0):.2f}")  # fmt: skip
        finally:
            stack.down(settings, console, wipe=True)
        notes.append(
            f"security {'on' if secure else 'off'}: up ready in {ready_s:.1f} s, "
            f"seeding {persons:,} persons {seed_s:.1f} s"
        )
    console.print(table)
    console.print(_cpu_table(cpu_ms))
    if idle:
        console.print(_idle_table(idle, idle_seconds))
    for note in notes:
        console.print(note)
    if len(sequential) == 2:
        added_p50 = sequential[True].percentile(0.5) - sequential[False].percentile(0.5)
        added_p99 = sequential[True].percentile(0.99) - sequential[False].percentile(0.99)
        console.print(
            f"HSM checks add to a sequential swipe: p50 {added_p50:+.2f} ms, "
            f"p99 {added_p99:+.2f} ms"
        )


@app.command()
def demo(
    persons: Annotated[int, typer.Option(min=10, help="persons in the city")] = 100_000,
    minutes: Annotated[float, typer.Option(min=0.2, help="minutes of traffic")] = 3.0,
    concurrency: Annotated[int, typer.Option(min=1, max=512, help="counters busy at once")] = 32,
    stop: Annotated[bool, typer.Option(help="stop the stack at the end (default: leave it)")] = (
        False
    ),
    agents: Annotated[
        bool,
        typer.Option(help="instead: swipe through the reader agent and virtual cards (pcscd)"),
    ] = False,
    swipes: Annotated[int, typer.Option(min=1, help="--agents: swipes through the agent")] = 400,
) -> None:
    """The main job: start the whole stack, seed a city, run a few minutes of a day at its
    counters — swipes (some with a wrong PIN), reversals, refunds, loss reports with a
    thief trying the card, releases, pre-losses lapsing, a pharmacy limit reached — with a
    live panel, then a summary and the reconciliation of the day. The stack is left
    running (Prometheus, reports) unless --stop; `medclear down` stops it."""
    from medclear import stack

    settings = get_settings()
    if settings.pre_loss_policy_file is None:  # the demo district's pre-loss lasts 90 s
        demo_policy = Path(__file__).resolve().parents[1] / "data" / "pre_loss_policy_demo.csv"
        settings = settings.model_copy(update={"pre_loss_policy_file": demo_policy})
    started = time.perf_counter()
    try:
        stack.up(settings, console)
    except stack.StackError as exc:
        raise fail(str(exc)) from exc
    ready_s = time.perf_counter() - started
    from medclear.sim.traffic import SeedError

    try:
        try:
            seed_s = _seed(persons, 2026, 64, settings, district=True)
        except SeedError as exc:
            raise fail(f"seeding: {exc}") from exc
        if agents:  # one agent, one card at a time: sequential, card read included
            from reader_agent import cli as agent_cli

            by_agent = agent_cli.run_agent_traffic(
                agent_cli.stack_access(settings), persons, 2026, swipes, "POS traffic (agent)"
            )
            console.print(agent_cli.agent_stats_table("POS traffic through the agent", by_agent))
            console.print(result_codes_table(by_agent.results))
        else:
            _demo_traffic(settings, persons, minutes, concurrency)
        console.print(
            f"stack ready in {ready_s:.1f} s; seeded {persons:,} persons in {seed_s:.1f} s"
        )
    finally:
        if not stop:
            endpoints = stack.load_endpoints(settings)
            console.print(
                f"[bold]stack left running[/]: Prometheus {endpoints.prometheus} · "
                f"gateway {endpoints.gateway} · registry {endpoints.registry} · reports in "
                f"{settings.state_dir / 'reports'} · logs in {settings.state_dir / 'logs'}. "
                "Stop it with `medclear down` (`--wipe` also deletes the data)."
            )
        else:
            stack.down(settings, console)
