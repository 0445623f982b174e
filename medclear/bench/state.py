"""`medclear bench state`: a city of N cardholders in one clearing worker — how big its
changelog is, how long the worker takes to rebuild its stores from it with no local
files (a cold rebuild: a new machine, a lost disk), how long a restart that keeps them
takes (warm), and how much memory it holds meanwhile.

The city and its loading are in `medclear.bench.city`: the persons are written onto the
changelog and the card index as enrolment would have left them (or, with `--direct`,
straight into the worker's stores), not enrolled one command at a time.

Then: delete the worker's stores and restart it (a cold rebuild from the changelog, timed
to its READY gauge), restart it once more (the local files are kept: only the changelog's
tail is read), restart the gateway
(it reads the whole card index at start), read RSS and peak RSS from /proc, and decide a
few swipes of loaded cardholders through the gateway to show the state is live. This
module holds the runs, their figures (`Run`), the generated section of
docs/PERFORMANCE.md, and the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from clearing.codes import InsuranceCategory
from medclear import stack
from medclear.bench.city import (
    CHANGELOG_TOPIC,
    SEED,
    VERIFY_EVERY,
    City,
    Holder,
    LoadResult,
    holder,
    index_cards,
    load,
    seed_store,
    topic_records,
)
from medclear.bench.perfdoc import DOC, replace_section
from medclear.bench.procstat import describe_machine, human, proc_cpu_s, proc_memory, tree_bytes
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.policy import load_institutions, load_policy
from medclear.infra.settings import Settings, get_settings
from medclear.infra.tokens import load_redaction
from medclear.sim import traffic
from medclear.sim.city import Resident
from stream_jobs import worker

console = Console()
BEGIN, END = "<!-- bench:state:begin -->", "<!-- bench:state:end -->"
GIB = 1024**3


@dataclass
class Run:
    store: str
    persons: int
    load: LoadResult = dataclasses.field(default_factory=LoadResult)
    changelog_records: int = 0
    index_records: int = 0
    broker_disk: int = 0
    empty_start_s: float = 0.0  # the same worker's start at `up`, empty table: the baseline
    empty_rss: int = 0  # its RSS then
    empty_cpu_s: float = 0.0  # and the CPU seconds it had used
    recovery_cpu_s: float = 0.0  # CPU seconds of the restarted worker at READY
    recovery_s: float = 0.0  # worker restart: process start to READY (recovered)
    warm_recovery_s: float | None = None  # second restart (RocksDB keeps its files)
    worker_rss: int = 0
    worker_peak: int = 0
    warm_worker_rss: int | None = None
    store_disk: int = 0  # the worker's data directory (RocksDB files)
    broker_rss: int = 0
    broker_peak: int = 0
    gateway_ready_s: float = 0.0  # gateway restart: reads the card index
    gateway_rss: int = 0
    swipes: int = 0
    swipe_results: dict[str, int] = dataclasses.field(default_factory=dict)
    swipe_p50_ms: float = 0.0
    swipe_p99_ms: float = 0.0
    error: str = ""
    direct: bool = False  # seeded into the store (`seed_store`), not through the broker

    def cells(self) -> list[str]:
        rate = self.changelog_records / self.recovery_s if self.recovery_s else 0.0
        warm = f"{self.warm_recovery_s:.1f}" if self.warm_recovery_s is not None else "—"
        ok = self.swipe_results.get("OK", 0)
        return [
            f"{self.store} {DIRECT_LABEL}" if self.direct else self.store,
            f"{self.persons:,}",
            human(self.load.changelog_bytes),
            f"{self.changelog_records:,}",
            f"{self.load.seconds:.1f}",
            f"{self.empty_start_s:.1f}",
            f"{self.recovery_s:.1f}",
            f"{self.empty_cpu_s:.1f} / {self.recovery_cpu_s:.1f}",
            "—" if self.direct else f"{rate:,.0f}",
            warm,
            human(self.worker_rss),
            human(self.worker_peak),
            human(self.store_disk),
            human(self.broker_rss),
            human(self.broker_disk),
            f"{self.gateway_ready_s:.1f}",
            human(self.gateway_rss),
            f"{ok}/{self.swipes}",
            f"{self.swipe_p50_ms:.1f} / {self.swipe_p99_ms:.1f}",
            self.verdict(),
            self.at_target(),
            dt.date.today().isoformat(),
        ]

    def verdict(self) -> str:
        """The issue's target, said plainly: ≤ 2 GiB per worker, recovery ≤ 60 s."""
        if self.error:
            return f"failed: {self.error}".replace("|", "/")
        memory = "≤ 2 GiB" if self.worker_peak <= 2 * GIB else "**over 2 GiB**"
        recovery = "≤ 60 s" if self.recovery_s <= 60 else "**over 60 s**"
        if self.direct:
            return f"{memory}, restarts {recovery}; cold rebuild not measured"
        return f"{memory}, {recovery}"

    def at_target(self) -> str:
        """Linear extrapolation of peak RSS and recovery to TARGET_PERSONS (— when measured
        there); RSS scaled above the idle worker's, recovery above its start-up."""
        if self.direct:
            return "cold rebuild from the changelog: see below"
        if self.error or self.persons >= TARGET_PERSONS or not self.recovery_s:
            return "—"
        k = TARGET_PERSONS / self.persons
        start = self.empty_start_s or WORKER_START_S
        recovery = start + max(0.0, self.recovery_s - start) * k
        return f"RSS not linear; cold rebuild ~{recovery:,.0f} s"  # RocksDB memory is bounded


