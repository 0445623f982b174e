"""The stream runtime's batch stages, with its producer, store and consumer replaced by
in-memory ones: a crash between any two stages leaves what a restart reads consistent, and
the restart ends where an uncrashed run ends. (The kill -9 tests do the same with real
processes on a real broker: tests/integration/.)

The job counts records per key, idempotently as the clearing worker is (a record read
again after a crash is answered from the state that already has it): its state is
`count:last offset`, its output `key:count`, its reply `offset:count`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.topics import changelog_topic
from stream_runtime.batch import Batch, Stage, StageError, StreamFailed
from stream_runtime.runtime import Runtime

JOB, TABLE, INPUT = "counter", "counts", "input"
TP = TopicPartition(INPUT, 0)
CHANGELOG = (changelog_topic(JOB, TABLE), 0)
KEYS = [b"a", b"b", b"c"]
RECORDS = 24
BATCH = 4


@dataclass
class Record:
    offset: int
    key: bytes
    value: bytes = b""
    partition: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class Meta:
    offset: int


@dataclass
class Broker:
    """Every topic partition's records, in order; `fail` makes the acknowledgement of
    the n-th record sent to a topic fail."""

    logs: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    fail: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Producer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.broker.sent[topic] += 1
        if self.broker.fail.get(topic) == self.broker.sent[topic]:
            future.set_exception(ConnectionError(f"{topic}: no acknowledgement"))
            return future
        log = self.broker.logs[(topic, partition or 0)]
        log.append((key, value))
        future.set_result(Meta(len(log) - 1))
        return future


class Store:
    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.next_offset = 0

    def get(self, key: bytes) -> bytes | None:
        return self.values.get(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.values.items()))

    def apply(self, changes: Mapping[bytes, bytes | None], next_offset: int) -> None:
        for key, value in changes.items():
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value
        self.next_offset = next_offset

    def close(self) -> None:
        pass


class Consumer:
    def __init__(self, committed: dict[TopicPartition, int]) -> None:
        self.committed = committed

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.committed.update(offsets)

    async def stop(self) -> None:
        pass


class Crash(Exception):
    """kill -9, at a chosen stage of a chosen batch."""


async def count(batch: Batch) -> None:
    for record in batch.records:
        raw = batch.get(TABLE, record.partition, record.key)
        seen, last = map(int, raw.split(b":")) if raw else (0, -1)
        if record.offset <= last:  # read again after a crash: the state has it
            batch.reply("replies", f"{record.offset}:{seen}".encode())
            continue
        seen += 1
        batch.put(TABLE, record.partition, record.key, f"{seen}:{record.offset}".encode())
        batch.send("out", record.key + f":{seen}".encode(), key=record.key)
        batch.reply("replies", f"{record.offset}:{seen}".encode())


@dataclass
class World:
    """What outlives a crash: the broker, the store on disk, the committed offsets."""

    broker: Broker = field(default_factory=Broker)
    store: Store = field(default_factory=Store)
    committed: dict[TopicPartition, int] = field(default_factory=dict)

    def runtime(self, in_flight_max: int, on_stage: Any = None) -> Runtime:
        """A runtime after its start and its partition's restore."""
        runtime = Runtime(
            job=JOB,
            member_id="m-0",
            kafka=KafkaAccess("nowhere:1"),
            topic=INPUT,
            handler=count,
            data_dir=Path("/nonexistent"),
            tables=[TABLE],
            in_flight_max=in_flight_max,
            producer_factory=lambda _k: Producer(self.broker),
            store_factory=lambda _p: self.store,
            on_stage=on_stage,
        )
        runtime.producer = runtime.producer_factory(runtime.kafka)
        runtime.reply_producer = runtime.producer_factory(runtime.kafka)
        runtime.consumer = Consumer(self.committed)  # type: ignore[assignment]
        changelog = self.broker.logs[CHANGELOG]  # restore: changelog.restore's job
        self.store.apply(dict(changelog[self.store.next_offset :]), len(changelog))
        runtime.stores[(TABLE, 0)] = self.store
        return runtime


def records_from(offset: int) -> list[Record]:
    return [Record(o, KEYS[o % len(KEYS)]) for o in range(offset, RECORDS)]


async def feed(runtime: Runtime, records: list[Record]) -> None:
    for i in range(0, len(records), BATCH):
        await runtime._handle({TP: records[i : i + BATCH]})  # the poll loop's one step
    async with runtime._lock:
        await runtime._drain()


