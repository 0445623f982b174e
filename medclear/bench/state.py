"""`medclear bench state`: a city of N cardholders in one clearing worker — how big its
changelog is, how long the worker takes to rebuild its stores from it with no local
files (a cold rebuild: a new machine, a lost disk), how long a restart that keeps them
takes (warm), and how much memory it holds meanwhile.

Seeding through the card registry (one EnrolPerson command a person) runs at ~96
persons/s here, so 2.9 M persons would take over eight hours. The bench instead writes
what enrolment would have left behind straight onto the topics the worker and the
gateway read:

- `medclear-clearing-persons-changelog`: key ssn, value the person as `clearing.codec`
  encodes it after register → issue → activate → change PIN (with a PVV, as with
  terminal security on) → credit of the opening balance (employees only), all decided by
  `clearing.core.handle` from the real commands. The record of each category is built
  once through the core with sentinel values, and the persons are filled into it; every
  `VERIFY_EVERY`-th person is built through the core in full and must come out
  byte-identical, so the fast path is checked, not assumed (`Template`).
- `medclear.card-index`: key the card token, value the ssn sealed under the person data
  key (`clearing.redact.card_index_record`), as the worker writes it when a card is issued.

Each record goes to the partition the producers of the real path pick (aiokafka's
default partitioner over the key), which is the partition the worker's commands for that
person arrive on. No events are written (nothing downstream is measured here).

Then: delete the worker's stores and restart it (a cold rebuild from the changelog, timed
to its READY gauge), restart it once more (the local files are kept: only the changelog's
tail is read), restart the gateway
(it reads the whole card index at start), read RSS and peak RSS from /proc, and decide a
few swipes of loaded cardholders through the gateway to show the state is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from clearing import codec, core
from clearing.codes import CardKind, InsuranceCategory, ResultCode
from clearing.model import (
    CardCommand,
    Command,
    CreditAccount,
    IssueCard,
    Person,
    Policy,
    RegisterPerson,
)
from clearing.redact import Redaction, card_index_record
from clearing.validate import ssn_check_char
from medclear.bench.perfdoc import DOC as PERFORMANCE_DOC
from medclear.bench.perfdoc import replace_section
from medclear.errors import MedclearError
from medclear.infra.settings import Settings, get_settings
from medclear.sim.city import GIVEN, REGION_CODE, SURNAMES, category_of

console = Console()
DOC = PERFORMANCE_DOC
BEGIN, END = "<!-- bench:state:begin -->", "<!-- bench:state:end -->"
SEED = 2026
CHANGELOG_TOPIC = "medclear-clearing-persons-changelog"  # streams.changelog.changelog_topic
VERIFY_EVERY = 1000  # every n-th person is also built through the core in full
BIRTH_FIRST = dt.date(1940, 1, 1).toordinal()
BIRTH_DAYS = dt.date(2005, 12, 31).toordinal() - BIRTH_FIRST + 1
MAX_PERSONS = BIRTH_DAYS * 1000  # ssn = region + birth date + 3-digit sequence: unique below
SEED_AT_MS = 1_790_000_000_000  # when the city was seeded (2026-09-21, Beijing)
GIB = 1024**3


# ----------------------------------------------------------------------------- the city


@dataclass(frozen=True)
class Holder:
    """One cardholder of the bench city, derived from (seed, index) alone."""

    ssn: str
    name: str
    category: InsuranceCategory
    phone: str
    card_no: str
    balance_fen: int
    pvv: str  # the PIN verification value the HSM would have returned at ChangePin


def holder(index: int, seed: int = SEED) -> Holder:
    """The index-th cardholder: ssn and card number unique by construction (no lookups),
    the rest from a hash of (seed, index): 80% employees (blue), 15% residents, 5% special."""
    if not 0 <= index < MAX_PERSONS:
        raise ValueError(f"index {index} outside 0..{MAX_PERSONS - 1}")
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=24).digest()
    birth = dt.date.fromordinal(BIRTH_FIRST + index % BIRTH_DAYS)
    first17 = f"{REGION_CODE}{birth:%Y%m%d}{index // BIRTH_DAYS:03d}"
    category = category_of(h[0] / 256)
    given = GIVEN[h[2] % len(GIVEN)] + (GIVEN[h[3] % len(GIVEN)] if h[4] & 1 else "")
    phone = f"1{'3456789'[h[5] % 7]}{int.from_bytes(h[6:10], 'big') % 10**9:09d}"
    balance = (
        50_00 + int.from_bytes(h[10:13], "big") % (5_000_00 - 50_00 + 1)
        if category == InsuranceCategory.EMPLOYEE
        else 0
    )
    return Holder(
        ssn=first17 + ssn_check_char(first17),
        name=SURNAMES[h[1] % len(SURNAMES)] + given,
        category=category,
        phone=phone,
        card_no=f"B{index:08d}",
        balance_fen=balance,
        pvv=h[16:24].hex(),
    )


def seed_commands(h: Holder, at_ms: int = SEED_AT_MS) -> list[Command]:
    """What the card registry sends for a new cardholder (as `medclear seed` does)."""
    commands: list[Command] = [
        RegisterPerson(
            f"seed-{h.ssn}-register", at_ms, h.ssn, h.name, h.category, h.phone, REGION_CODE
        ),
        IssueCard(f"seed-{h.ssn}-issue", at_ms + 1, h.ssn, h.card_no, CardKind.SOCIAL_SECURITY),
        CardCommand(f"seed-{h.ssn}-activate", at_ms + 2, h.ssn, h.card_no, "activate"),
        CardCommand(f"seed-{h.ssn}-pin", at_ms + 3, h.ssn, h.card_no, "change_pin", pvv=h.pvv),
    ]
    if h.category == InsuranceCategory.EMPLOYEE:
        commands.append(
            CreditAccount(
                f"seed-{h.ssn}-credit", at_ms + 4, h.ssn, h.balance_fen, f"opening-{h.ssn}"
            )
        )
    return commands


class SeedRefused(MedclearError):
    """The core refused a seeding command: the bench city would not be genuine."""


def genuine_person(h: Holder, policy: Policy, at_ms: int = SEED_AT_MS) -> Person:
    """The person the worker holds after deciding the seeding commands (core.handle)."""
    person: Person | None = None
    for command in seed_commands(h, at_ms):
        person, decision = core.handle(person, command, policy)
        if decision.reply.result != ResultCode.OK:
            raise SeedRefused(
                f"{type(command).__name__} of {h.card_no}: {decision.reply.result.name}"
            )
    assert person is not None
    return person


# Sentinels: values no real holder has, each found in the encoded template exactly where
# the real value goes. `Template.verify` proves the substitution on real builds.
_SENTINEL = Holder(
    ssn="",  # set below (it must be a valid ssn for the core)
    name="龘龘龘",
    category=InsuranceCategory.EMPLOYEE,
    phone="19999999999",
    card_no="ZQXZQXZQX",
    balance_fen=4_271_983,
    pvv="fedcba9876543210",
)
_SENTINEL_SSN17 = "99999918991231999"
CATEGORIES = (InsuranceCategory.EMPLOYEE, InsuranceCategory.RESIDENT, InsuranceCategory.SPECIAL)
_FIELDS = ("ssn", "name", "phone", "card_no", "balance_fen", "pvv")


class Template:
    """A person's changelog value for one category, as fixed bytes with holes for the
    per-person fields; `encode(h)` equals `codec.encode(genuine_person(h))`."""

    def __init__(self, category: InsuranceCategory, policy: Policy, at_ms: int) -> None:
        sentinel = dataclasses.replace(
            _SENTINEL,
            ssn=_SENTINEL_SSN17 + ssn_check_char(_SENTINEL_SSN17),
            category=category,
            balance_fen=_SENTINEL.balance_fen if category == InsuranceCategory.EMPLOYEE else 0,
        )
        text = codec.encode(genuine_person(sentinel, policy, at_ms)).decode()
        values = {str(getattr(sentinel, f)): f for f in _FIELDS if getattr(sentinel, f)}
        pattern = "(" + "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)) + ")"
        pieces = re.split(pattern, text)
        # one %-format string: the holes as %(field)s, every literal % doubled
        self.format = "".join(
            f"%({values[piece]})s" if i % 2 else piece.replace("%", "%%")
            for i, piece in enumerate(pieces)
        )
        self.holes = len(pieces) // 2
        self.at_ms = at_ms

    def encode(self, h: Holder) -> bytes:
        return (self.format % {f: getattr(h, f) for f in _FIELDS}).encode()


class City:
    """The bench city's changelog values, fast, and checked against the core."""

    def __init__(self, policy: Policy, at_ms: int = SEED_AT_MS, seed: int = SEED) -> None:
        self.policy, self.at_ms, self.seed = policy, at_ms, seed
        self.templates = {c: Template(c, policy, at_ms) for c in CATEGORIES}
        self.verified = 0

    def record(self, index: int) -> tuple[Holder, bytes]:
        h = holder(index, self.seed)
        value = self.templates[h.category].encode(h)
        if index % VERIFY_EVERY == 0:
            self.verify(h, value)
        return h, value

    def verify(self, h: Holder, value: bytes) -> None:
        genuine = codec.encode(genuine_person(h, self.policy, self.at_ms))
        if genuine != value:
            raise AssertionError(f"template record of {h.card_no} differs from the core's")
        self.verified += 1