COLUMNS = (
    "store",
    "persons",
    "changelog bytes",
    "changelog records",
    "load s",
    "empty start s",
    "recovery s",
    "worker CPU s empty / recovered",
    "recovered rec/s",
    "warm restart s",
    "worker RSS",
    "worker peak RSS",
    "store on disk",
    "broker RSS",
    "broker on disk",
    "gateway ready s",
    "gateway RSS",
    "swipes OK",
    "swipe p50 / p99 ms",
    "target",
    "at 2.9 M (linear)",
    "date",
)
TARGET_PERSONS = 2_900_000
STORE = "rocksdb"  # the stream runtime keeps every table in RocksDB (stream_runtime)
DIRECT_LABEL = "(seeded into the store)"
IDLE_WORKER_RSS = 150 * 1024**2  # a worker with an empty table (measured: 130–160 MiB)
WORKER_START_S = 3.0  # process start to READY with an empty table (docs/PERFORMANCE.md)


# ------------------------------------------------------------------------------ the run


def _pid(settings: Settings, name: str) -> int | None:
    return next((c.pid for c in stack.status(settings) if c.name == name), None)


def _sample(persons: int, count: int, seed: int) -> list[Holder]:
    """Up to `count` employees (they have a balance), spread over the whole city."""
    chosen: list[Holder] = []
    stride = max(1, persons // max(1, count * 2))
    for i in range(persons - 1, -1, -stride):  # the last loaded first: recovered last
        h = holder(i, seed)
        if h.category == InsuranceCategory.EMPLOYEE:
            chosen.append(h)
        if len(chosen) >= count:
            break
    return chosen


def _swipes(settings: Settings, holders: Sequence[Holder], run: Run) -> None:
    residents = [
        Resident(h.ssn, h.name, h.category, h.phone, h.card_no, h.balance_fen) for h in holders
    ]
    pharmacies = list(load_institutions(settings.institutions_file).values())
    plan = traffic.plan_swipes(residents, pharmacies, len(residents), SEED, time.time_ns() // 1000)
    stats = traffic.LatencyStats()
    gateway = stack.load_endpoints(settings).gateway
    asyncio.run(traffic.run_swipes(gateway, plan, 1, stats, lambda: None, None, None))
    run.swipes = stats.count
    run.swipe_results = dict(stats.results)
    run.swipe_p50_ms = stats.percentile(0.5)
    run.swipe_p99_ms = stats.percentile(0.99)


@contextlib.contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar for loading `total` persons; yields `advance(n)`, which also shows
    the rate so far."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(description, total=total, info="")
        started = time.perf_counter()

        def advance(n: int) -> None:
            done = progress.tasks[0].completed + n
            rate = done / max(1e-9, time.perf_counter() - started)
            progress.update(task, advance=n, info=f"{rate:,.0f}/s")

        yield advance


def _empty_start(settings: Settings, run: Run) -> None:
    """The worker's own start at `up`: its time to READY, RSS and CPU seconds then."""
    empty = next(c for c in stack.status(settings) if c.name == "worker-0")
    run.empty_start_s = empty.ready_s or 0.0
    run.empty_rss, _ = proc_memory(empty.pid)
    run.empty_cpu_s = proc_cpu_s(empty.pid)


def _load_onto_broker(
    settings: Settings, kafka: KafkaAccess, persons: int, compression: str | None, run: Run
) -> City:
    """Write the city onto the changelog and the card index (`load`), and count what the
    broker then holds; the city, for the swipes."""
    partitions, _ = asyncio.run(topic_records(kafka, CHANGELOG_TOPIC))
    if partitions != settings.command_partitions:
        raise stack.StackError(
            f"{CHANGELOG_TOPIC} has {partitions} partitions, expected {settings.command_partitions}"
        )
    city = City(load_policy(settings), int(time.time() * 1000))
    with _progress("loading persons", persons) as advance:
        run.load = asyncio.run(
            load(
                kafka,
                city,
                persons,
                partitions,
                load_redaction(settings),
                compression,
                advance,
                topics.CARD_INDEX.name,
            )
        )
    console.print(
        f"  loaded {persons:,} persons in {run.load.seconds:.1f} s "
        f"({persons / run.load.seconds:,.0f}/s; {run.load.verified:,} checked "
        f"byte for byte against core.handle)"
    )
    _, run.changelog_records = asyncio.run(topic_records(kafka, CHANGELOG_TOPIC))
    _, run.index_records = asyncio.run(topic_records(kafka, topics.CARD_INDEX.name))
    return city


def _cold_then_warm_restart(settings: Settings, state_dir: Path, run: Run) -> None:
    """Restart worker-0 with its stores deleted (a cold rebuild from the changelog), then
    once more keeping them (warm); the worker's memory, CPU and disk meanwhile."""
    t0 = time.monotonic()
    status = stack.restart_component(  # a cold rebuild: no local files
        settings,
        "worker-0",
        console,
        while_stopped=lambda: shutil.rmtree(worker.data_dir(settings, 0), ignore_errors=True),
    )
    run.recovery_s = status.ready_s if status.ready_s is not None else time.monotonic() - t0
    run.worker_rss, run.worker_peak = proc_memory(status.pid)
    run.recovery_cpu_s = proc_cpu_s(status.pid)
    status = stack.restart_component(settings, "worker-0", console)
    run.warm_recovery_s = status.ready_s
    run.warm_worker_rss, peak = proc_memory(status.pid)
    run.worker_peak = max(run.worker_peak, peak)
    run.store_disk = tree_bytes(state_dir / "data" / "worker-0")


def _gateway_and_swipes(
    settings: Settings, state_dir: Path, holders: Sequence[Holder], run: Run
) -> None:
    """Restart the gateway (it reads the whole card index), swipe these holders' cards,
    then read the processes' memory and the broker's disk."""
    gateway = stack.restart_component(settings, "gateway", console)
    run.gateway_ready_s = gateway.ready_s or 0.0
    _swipes(settings, holders, run)
    run.gateway_rss, _ = proc_memory(_pid(settings, "gateway"))
    rss, peak = proc_memory(_pid(settings, "worker-0"))
    run.worker_peak = max(run.worker_peak, peak)
    run.broker_rss, run.broker_peak = proc_memory(_pid(settings, "broker-0"))
    run.broker_disk = tree_bytes(state_dir / "data" / "kafka")
    console.print(
        f"  worker RSS after {run.swipes} swipes {human(rss)}; results {run.swipe_results}"
    )


def run_store(
    base: Settings, store: str, persons: int, swipes: int, compression: str | None, state_root: Path
) -> Run:
    """The city loaded onto the broker of a fresh stack, then a cold rebuild, a warm
    restart, the gateway's restart and a few swipes; the stack wiped at the end."""
    state_dir = state_root / f"{store}-{persons}"
    settings = base.model_copy(update={"state_dir": state_dir})
    run = Run(store, persons)
    console.rule(f"{store} store, {persons:,} persons ({state_dir})")
    endpoints = stack.up(settings, console)
    try:
        _empty_start(settings, run)
        city = _load_onto_broker(settings, endpoints.kafka(), persons, compression, run)
        _cold_then_warm_restart(settings, state_dir, run)
        _gateway_and_swipes(settings, state_dir, _sample(persons, swipes, city.seed), run)
    except Exception as exc:  # a failed size is a finding: keep what was measured
        run.error = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]{store} at {persons:,}: {run.error}[/]")
        run.broker_rss, run.broker_peak = proc_memory(_pid(settings, "broker-0"))
    finally:
        stack.down(settings, console, wipe=True)
    return run


def run_direct(base: Settings, persons: int, swipes: int, state_root: Path) -> Run:
    """RocksDB with the persons written straight into worker-0's store before `up`
    (`seed_store`): the worker's start opens them; `recovery s` is a restart (local files,
    the changelog's tail only), `warm restart s` a second one. Only the swiped holders'
    cards go onto the card index."""
    state_dir = state_root / f"rocksdb-direct-{persons}"
    settings = base.model_copy(update={"state_dir": state_dir})
    run = Run("rocksdb", persons, direct=True)
    console.rule(f"rocksdb store, {persons:,} persons seeded into the store ({state_dir})")
    city = City(load_policy(settings), int(time.time() * 1000))
    try:
        with _progress("writing persons into the store", persons) as advance:
            run.load = seed_store(settings, city, persons, advance)
        console.print(
            f"  wrote {persons:,} persons in {run.load.seconds:.1f} s "
            f"({persons / run.load.seconds:,.0f}/s; {run.load.verified:,} checked byte for "
            f"byte against core.handle); the changelog would hold {human(run.load.changelog_bytes)}"
        )
        endpoints = stack.up(settings, console)
        _empty_start(settings, run)
        status = stack.restart_component(settings, "worker-0", console)
        run.recovery_s = status.ready_s or 0.0
        run.worker_rss, run.worker_peak = proc_memory(status.pid)
        run.recovery_cpu_s = proc_cpu_s(status.pid)
        sample = _sample(persons, swipes, city.seed)
        asyncio.run(
            index_cards(endpoints.kafka(), sample, load_redaction(settings), topics.CARD_INDEX.name)
        )
        gateway = stack.restart_component(settings, "gateway", console)
        run.gateway_ready_s = gateway.ready_s or 0.0
        _swipes(settings, sample, run)
        status = stack.restart_component(settings, "worker-0", console)  # after the swipes
        run.warm_recovery_s = status.ready_s
        run.warm_worker_rss, peak = proc_memory(status.pid)
        run.worker_peak = max(run.worker_peak, peak)
        _, run.changelog_records = asyncio.run(topic_records(endpoints.kafka(), CHANGELOG_TOPIC))
        run.store_disk = tree_bytes(state_dir / "data" / "worker-0")
        run.gateway_rss, _ = proc_memory(_pid(settings, "gateway"))
        run.broker_rss, run.broker_peak = proc_memory(_pid(settings, "broker-0"))
        run.broker_disk = tree_bytes(state_dir / "data" / "kafka")
    except Exception as exc:  # a failed size is a finding: keep what was measured
        run.error = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]rocksdb seeded at {persons:,}: {run.error}[/]")
    finally:
        stack.down(settings, console, wipe=True)
    return run


