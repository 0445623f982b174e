"""`medclear bench`: benchmarks of the running stack. Each prints figures (tables) and
asserts nothing: `swipes`, `run` and `startup` (the CLI's own start-up, each command line
in a fresh interpreter) here; `pipeline`, `state`, `fuzz`, `codec` and `seed` in
medclear/bench/.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medclear import stack
from medclear.bench import codec, cpu_use, fuzz, pipeline, seeding, state, transactions
from medclear.bench.fresh import own_state_dir
from medclear.cli.main import COMMANDS
from medclear.cli.support import fail
from medclear.cli.tables import result_codes_table
from medclear.infra.progress import progress_bar
from medclear.infra.settings import Settings, get_settings
from medclear.sim import load
from medclear.sim.traffic import LatencyStats

bench_app = typer.Typer(
    help="Measure the running stack (prints figures, asserts nothing).", no_args_is_help=True
)
bench_app.command("pipeline")(pipeline.command)
bench_app.command("state")(state.command)
bench_app.command("fuzz")(fuzz.command)
bench_app.command("codec")(codec.command)
bench_app.command("seed")(seeding.command)
bench_app.command("transactions")(transactions.command)
console = Console()
JsonOpt = Annotated[bool, typer.Option("--json", help="print the figures as JSON")]


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
    stats = load.swipe_run(persons, seed, count, concurrency, "swiping")
    console.print(_stats_table(f"{count:,} swipes, {concurrency} in flight", stats))
    console.print(result_codes_table(stats.results))


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
    table.add_row(
        f"swipes/s its {cores} cores allow",
        *(f"{cores * 1000 / t:,.0f}" if t else "—" for t in totals),
    )
    return table


IDLE_SETTLE_S = 2.0  # after READY, before the idle measurement: start-up work ends


def _idle_cpu(settings: Settings, seconds: float, out: Console | None = None) -> dict[str, float]:
    """Each process's CPU over `seconds` of an idle stack, in % of one core (progress on
    `out`, stdout by default)."""
    time.sleep(IDLE_SETTLE_S)
    processes = [(c.name, c.pid) for c in stack.status(settings)]
    before = cpu_use.snapshot(processes)
    with progress_bar(out or console) as progress:
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


@bench_app.command("idle")
def bench_idle(
    seconds: Annotated[float, typer.Option(min=5, max=3600, help="how long to watch")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """CPU of the running stack while nothing happens: each process and the whole, in %
    of one core (issue 18's target: the whole idle stack at most 30 % of one core)."""
    idle = _idle_cpu(get_settings(), seconds, Console(stderr=True) if as_json else None)
    if as_json:
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "percent_of_one_core": idle,
                    "whole_stack": sum(idle.values()),
                },
                indent=2,
            )
        )
        return
    console.print(_idle_table({"idle": idle}, seconds))
    console.print(f"whole stack: {sum(idle.values()):.1f} % of one core")


SEED = 2026  # the seeded city's seed in `bench run`
RUN_COLUMNS = ("terminal security", "in flight", "rate /s", "p50 ms", "p95 ms", "p99 ms", "max ms")


@dataclass
class _RunFigures:
    """What `bench run` gathers over its stacks, printed at the end."""

    table: Table  # one row a (security, in-flight level)
    sequential: dict[bool, LatencyStats] = field(default_factory=dict)  # security → 1 in flight
    notes: list[str] = field(default_factory=list)
    # column → process → CPU ms per swipe
    cpu_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    # column → process → % of one core, idle stack
    idle: dict[str, dict[str, float]] = field(default_factory=dict)


def _swipe_level(
    settings: Settings, secure: bool, level: int, persons: int, swipes: int, figures: _RunFigures
) -> None:
    """`swipes` swipes at `level` in flight on the running stack: a row of the table, and
    each process's CPU ms per swipe."""
    processes = [(c.name, c.pid) for c in stack.status(settings)]
    before = cpu_use.snapshot(processes)
    stats = load.swipe_run(persons, SEED, swipes, level, f"{level} in flight", settings)
    column = f"security {'on' if secure else 'off'}, {level} in flight"
    figures.cpu_ms[column] = cpu_use.per_unit_ms(before, cpu_use.snapshot(processes), swipes)
    if level == 1:
        figures.sequential[secure] = stats
    figures.table.add_row(
        "on (MAC + PIN via HSM)" if secure else "off",
        str(level),
        f"{stats.rate_per_s:,.0f}",
        f"{stats.percentile(0.5):.2f}",
        f"{stats.percentile(0.95):.2f}",
        f"{stats.percentile(0.99):.2f}",
        f"{max(stats.latencies_ms, default=0):.2f}",
    )