# ------------------------------------------------------------------------ the bulk load


def partition_of(key: bytes, partitions: int) -> int:
    """The partition aiokafka's default partitioner picks (the real path's producers)."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass
class LoadResult:
    persons: int = 0
    changelog_bytes: int = 0  # keys + values as produced (before compression)
    index_bytes: int = 0
    seconds: float = 0.0
    verified: int = 0


class _Batches:
    """Per-partition record batches of one topic, sent when full; at most `in_flight`
    unacknowledged batches at a time."""

    def __init__(self, producer: Any, topic: str, in_flight: int) -> None:
        self.producer, self.topic = producer, topic
        self.open: dict[int, Any] = {}
        self.pending: list[asyncio.Future[Any]] = []
        self.in_flight = in_flight

    async def add(self, partition: int, key: bytes, value: bytes, at_ms: int) -> None:
        batch = self.open.get(partition)
        if batch is None:
            batch = self.open[partition] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=at_ms) is None:
            await self._send(partition)
            batch = self.open[partition] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=at_ms) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit in a batch")

    async def _send(self, partition: int) -> None:
        batch = self.open.pop(partition)
        self.pending.append(await self.producer.send_batch(batch, self.topic, partition=partition))
        while len(self.pending) > self.in_flight:
            await self.pending.pop(0)

    async def flush(self) -> None:
        for partition in list(self.open):
            await self._send(partition)
        await asyncio.gather(*self.pending)
        self.pending.clear()


async def load(
    bootstrap: str,
    city: City,
    persons: int,
    partitions: int,
    redaction: Redaction,
    compression: str | None,
    on_progress: Callable[[int], None],
    index_topic: str,
) -> LoadResult:
    """Produce `persons` changelog records and as many card-index records."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        compression_type=compression,
    )
    await producer.start()
    result = LoadResult()
    started = time.perf_counter()
    try:
        changelog = _Batches(producer, CHANGELOG_TOPIC, in_flight=4 * partitions)
        index = _Batches(producer, index_topic, in_flight=4)
        step = 2_000
        for index_no in range(persons):
            h, value = city.record(index_no)
            key = h.ssn.encode()
            await changelog.add(partition_of(key, partitions), key, value, city.at_ms)
            ref, owner = card_index_record(h.card_no, h.ssn, redaction)
            await index.add(0, ref, owner, city.at_ms)
            result.changelog_bytes += len(key) + len(value)
            result.index_bytes += len(ref) + len(owner)
            if (index_no + 1) % step == 0:
                on_progress(step)
                await asyncio.sleep(0)
        await changelog.flush()
        await index.flush()
        on_progress(persons % step)
    finally:
        await producer.stop()
    result.persons = persons
    result.seconds = time.perf_counter() - started
    result.verified = city.verified
    return result