def _row_id(row: str) -> tuple[str, str]:
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    return (cells[0], cells[1]) if len(cells) > 1 else ("", "")


def _markdown(runs: list[Run], earlier: list[str], command: str, machine: str) -> str:
    """The section: this invocation's rows, plus earlier rows of other (store, persons)."""
    new = ["| " + " | ".join(r.cells()) + " |" for r in runs]
    ids = {_row_id(row) for row in new}
    rows = sorted(
        [row for row in earlier if _row_id(row) not in ids] + new,
        key=lambda row: (_row_id(row)[0], int(_row_id(row)[1].replace(",", "") or 0)),
    )
    lines = [
        BEGIN,
        "",
        f"Generated by `{command}` (last run {dt.date.today().isoformat()}; "
        "rows of other stores and sizes are kept from earlier runs, each with its date).",
        f"Machine: {machine}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *rows,
        "",
        *[f"- {note}" for note in NOTES],
        "",
        END,
    ]
    return "\n".join(lines)


def earlier_rows(doc: Path = DOC) -> list[str]:
    """The table rows of the generated section as it stands (none if there is none)."""
    text = doc.read_text() if doc.exists() else ""
    if BEGIN not in text or END not in text:
        return []
    section = text.partition(BEGIN)[2].partition(END)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row for row in rows[1:] if len(row.split("|")) == len(COLUMNS) + 2]