async def kill(runtime: Runtime) -> None:
    """Nothing of a crashed runtime runs on (kill -9): its completions in flight stop."""
    for task in runtime._completions:
        task.cancel()
    await asyncio.gather(*runtime._completions, return_exceptions=True)


def expected_counts() -> dict[bytes, int]:
    counts: dict[bytes, int] = defaultdict(int)
    for record in records_from(0):
        counts[record.key] += 1
    return dict(counts)


def check_consistent(world: World) -> None:
    """What a restart reads after a crash, whatever the stage."""
    changelog = world.broker.logs[CHANGELOG]
    assert world.store.next_offset <= len(changelog)
    replayed: dict[bytes | None, bytes | None] = dict(changelog[: world.store.next_offset])
    assert world.store.values == replayed  # the store is exactly a prefix of its changelog
    stored = {k: int(v.split(b":")[0]) for k, v in world.store.values.items()}
    last = {k: int(v.split(b":")[1]) for k, v in world.store.values.items()}
    outputs = {v for _k, v in world.broker.logs[("out", 0)]}
    for key, seen in stored.items():  # outputs before state
        assert all(key + f":{n}".encode() in outputs for n in range(1, seen + 1)), key
    for _k, reply in world.broker.logs[("replies", 0)]:  # replies after state
        offset, seen = map(int, reply.split(b":"))
        key = KEYS[offset % len(KEYS)]
        assert offset <= last.get(key, -1) and seen <= stored[key], reply
    committed = world.committed.get(TP, 0)
    for key in KEYS:  # committed: nothing the store does not hold
        decided = [o for o in range(committed) if KEYS[o % len(KEYS)] == key]
        assert not decided or last.get(key, -1) >= decided[-1], (key, committed)


CRASH_POINTS = list(itertools.product([1, 3, 5], list(Stage)[1:], [1, 2]))


@pytest.mark.parametrize(("batch_number", "stage", "in_flight"), CRASH_POINTS)
def test_a_crash_at_any_stage_leaves_a_state_a_restart_completes(
    batch_number: int, stage: Stage, in_flight: int
) -> None:
    world = World()

    def crash(batch: Batch) -> None:
        if batch.number == batch_number and batch.stage == stage:
            raise Crash(f"batch {batch_number} at {stage.name}")

    async def scenario() -> None:
        crashed = world.runtime(in_flight, crash)
        with pytest.raises((Crash, StreamFailed)):
            await feed(crashed, records_from(0))
        await kill(crashed)
        check_consistent(world)
        restarted = world.runtime(in_flight)  # the crashed one is gone, as after kill -9
        await feed(restarted, records_from(world.committed.get(TP, 0)))
        check_consistent(world)

    asyncio.run(scenario())
    stored = {k: int(v.split(b":")[0]) for k, v in world.store.values.items()}
    assert stored == expected_counts()
    assert world.committed[TP] == RECORDS
    replies = {int(v.split(b":")[0]) for _k, v in world.broker.logs[("replies", 0)]}
    assert replies == set(range(RECORDS))  # every record answered (a few twice)


def test_a_batch_whose_outputs_are_not_acknowledged_fails_the_next_one_too() -> None:
    """Nothing swallows a failure: the batch after it is not written either, nothing is
    committed after it, and the runtime keeps the failure for its poll loop to raise."""
    world = World()
    world.broker.fail["out"] = 9  # the 9th output: batch 3 (4 records a batch, 1 output each)

    async def scenario() -> Runtime:
        runtime = world.runtime(in_flight_max=2)
        with pytest.raises(StreamFailed):
            await feed(runtime, records_from(0))
        return runtime

    runtime = asyncio.run(scenario())
    assert runtime.failure is not None
    assert world.committed.get(TP, 0) <= 2 * BATCH
    assert world.store.values and all(
        int(v.split(b":")[1]) < 2 * BATCH for v in world.store.values.values()
    )  # batches 1 and 2 only
    with pytest.raises(StreamFailed):
        asyncio.run(runtime._commit())


def test_a_stage_cannot_be_skipped_or_repeated() -> None:
    world = World()
    batch = Batch(world.runtime(1), 1, [])
    batch.advance(Stage.DECIDED)
    with pytest.raises(StageError, match="DECIDED → STATE_WRITTEN"):
        batch.advance(Stage.STATE_WRITTEN)
    batch.advance(Stage.OUTPUTS_ACKED)
    with pytest.raises(StageError):
        batch.advance(Stage.OUTPUTS_ACKED)