STORE_BATCH = 10_000  # records per RocksDB write batch in `seed_store`


def seed_store(
    settings: Settings, city: City, persons: int, on_progress: Callable[[int], None]
) -> LoadResult:
    """Write `persons` straight into worker-0's stores (the worker stopped): one RocksDB
    per partition in the runtime's layout (medclear/streams/store.py), as a restore from
    the changelog would have left them; nothing goes to the broker, and the stored
    changelog offset stays 0 (the broker's changelog is empty). A worker that keeps its
    disk, at 2.9 M persons, without the minutes of loading it through the broker first.
    `changelog_bytes` is what enrolment would write onto the changelog."""
    from medclear.streams.store import PartitionStore
    from stream_jobs import worker

    partitions = settings.command_partitions
    base = worker.data_dir(settings, 0) / worker.PERSONS_TABLE
    stores = [PartitionStore(base / str(p)) for p in range(partitions)]
    result = LoadResult()
    started = time.perf_counter()
    chunks: list[dict[bytes, bytes | None]] = [{} for _ in range(partitions)]
    for index_no in range(persons):
        h, value = city.record(index_no)
        key = h.ssn.encode()
        chunks[partition_of(key, partitions)][key] = value
        result.changelog_bytes += len(key) + len(value)
        if (index_no + 1) % STORE_BATCH == 0:
            for store, chunk in zip(stores, chunks, strict=True):
                store.apply(chunk, store.next_offset)
            chunks = [{} for _ in range(partitions)]
            on_progress(STORE_BATCH)
    for store, chunk in zip(stores, chunks, strict=True):
        store.apply(chunk, store.next_offset)
        store.close()
    on_progress(persons % STORE_BATCH)
    result.persons = persons
    result.seconds = time.perf_counter() - started
    result.verified = city.verified
    return result


