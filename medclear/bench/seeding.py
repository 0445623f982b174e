"""`medclear bench seed`: issue 18's seeding and stop figures, on a fresh stack of its own
(a temporary state directory, so a stack of yours is left alone): the time to enrol a
city through the registry (`medclear seed`'s path), each process's CPU milliseconds per
enrolled person, the broker's data on disk, then how long `down` takes and whether it had
to kill anything. The stack is wiped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medclear import stack
from medclear.bench import cpu_use
from medclear.bench.fresh import own_state_dir
from medclear.bench.procstat import human, proc_memory, tree_bytes
from medclear.infra import topics
from medclear.infra.kafka_admin import wait_caught_up
from medclear.infra.settings import Settings, get_settings
from medclear.sim import load
from stream_jobs import abnormal_job, clickhouse_sink, pre_loss_timer, settlement, sms, worker

SEED = 2026
SEEDING_TARGET_S = 60.0  # issue 18: 100,000 persons in at most 60 s
DOWN_TARGET_S = 10.0  # issue 18: `down` in at most 10 s, nothing killed
BROKER_RSS_TARGET_BYTES = 1 << 30  # issue 24: a broker node at most 1 GiB resident
console = Console(stderr=True)  # progress and the stack's own lines; figures on stdout
# Every consumer of what enrolment writes: the CPU is read once they have all committed
# the records on their topics (each waits for the stage before it), not when the seeder
# has its last reply.
STAGES = (
    (worker.APP_ID, topics.COMMANDS.name),
    (clickhouse_sink.GROUP_ID, topics.EVENTS.name),
    (sms.APP_ID, topics.EVENTS.name),
    (abnormal_job.APP_ID, topics.EVENTS.name),
    (pre_loss_timer.APP_ID, topics.EVENTS.name),
    *settlement.STAGES,
)


@dataclass
class SeedFigures:
    persons: int
    up_s: float = 0.0
    seed_s: float = 0.0
    behind: dict[str, int] = field(default_factory=dict)  # consumers not caught up in time
    broker_disk_bytes: int = 0
    # the largest broker node's resident memory: right after `up`, and once seeded
    broker_rss_idle_bytes: int = 0
    broker_rss_bytes: int = 0
    broker_rss_peak_bytes: int = 0
    down_s: float = 0.0
    killed: list[str] = field(default_factory=list)
    cpu_ms_per_person: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.persons / self.seed_s if self.seed_s else 0.0


def measure(persons: int, batch: int, concurrency: int) -> SeedFigures:
    """up, seed, measure, down, wipe."""
    with own_state_dir(get_settings(), "seed") as settings:
        return _measure(settings, persons, batch, concurrency)


def _measure(settings: Settings, persons: int, batch: int, concurrency: int) -> SeedFigures:
    figures = SeedFigures(persons)
    started = time.perf_counter()
    endpoints = stack.up(settings, console)
    figures.up_s = time.perf_counter() - started
    try:
        processes = [(c.name, c.pid) for c in stack.status(settings)]
        figures.broker_rss_idle_bytes = _broker_rss(processes)[0]
        before = cpu_use.snapshot(processes)
        figures.seed_s = load.seed_city(persons, SEED, concurrency, settings, batch=batch)
        figures.behind = asyncio.run(wait_caught_up(endpoints.kafka(), STAGES))
        figures.cpu_ms_per_person = cpu_use.per_unit_ms(
            before, cpu_use.snapshot(processes), persons
        )
        figures.broker_disk_bytes = tree_bytes(settings.state_dir / "data" / "kafka")
        figures.broker_rss_bytes, figures.broker_rss_peak_bytes = _broker_rss(processes)
    except BaseException:  # failed before the measured stop: stop the stack anyway
        stack.down(settings, console)
        raise
    started = time.perf_counter()
    figures.killed = stack.down(settings, console)
    figures.down_s = time.perf_counter() - started
    return figures


def _broker_rss(processes: list[tuple[str, int | None]]) -> tuple[int, int]:
    """(RSS, peak RSS) of the broker node that holds the most."""
    found = [proc_memory(pid) for name, pid in processes if name.startswith("broker")]
    return max(found, default=(0, 0))


def _print(f: SeedFigures) -> None:
    table = Table(title=f"medclear bench seed: {f.persons:,} persons on a fresh stack")
    for column in ("what", "figure", "target", "met"):
        table.add_column(column, justify="left" if column == "what" else "right")
    scaled = f.seed_s * 100_000 / f.persons
    table.add_row("stack ready (up)", f"{f.up_s:.1f} s", "", "")
    table.add_row(
        "seeding",
        f"{f.seed_s:.1f} s ({f.rate:,.0f} persons/s)",
        f"100,000 in ≤ {SEEDING_TARGET_S:g} s (here: {scaled:.0f} s)",
        "yes" if scaled <= SEEDING_TARGET_S else "no",
    )
    table.add_row("broker's data on disk", human(f.broker_disk_bytes), "", "")
    rss_met = f.broker_rss_peak_bytes <= BROKER_RSS_TARGET_BYTES
    table.add_row(
        "broker's memory (RSS)",
        f"idle {human(f.broker_rss_idle_bytes)}, seeded "
        f"{human(f.broker_rss_bytes)} (peak {human(f.broker_rss_peak_bytes)})",
        f"≤ {human(BROKER_RSS_TARGET_BYTES)}",
        "yes" if rss_met else "no",
    )
    table.add_row(
        "down",
        f"{f.down_s:.1f} s, killed: {', '.join(f.killed) or 'nothing'}",
        f"≤ {DOWN_TARGET_S:g} s, nothing killed",
        "yes" if f.down_s <= DOWN_TARGET_S and not f.killed else "no",
    )
    Console().print(table)
    cpu = Table(title="CPU per enrolled person, by process")
    cpu.add_column("process")
    cpu.add_column("ms", justify="right")
    for name, ms in sorted(f.cpu_ms_per_person.items(), key=lambda item: -item[1]):
        cpu.add_row(name, f"{ms:.3f}")
    cpu.add_row("all", f"{sum(f.cpu_ms_per_person.values()):.3f}")
    Console().print(cpu)
    for group, lag in f.behind.items():
        Console().print(f"{group} was still {lag:,} records behind: its CPU is not all in")


def command(
    persons: Annotated[
        int, typer.Option(min=100, max=10_000_000, help="persons to enrol")
    ] = 100_000,
    batch: Annotated[
        int, typer.Option(min=1, max=1000, help="persons per EnrolPersons call")
    ] = load.SEED_BATCH,
    concurrency: Annotated[int, typer.Option(min=1, max=512, help="calls in flight")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """Issue 18's seeding and stop figures on a fresh stack of its own (a temporary state
    directory): the time to enrol --persons through the registry, each process's CPU per
    person, the broker's data on disk, then `down` (timed, and whether anything had to be
    killed); the stack is wiped at the end."""
    with contextlib.redirect_stdout(sys.stderr):  # the stack's and the seeder's lines
        figures = measure(persons, batch, concurrency)
    if as_json:
        print(json.dumps({**asdict(figures), "persons_per_s": figures.rate}, indent=2))
        return
    _print(figures)