NOTES = (
    "Persons are written straight onto the changelog and the card index, as register → "
    "issue → activate → change PIN (with a PVV) → credit (employees) leave them; every "
    f"{VERIFY_EVERY:,}th record is rebuilt through `core.handle` and compared byte for byte.",
    "changelog bytes: keys + values as produced (before the producer's compression); "
    "broker on disk: Apache Kafka's data directory after the run.",
    "empty start s: the worker's own start at `up` (empty table), process start to READY: "
    "the floor under the recovery figure on the machine as loaded at that moment.",
    "recovery s: `medclear restart worker-0` with the worker's RocksDB files deleted while "
    "it is stopped (a cold rebuild), process start to the worker's READY gauge (partitions "
    "assigned, every changelog partition restored). warm restart s: a second restart, "
    "RocksDB's files kept, so only the changelog's tail is read. Rows dated before "
    "2026-12-06 were measured on faust-streaming (per-record recovery, a restart that kept "
    "its files).",
    "worker CPU s: CPU seconds the worker had used when READY, at `up` (empty table) and "
    "after the restart; the shared 2-core machine stretches wall times, CPU time much less.",
    "worker peak RSS: VmHWM of the worker process (recovery included); RSS: VmRSS after it.",
    "gateway ready s / RSS: the gateway restarted after the load reads the whole card index.",
    "swipes: employees among the last loaded, one at a time through the gateway, card "
    "number only (card-index lookup); terminal security off.",
    "at 2.9 M (linear): peak RSS and recovery scaled linearly from that row — an "
    "extrapolation, not a measurement.",
    f"rocksdb {DIRECT_LABEL} (`--direct`): the persons written straight into the worker's "
    "RocksDB files before `up`, in the stream runtime's layout, nothing onto the broker "
    "(its changelog bytes: what enrolment would write). empty start s: the worker's start "
    "at `up` opening them; recovery s: a restart before any swipe; warm restart s: one "
    "after the swipes (the changelog's tail). Only the swiped holders' cards are on the "
    "card index.",
)