async def index_cards(
    bootstrap: str, holders: Sequence[Holder], redaction: Redaction, topic: str
) -> None:
    """Card-index records (card token → sealed ssn) for these holders only: what the
    gateway needs to route their swipes when the persons were seeded into the store
    (`seed_store`)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for h in holders:
            ref, owner = card_index_record(h.card_no, h.ssn, redaction)
            await producer.send(topic, key=ref, value=owner, partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def topic_records(bootstrap: str, topic: str) -> tuple[int, int]:
    """(partitions, records) of a topic: end offsets minus beginning offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return 0, 0
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        return len(tps), sum(ends[tp] - begins[tp] for tp in tps)
    finally:
        await consumer.stop()


# ------------------------------------------------------------------------- measurements


def proc_memory(pid: int | None) -> tuple[int, int]:
    """(RSS, peak RSS) of a process in bytes, from /proc; (0, 0) if it is gone."""
    if pid is None:
        return 0, 0
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values["VmRSS"], values["VmHWM"]


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used, from /proc; 0 if it is gone. Unlike
    wall time it hardly depends on what else the shared machine runs."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_bytes(path: Path) -> int:
    """Bytes of the files under a directory (what the broker or RocksDB keep on disk)."""
    if not path.exists():
        return 0
    total = 0
    for child in path.rglob("*"):
        try:
            if child.is_file():
                total += child.stat().st_size
        except OSError:
            continue
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} GiB"


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
STORE = "rocksdb"  # the stream runtime keeps every table in RocksDB (medclear/streams)
DIRECT_LABEL = "(seeded into the store)"
IDLE_WORKER_RSS = 150 * 1024**2  # a worker with an empty table (measured: 130–160 MiB)
WORKER_START_S = 3.0  # process start to READY with an empty table (docs/PERFORMANCE.md)


# ------------------------------------------------------------------------------ the run


