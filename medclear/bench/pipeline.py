"""`medclear bench pipeline`: throughput and latency of swipes through the whole stack,
against the null pipeline, and how they scale — one command, one table, one doc section.

For the base configuration (1 worker, 6 command partitions) it starts the stack, seeds a
city, and measures: the closed-loop maximum (N swipes in flight, as fast as replies
come), then open loop at fixed rates (latency from the moment each swipe was due). It
then restarts the worker as an echo worker (MEDCLEAR_WORKER_MODE=echo: same gRPC, same
topics, same reply path, no state, no core, no events) and measures the same again: the
null pipeline. Then the scaling runs (2 workers; 24 partitions), each on a fresh stack.
The results replace the generated section of docs/PERFORMANCE.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medclear import stack
from medclear.bench.fresh import own_state_dir
from medclear.bench.perfdoc import DOC, replace_section
from medclear.bench.procstat import describe_machine
from medclear.infra.policy import load_institutions
from medclear.infra.settings import Settings, get_settings
from medclear.infra.stack_state import client_pki_dir
from medclear.infra.terminals import keyring_for
from medclear.sim import city, load, traffic
from medclear.sim.traffic import LatencyStats

console = Console()
BEGIN, END = "<!-- bench:pipeline:begin -->", "<!-- bench:pipeline:end -->"
SEED = 2026


@dataclass(frozen=True)
class Row:
    config: str
    pipeline: str  # "full" | "null"
    load: str  # "closed 64" | "open 1000/s"
    stats: LatencyStats

    def cells(self) -> list[str]:
        s = self.stats
        sent = s.count + s.results.get("NOT_SENT_CLIENT_OVERLOAD", 0)
        errors = sum(n for code, n in s.results.items() if code.startswith(("RPC_", "NOT_SENT")))
        return [
            self.config,
            self.pipeline,
            self.load,
            f"{sent:,}",
            f"{s.rate_per_s:,.0f}",
            f"{s.percentile(0.5):.1f}",
            f"{s.percentile(0.95):.1f}",
            f"{s.percentile(0.99):.1f}",
            f"{max(s.latencies_ms, default=0):.1f}",
            f"{errors:,}",
        ]


COLUMNS = (
    "config",
    "pipeline",
    "load",
    "swipes",
    "done /s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "errors",
)


def _measure(
    settings: Settings,
    persons: int,
    plan_size: int,
    label: str,
    *,
    closed: int = 0,
    rate: float = 0.0,
) -> LatencyStats:
    residents = city.residents(persons, SEED)
    institutions = list(load_institutions(settings.institutions_file).values())
    plan = traffic.plan_swipes(residents, institutions, plan_size, SEED, time.time_ns() // 1000)
    keyring = keyring_for(settings, traffic.terminal_ids(plan))
    gateway = stack.load_endpoints(settings).gateway
    stats = LatencyStats()
    with load.progress_bar() as progress:
        task = progress.add_task(label, total=plan_size, info="")

        def done() -> None:
            info = f"{stats.rate_per_s:,.0f}/s  p99 {stats.percentile(0.99):.1f} ms"
            progress.update(task, advance=1, info=info)

        if closed:
            run = traffic.run_swipes(
                gateway, plan, closed, stats, done, keyring, client_pki_dir(settings)
            )
        else:
            run = traffic.run_open_loop(
                gateway, plan, rate, stats, done, keyring, client_pki_dir(settings)
            )
        asyncio.run(run)
    return stats


def _series(
    settings: Settings,
    config: str,
    pipeline: str,
    persons: int,
    swipes: int,
    closed: int,
    rates: list[int],
    seconds: float,
) -> list[Row]:
    rows = [
        Row(
            config,
            pipeline,
            f"closed {closed}",
            _measure(
                settings, persons, swipes, f"{config} {pipeline} closed {closed}", closed=closed
            ),
        )
    ]
    for rate in rates:
        size = max(1, int(rate * seconds))
        label = f"open {rate:,}/s"
        rows.append(
            Row(
                config,
                pipeline,
                label,
                _measure(settings, persons, size, f"{config} {pipeline} {label}", rate=rate),
            )
        )
    return rows


def _workers(settings: Settings) -> list[str]:
    return [f"worker-{i}" for i in range(settings.workers)]


def _stack_run(
    base: Settings,
    config: str,
    persons: int,
    swipes: int,
    closed: int,
    rates: list[int],
    seconds: float,
    null: bool,
) -> list[Row]:
    with own_state_dir(base, "pipeline") as settings:
        return _stack_series(settings, config, persons, swipes, closed, rates, seconds, null)


def _stack_series(
    settings: Settings,
    config: str,
    persons: int,
    swipes: int,
    closed: int,
    rates: list[int],
    seconds: float,
    null: bool,
) -> list[Row]:
    stack.up(settings, console)
    try:
        load.seed_city(persons, SEED, 32, settings)
        rows = _series(settings, config, "full", persons, swipes, closed, rates, seconds)
        if null:
            for name in _workers(settings):
                stack.restart_component(settings, name, console, {"MEDCLEAR_WORKER_MODE": "echo"})
            rows += _series(settings, config, "null", persons, swipes, closed, rates, seconds)
            for name in _workers(settings):
                stack.restart_component(settings, name, console)
        return rows
    finally:
        stack.down(settings, console, wipe=True)


def _markdown(rows: list[Row], notes: list[str], command: str, machine: str) -> str:
    lines = [
        BEGIN,
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        f"Machine: {machine}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    lines += ["", *[f"- {note}" for note in notes], "", END]
    return "\n".join(lines)


def _write_doc(section: str) -> None:
    replace_section(DOC, BEGIN, END, section, "Full pipeline vs null pipeline (generated)")


def command(
    persons: Annotated[int, typer.Option(min=1, help="persons to seed")] = 1000,
    swipes: Annotated[int, typer.Option(min=1, help="swipes of the closed-loop run")] = 3000,
    closed: Annotated[int, typer.Option(min=1, max=4096, help="in flight, closed loop")] = 64,
    rates: Annotated[str, typer.Option(help="open-loop rates, swipes/s, comma-separated")] = (
        "500,1000,2000"
    ),
    seconds: Annotated[float, typer.Option(min=1, help="length of each open-loop run")] = 10,
    null: Annotated[bool, typer.Option(help="also measure the null pipeline")] = True,
    scaling: Annotated[bool, typer.Option(help="also 2 workers, and 24 partitions")] = True,
    write_doc: Annotated[bool, typer.Option(help="replace the section in PERFORMANCE.md")] = True,
) -> None:
    """Swipes through the full stack vs the null pipeline (echo worker), closed and open
    loop, and scaling (1 vs 2 workers, 6 vs 24 partitions). Terminal security off: this
    measures the pipeline (`medclear bench run --security both` measures the HSM)."""
    levels = [int(r) for r in rates.split(",") if r.strip()]
    base = get_settings().model_copy(update={"terminal_security": False})
    machine = describe_machine()
    rows = _stack_run(
        base, "1 worker, 6 partitions", persons, swipes, closed, levels, seconds, null
    )
    if scaling:
        for workers, partitions in ((2, 6), (1, 24)):
            settings = base.model_copy(
                update={"workers": workers, "command_partitions": partitions}
            )
            config = f"{workers} worker{'s' if workers > 1 else ''}, {partitions} partitions"
            rows += _stack_run(settings, config, persons, swipes, closed, [], seconds, False)
    table = Table(title="medclear bench pipeline")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row.cells())
    console.print(table)
    notes: list[str] = []
    full = {r.load: r for r in rows if r.pipeline == "full" and r.config.startswith("1 worker, 6")}
    for r in rows:
        if r.pipeline == "null" and r.load in full:
            f = full[r.load]
            ratio = f.stats.rate_per_s / r.stats.rate_per_s if r.stats.rate_per_s else 0.0
            notes.append(
                f"{r.load}: full/null throughput {ratio:.2f} "
                f"(p99 {f.stats.percentile(0.99):.1f} vs "
                f"{r.stats.percentile(0.99):.1f} ms)"
            )
    for note in notes:
        console.print(note)
    if write_doc:
        argv = "medclear bench pipeline " + " ".join(
            f"--{k} {v}"
            for k, v in (
                ("persons", persons),
                ("swipes", swipes),
                ("closed", closed),
                ("rates", rates),
                ("seconds", seconds),
            )
        )
        _write_doc(_markdown(rows, notes, argv, machine))
        console.print(f"wrote the results into {DOC}")