def write_doc(section: str, doc: Path = DOC) -> None:
    """Replace the generated section between the markers (or append it with a heading)."""
    replace_section(doc, BEGIN, END, section, "Scale of state: persons in one worker (generated)")


def command(
    persons: Annotated[int, typer.Option(min=1, max=10_000_000, help="cardholders to load")] = (
        2_900_000
    ),
    swipes: Annotated[int, typer.Option(min=1, max=10_000, help="swipes after recovery")] = 50,
    compression: Annotated[str, typer.Option(help="producer compression: none|gzip|lz4|zstd")] = (
        "lz4"
    ),
    state_root: Annotated[Path, typer.Option(help="stacks' state directories go under it")] = (
        Path("/tmp/medclear-bench-state")
    ),
    write_doc_: Annotated[
        bool,
        typer.Option("--write-doc/--no-write-doc", help="replace the section in PERFORMANCE.md"),
    ] = True,
    direct: Annotated[
        bool,
        typer.Option(
            "--direct",
            help="rocksdb only: write the persons straight into the worker's store, not "
            "onto the changelog (a worker that keeps its disk, without a cold rebuild); "
            "measures the worker's start, restarts, RSS and swipes with them",
        ),
    ] = False,
) -> None:
    """A city of N cardholders in one clearing worker, per table store: changelog size,
    recovery time after a restart, worker RSS, and swipes decided afterwards. Each store
    gets a fresh stack (terminal security and TLS off, only the pre-loss timer job),
    stopped and wiped at the end."""
    base = get_settings().model_copy(
        update={
            "terminal_security": False,
            "tls": False,
            "jobs": "pre-loss-timer",
            "workers": 1,
            "startup_timeout_s": 1800.0,  # a cold rebuild of 2.9 M persons took 952 s here
        }
    )
    machine = describe_machine()
    if direct:
        runs = [run_direct(base, persons, swipes, state_root)]
    else:
        runs = [
            run_store(
                base,
                STORE,
                persons,
                swipes,
                None if compression == "none" else compression,
                state_root,
            )
        ]
    table = Table(title="medclear bench state")  # one column a run: the rows fit a terminal
    table.add_column("")
    for r in runs:
        table.add_column(f"{r.store} {r.persons:,}", justify="right")
    for i, column in enumerate(COLUMNS[2:], start=2):
        table.add_row(column, *(r.cells()[i] for r in runs))
    console.print(table)
    for r in runs:
        console.print(f"{r.store} at {r.persons:,}: {r.verdict()}; at 2.9 M: {r.at_target()}")
    if write_doc_:
        argv = f"medclear bench state --persons {persons} " + ("--direct" if direct else "")
        write_doc(_markdown(runs, earlier_rows(), argv, machine))
        console.print(f"wrote the results into {DOC}")
