"""The bench city of `medclear bench state` and its seeding: N cardholders derived from
(seed, index) alone, their changelog records, and how they are written onto the broker
or straight into the worker's stores.

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
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import murmur2

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
from medclear.errors import MedclearError
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import partitions_of
from medclear.infra.settings import Settings
from medclear.sim.city import GIVEN, REGION_CODE, SURNAMES, category_of
from stream_jobs import worker
from stream_runtime.store import PartitionStore

SEED = 2026
CHANGELOG_TOPIC = "medclear-clearing-persons-changelog"  # streams.changelog.changelog_topic
VERIFY_EVERY = 1000  # every n-th person is also built through the core in full
BIRTH_FIRST = dt.date(1940, 1, 1).toordinal()
BIRTH_DAYS = dt.date(2005, 12, 31).toordinal() - BIRTH_FIRST + 1
MAX_PERSONS = BIRTH_DAYS * 1000  # ssn = region + birth date + 3-digit sequence: unique below
SEED_AT_MS = 1_790_000_000_000  # when the city was seeded (2026-09-21, Beijing)


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
    kafka: KafkaAccess,
    city: City,
    persons: int,
    partitions: int,
    redaction: Redaction,
    compression: str | None,
    on_progress: Callable[[int], None],
    index_topic: str,
) -> LoadResult:
    """Produce `persons` changelog records and as many card-index records."""
    producer = AIOKafkaProducer(
        **kafka.options(),
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
    per partition in the runtime's layout (stream_runtime/store.py), as a restore from
    the changelog would have left them; nothing goes to the broker, and the stored
    changelog offset stays 0 (the broker's changelog is empty). A worker that keeps its
    disk, at 2.9 M persons, without the minutes of loading it through the broker first.
    `changelog_bytes` is what enrolment would write onto the changelog."""
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
    kafka: KafkaAccess, holders: Sequence[Holder], redaction: Redaction, topic: str
) -> None:
    """Card-index records (card token → sealed ssn) for these holders only: what the
    gateway needs to route their swipes when the persons were seeded into the store
    (`seed_store`)."""
    producer = AIOKafkaProducer(**kafka.options(), acks="all")
    await producer.start()
    try:
        for h in holders:
            ref, owner = card_index_record(h.card_no, h.ssn, redaction)
            await producer.send(topic, key=ref, value=owner, partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def topic_records(kafka: KafkaAccess, topic: str) -> tuple[int, int]:
    """(partitions, records) of a topic: end offsets minus beginning offsets."""
    consumer = AIOKafkaConsumer(**kafka.options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await partitions_of(kafka, topic)
        if not tps:
            return 0, 0
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        return len(tps), sum(ends[tp] - begins[tp] for tp in tps)
    finally:
        await consumer.stop()