def _run_stack(
    secure: bool,
    persons: int,
    swipes: int,
    concurrency: str,
    idle_seconds: float,
    figures: _RunFigures,
) -> None:
    """One terminal-security setting: start the stack (timed to ready), measure it idle,
    seed, swipe at each concurrency level, then stop the stack and wipe it."""
    with own_state_dir(get_settings(), "run") as settings:
        _run_one_stack(
            settings.model_copy(update={"terminal_security": secure}),
            persons,
            swipes,
            concurrency,
            idle_seconds,
            figures,
        )


def _run_one_stack(
    settings: Settings,
    persons: int,
    swipes: int,
    concurrency: str,
    idle_seconds: float,
    figures: _RunFigures,
) -> None:
    secure = settings.terminal_security
    started = time.perf_counter()
    stack.up(settings, console)
    ready_s = time.perf_counter() - started
    try:
        if idle_seconds:
            label = f"security {'on' if secure else 'off'}"
            figures.idle[label] = _idle_cpu(settings, idle_seconds)
        seed_s = load.seed_city(persons, SEED, 32, settings)
        for level in (int(x) for x in concurrency.split(",")):
            _swipe_level(settings, secure, level, persons, swipes, figures)
    finally:
        stack.down(settings, console, wipe=True)
    figures.notes.append(
        f"security {'on' if secure else 'off'}: up ready in {ready_s:.1f} s, "
        f"seeding {persons:,} persons {seed_s:.1f} s"
    )


def _print_run(figures: _RunFigures, idle_seconds: float) -> None:
    """The latencies, CPU per swipe, idle CPU, notes, and what the HSM checks add."""
    console.print(figures.table)
    console.print(_cpu_table(figures.cpu_ms))
    if figures.idle:
        console.print(_idle_table(figures.idle, idle_seconds))
    for note in figures.notes:
        console.print(note)
    sequential = figures.sequential
    if len(sequential) == 2:
        added_p50 = sequential[True].percentile(0.5) - sequential[False].percentile(0.5)
        added_p99 = sequential[True].percentile(0.99) - sequential[False].percentile(0.99)
        console.print(
            f"HSM checks add to a sequential swipe: p50 {added_p50:+.2f} ms, "
            f"p99 {added_p99:+.2f} ms"
        )


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
    modes = {"off": [False], "on": [True], "both": [False, True]}.get(security)
    if modes is None:
        raise fail("--security is off, on or both")
    table = Table(title=f"medclear bench run: {persons:,} persons, {swipes:,} swipes per row")
    for column in RUN_COLUMNS:
        table.add_column(column, justify="right")
    figures = _RunFigures(table)
    for secure in modes:
        _run_stack(secure, persons, swipes, concurrency, idle_seconds, figures)
    _print_run(figures, idle_seconds)


# ---------------------------------------------------------------------------- start-up

HELP_TARGET_S = 0.5
COMMAND_TARGET_S = 1.0
RUNS_DEFAULT = 5


def time_command(args: list[str], runs: int) -> float:
    """Median wall seconds of `medclear <args>` in a fresh interpreter."""
    taken = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "medclear", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        taken.append(time.perf_counter() - started)
    return statistics.median(taken)


@bench_app.command("startup")
def bench_startup(
    runs: Annotated[int, typer.Option(min=1, max=50, help="runs per command line")] = RUNS_DEFAULT,
    as_json: JsonOpt = False,
) -> None:
    """CLI start-up: `medclear --help` and each command's `--help`, median of fresh runs."""
    table = Table(title=f"CLI start-up, median of {runs} runs (fresh interpreter, --help)")
    for column in ("command line", "seconds", "target", "met"):
        table.add_column(column, justify="left" if column == "command line" else "right")
    lines = [(["--help"], HELP_TARGET_S)] + [
        ([name, "--help"], COMMAND_TARGET_S) for name in COMMANDS
    ]
    figures = []
    for args, target in lines:
        seconds = time_command(args, runs)
        figures.append(
            {
                "command": "medclear " + " ".join(args),
                "seconds": round(seconds, 3),
                "target_s": target,
                "met": seconds <= target,
            }
        )
        met = "[green]yes[/]" if seconds <= target else "[red]no[/]"
        table.add_row("medclear " + " ".join(args), f"{seconds:.2f}", f"≤ {target:g}", met)
    if as_json:
        print(json.dumps({"runs": runs, "commands": figures}, indent=2))
    else:
        console.print(table)