def _pid(settings: Settings, name: str) -> int | None:
    from medclear import stack

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
    from medclear import stack
    from medclear.infra.policy import load_institutions
    from medclear.sim import city, traffic

    residents = [
        city.Resident(h.ssn, h.name, h.category, h.phone, h.card_no, h.balance_fen) for h in holders
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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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


def run_store(
    base: Settings, store: str, persons: int, swipes: int, compression: str | None, state_root: Path
) -> Run:
    from medclear import stack
    from medclear.infra import topics
    from medclear.infra.policy import load_policy
    from medclear.infra.tokens import load_redaction
    from stream_jobs import worker

    state_dir = state_root / f"{store}-{persons}"
    settings = base.model_copy(update={"state_dir": state_dir})
    run = Run(store, persons)
    console.rule(f"{store} store, {persons:,} persons ({state_dir})")
    endpoints = stack.up(settings, console)
    try:
        bootstrap = endpoints.kafka_bootstrap
        empty = next(c for c in stack.status(settings) if c.name == "worker-0")
        run.empty_start_s = empty.ready_s or 0.0
        run.empty_rss, _ = proc_memory(empty.pid)
        run.empty_cpu_s = proc_cpu_s(empty.pid)
        partitions, _ = asyncio.run(topic_records(bootstrap, CHANGELOG_TOPIC))
        if partitions != settings.command_partitions:
            raise stack.StackError(
                f"{CHANGELOG_TOPIC} has {partitions} partitions, "
                f"expected {settings.command_partitions}"
            )
        city = City(load_policy(settings), int(time.time() * 1000))
        with _progress("loading persons", persons) as advance:
            run.load = asyncio.run(
                load(
                    bootstrap,
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
        _, run.changelog_records = asyncio.run(topic_records(bootstrap, CHANGELOG_TOPIC))
        _, run.index_records = asyncio.run(topic_records(bootstrap, topics.CARD_INDEX.name))

        t0 = time.monotonic()
        status = stack.restart_component(  # a cold rebuild: no local files
            settings, "worker-0", console,
            while_stopped=lambda: shutil.rmtree(worker.data_dir(settings, 0), ignore_errors=True),
        )  # fmt: skip
        run.recovery_s = status.ready_s if status.ready_s is not None else time.monotonic() - t0
        run.worker_rss, run.worker_peak = proc_memory(status.pid)
        run.recovery_cpu_s = proc_cpu_s(status.pid)
        status = stack.restart_component(settings, "worker-0", console)
        run.warm_recovery_s = status.ready_s
        run.warm_worker_rss, peak = proc_memory(status.pid)
        run.worker_peak = max(run.worker_peak, peak)
        run.store_disk = tree_bytes(state_dir / "data" / "worker-0")

        gateway = stack.restart_component(settings, "gateway", console)
        run.gateway_ready_s = gateway.ready_s or 0.0
        _swipes(settings, _sample(persons, swipes, city.seed), run)
        run.gateway_rss, _ = proc_memory(_pid(settings, "gateway"))
        rss, peak = proc_memory(_pid(settings, "worker-0"))
        run.worker_peak = max(run.worker_peak, peak)
        run.broker_rss, run.broker_peak = proc_memory(_pid(settings, "broker"))
        run.broker_disk = tree_bytes(state_dir / "data" / "broker")
        console.print(
            f"  worker RSS after {run.swipes} swipes {human(rss)}; results {run.swipe_results}"
        )
    except Exception as exc:  # a failed size is a finding: keep what was measured
        run.error = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]{store} at {persons:,}: {run.error}[/]")
        run.broker_rss, run.broker_peak = proc_memory(_pid(settings, "broker"))
    finally:
        stack.down(settings, console, wipe=True)
    return run


def run_direct(base: Settings, persons: int, swipes: int, state_root: Path) -> Run:
    """RocksDB with the persons written straight into worker-0's store before `up`
    (`seed_store`): the worker's start opens them; `recovery s` is a restart (local files,
    the changelog's tail only), `warm restart s` a second one. Only the swiped holders'
    cards go onto the card index."""
    from medclear import stack
    from medclear.infra import topics
    from medclear.infra.policy import load_policy
    from medclear.infra.tokens import load_redaction

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
        first = next(c for c in stack.status(settings) if c.name == "worker-0")
        run.empty_start_s = first.ready_s or 0.0
        run.empty_rss, _ = proc_memory(first.pid)
        run.empty_cpu_s = proc_cpu_s(first.pid)
        status = stack.restart_component(settings, "worker-0", console)
        run.recovery_s = status.ready_s or 0.0
        run.worker_rss, run.worker_peak = proc_memory(status.pid)
        run.recovery_cpu_s = proc_cpu_s(status.pid)
        sample = _sample(persons, swipes, city.seed)
        asyncio.run(index_cards(endpoints.kafka_bootstrap, sample, load_redaction(settings),
                                topics.CARD_INDEX.name))  # fmt: skip
        gateway = stack.restart_component(settings, "gateway", console)
        run.gateway_ready_s = gateway.ready_s or 0.0
        _swipes(settings, sample, run)
        status = stack.restart_component(settings, "worker-0", console)  # after the swipes
        run.warm_recovery_s = status.ready_s
        run.warm_worker_rss, peak = proc_memory(status.pid)
        run.worker_peak = max(run.worker_peak, peak)
        _, run.changelog_records = asyncio.run(
            topic_records(endpoints.kafka_bootstrap, CHANGELOG_TOPIC)
        )
        run.store_disk = tree_bytes(state_dir / "data" / "worker-0")
        run.gateway_rss, _ = proc_memory(_pid(settings, "gateway"))
        run.broker_rss, run.broker_peak = proc_memory(_pid(settings, "broker"))
        run.broker_disk = tree_bytes(state_dir / "data" / "broker")
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
    "broker on disk: noida-db's data directory after the run.",
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
    from medclear.bench.pipeline import _machine

    base = get_settings().model_copy(
        update={
            "terminal_security": False,
            "tls": False,
            "jobs": "pre-loss-timer",
            "workers": 1,
            "startup_timeout_s": 1800.0,  # a cold rebuild of 2.9 M persons took 952 s here
        }
    )
    machine = _machine()
    if direct:
        runs = [run_direct(base, persons, swipes, state_root)]
    else:
        runs = [run_store(base, STORE, persons, swipes,
                          None if compression == "none" else compression, state_root)]  # fmt: skip
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
