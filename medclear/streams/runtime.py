"""The runtime: one consumer group over one input topic, batches, tables, the pipeline.

A job is a handler `async def handle(batch: Batch) -> None`. It reads and writes state
through the batch (`get`, `put`: a table partition is the input record's partition), and
asks for records to be produced: *outputs* (`send`: on the broker before the state is
written) and *replies* (`reply`: sent after it). The runtime completes every batch in
this order, then commits its offsets:

    outputs acknowledged → state: changelog acknowledged, then the store (with the
    changelog offset, one write batch) → replies acknowledged → commit

so after a crash at any point either the input is read again and decided again on the
state before it (the same decision, the same ids, which every consumer dedupes), or the
state has it and a repeat is answered from it. Nothing is committed whose handling is not
complete.

Pipelining (`in_flight_max` > 1): the next batch is decided while this one's
acknowledgements are pending. It reads the state this one wrote (an overlay of the writes
not yet in the store); completions still run strictly in batch order. A handler with side
effects between steps (the sms job) runs unpipelined and calls `await batch.flush()`.

Rebalances: on revocation the batches in flight are finished (outputs, state, replies,
commit) before the partitions go, under the same lock the poll loop holds while it
decides; on assignment each new partition's stores are restored from their changelogs
before any of its records is handled. A failure to finish a batch (the broker gave up an
acknowledgement) ends the process with EXIT_STREAM_FAILED: nothing after it may be
committed, and a restart reads from the last commit.

Membership is static: a member joins its group with `group.instance.id` = its member id
(`worker-N` for the clearing workers), so a member restarted after a crash or a kill -9
takes its partitions back at once, with no rebalance of the others and without waiting
for its session to time out (tests/integration/test_broker_conformance.py, test g).

Fetching: the loop asks for records with a short wait (POLL_WAIT_MS: it also commits
what is finished); the broker holds each fetch until a record comes or `fetch_wait_ms`
passes, so an idle runtime neither spins nor adds latency (kafka_admin.FETCH_WAIT_MS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import (
    DOWNSTREAM_FETCH_WAIT_MS,
    POLL_WAIT_MS,
    ensure_topics,
    new_producer,
    new_reader,
    wait_for_topics,
)
from medclear.infra.topics import changelog_topic
from medclear.streams.changelog import restore
from medclear.streams.store import PartitionStore
from monitoring import metrics

log = structlog.get_logger()

EXIT_STREAM_FAILED = 75  # EX_TEMPFAIL: restart me (a batch could not be completed)
BATCH_RECORDS_MAX = 256  # input records decided together at most
LAG_INTERVAL_S = 2.0
COMMIT_INTERVAL_S = 1.0  # finished offsets are committed at most this often
RESTORE_FETCH_WAIT_MS = 10
NOT_READY_SLEEP_S = 0.01  # the poll loop while the partitions are being restored
Headers = Sequence[tuple[str, bytes]]
Handler = Callable[["Batch"], Awaitable[None]]
StepObserver = Callable[[str, float], None]


@dataclass(frozen=True)
class Produce:
    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    partition: int | None = None


@dataclass
class _Slot:
    """A state write not yet in the store: readable by later batches meanwhile."""

    value: bytes | None
    batch: int


@dataclass
class Batch:
    """One batch of input records and what handling them asks for."""

    runtime: Runtime
    number: int
    records: list[Any]
    outputs: list[Produce] = field(default_factory=list)
    replies: list[Produce] = field(default_factory=list)
    changes: dict[tuple[str, int], dict[bytes, bytes | None]] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset per tp
    sent: list[asyncio.Future[Any]] = field(default_factory=list)

    def get(self, table: str, partition: int, key: bytes) -> bytes | None:
        """The value as of this batch: its own writes, then earlier batches' not yet
        stored, then the store."""
        return self.runtime.read(table, partition, key)

    def put(self, table: str, partition: int, key: bytes, value: bytes | None) -> None:
        self.changes.setdefault((table, partition), {})[key] = value
        self.runtime.overlay(table, partition)[key] = _Slot(value, self.number)

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> None:
        """An output: on the broker before this batch's state is written."""
        self.outputs.append(Produce(topic, value, key, headers, partition))

    def reply(
        self, topic: str, value: bytes | None, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        """A reply: sent once this batch's state is written."""
        self.replies.append(Produce(topic, value, key, headers))

    async def flush(self) -> None:
        """Make everything this batch asked for so far durable now, in order (outputs,
        state, replies); only for a runtime that does not pipeline."""
        if self.runtime.in_flight_max != 1:
            raise RuntimeError("flush() inside a batch needs in_flight_max == 1")
        await self.runtime.hand_over(self)
        await self.runtime.finish(self, commit=False)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.runtime.revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.runtime.assigned(list(assigned))


_READINESS: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def set_ready(part: object, ready: bool) -> None:
    """`medclear_ready` 1 only while every part of this process (each runtime, the
    ClickHouse sink, …: every job when they share a process) is ready."""
    _READINESS[part] = ready
    metrics.READY.set(1 if all(_READINESS.values()) else 0)


class Runtime:
    def __init__(
        self,
        *,
        job: str,
        member_id: str,
        kafka: KafkaAccess,
        topic: str,
        handler: Handler,
        data_dir: Path,
        tables: Sequence[str] = (),
        batch_max: int = BATCH_RECORDS_MAX,
        in_flight_max: int = 1,
        fetch_wait_ms: int = DOWNSTREAM_FETCH_WAIT_MS,
        observe_step: StepObserver | None = None,
        on_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if in_flight_max < 1 or batch_max < 1:
            raise ValueError("in_flight_max and batch_max are at least 1")
        self.job, self.member_id, self.kafka, self.topic = job, member_id, kafka, topic
        self.handler = handler
        self.data_dir = data_dir
        self.tables = tuple(tables)
        self.batch_max, self.in_flight_max = batch_max, in_flight_max
        self.fetch_wait_ms = fetch_wait_ms
        self.observe_step = observe_step
        self.on_ready = on_ready
        self.stores: dict[tuple[str, int], PartitionStore] = {}
        self._overlay: dict[tuple[str, int], dict[bytes, _Slot]] = {}
        self._lock = asyncio.Lock()
        self._completions: deque[asyncio.Task[None]] = deque()
        self._to_commit: dict[TopicPartition, int] = {}  # finished, not yet committed
        self._unacked: list[asyncio.Future[Any]] = []  # replies handed over, not acknowledged
        self._committed_at = 0.0
        self._batches = 0
        self._ready = False
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.reply_producer: AIOKafkaProducer | None = None  # see start()
        self._restorer: AIOKafkaConsumer | None = None
        self.stopping = asyncio.Event()  # set when the process is asked to stop
        set_ready(self, False)

    # ------------------------------------------------------------------ state

    def overlay(self, table: str, partition: int) -> dict[bytes, _Slot]:
        return self._overlay.setdefault((table, partition), {})

    def read(self, table: str, partition: int, key: bytes) -> bytes | None:
        slot = self._overlay.get((table, partition), {}).get(key)
        if slot is not None:
            return slot.value
        store = self.stores.get((table, partition))
        if store is None:
            raise RuntimeError(f"{self.job}: table {table} partition {partition} is not ours")
        return store.get(key)

    def store_items(self, table: str) -> Iterable[tuple[bytes, bytes]]:
        """Every stored key and value of a table, over the partitions assigned now."""
        for (name, _partition), store in list(self.stores.items()):
            if name == table:
                yield from store.items()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # waits for the broker and the topic if they are not there yet (a restart while
        # the broker fails over)
        inputs = (await wait_for_topics(self.kafka, [self.topic]))[self.topic]
        self.producer = new_producer(self.kafka)
        await self.producer.start()
        # Replies have a producer of their own: a producer keeps one request in flight per
        # broker, so on a shared one a batch's replies would wait behind the next batch's
        # events and changelog. The changelog topics are known to the producer before the
        # first batch (_ensure_changelogs), so no output waits for their metadata.
        self.reply_producer = new_producer(self.kafka)
        await self.reply_producer.start()
        # reads a changelog to its end, with ListOffsets between the partitions: short
        # fetch waits, so a held fetch does not delay them (kafka_admin.new_reader)
        self._restorer = new_reader(self.kafka, RESTORE_FETCH_WAIT_MS)
        await self._restorer.start()
        await self._ensure_changelogs(len(inputs))
        self.consumer = AIOKafkaConsumer(
            **self.kafka.options(),
            group_id=self.job,
            group_instance_id=self.member_id,  # static: a restarted member takes its share back
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_max,
            fetch_max_wait_ms=self.fetch_wait_ms,
        )
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        await self.consumer.start()

    async def _ensure_changelogs(self, partitions: int) -> None:
        """A changelog partition for each input partition (changelog.py)."""
        if not self.tables:
            return
        wanted = {changelog_topic(self.job, t): partitions for t in self.tables}
        await ensure_topics(self.kafka, wanted)
        assert self.producer is not None
        for topic in wanted:  # known to the producer before any output waits (see start())
            await self.producer.partitions_for(topic)

    async def stop(self) -> None:
        """Finish what is in flight, commit, leave (static members stay in the group)."""
        async with self._lock:
            await self._drain()
        # at once: a consumer's stop waits for the fetch the broker is holding for it
        await asyncio.gather(
            *(
                client.stop()
                for client in (self.consumer, self._restorer, self.producer, self.reply_producer)
                if client is not None
            ),
            return_exceptions=True,
        )
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        set_ready(self, False)

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll, decide, hand over, until `stopping` is set; then stop cleanly."""
        self.stopping = stopping  # a handler that waits on the outside world watches it
        await self.start()
        consumer = self.consumer
        assert consumer is not None
        lag = asyncio.create_task(self._export_lag(stopping))
        try:
            while not stopping.is_set():
                handled = False
                async with self._lock:
                    if self._ready:  # the broker holds the fetch until records come
                        fetched = await consumer.getmany(
                            timeout_ms=POLL_WAIT_MS, max_records=self.batch_max
                        )
                        if fetched:
                            await self._handle(fetched)
                            handled = True
                if not handled:
                    if self._to_commit and time.monotonic() - self._committed_at >= (
                        COMMIT_INTERVAL_S
                    ):
                        async with self._lock:
                            await self._drain()  # idle: what is finished gets committed
                    if not self._ready:  # partitions being restored, or none assigned
                        await asyncio.sleep(NOT_READY_SLEEP_S)
        finally:
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
            await self.stop()

    # ------------------------------------------------------------------ batches

    async def _handle(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        records = [r for tp in sorted(fetched, key=lambda t: t.partition) for r in fetched[tp]]
        self._batches += 1
        batch = Batch(self, self._batches, records)
        for tp, got in fetched.items():
            batch.offsets[tp] = got[-1].offset + 1
        metrics.STREAM_BATCH_RECORDS.labels(self.job).observe(len(records))
        started = time.perf_counter()
        await self.handler(batch)
        self._observe("decide", time.perf_counter() - started)
        await self.hand_over(batch)
        previous = self._completions[-1] if self._completions else None
        self._completions.append(asyncio.create_task(self._complete(batch, previous)))
        while len(self._completions) >= self.in_flight_max or (
            self._completions and self._completions[0].done()
        ):
            await self._settle_oldest()

    async def hand_over(self, batch: Batch) -> None:
        """Give the batch's outputs to the producer now, in batch order."""
        assert self.producer is not None
        for out in batch.outputs:
            batch.sent.append(
                await self.producer.send(
                    out.topic,
                    out.value,
                    key=out.key,
                    headers=list(out.headers),
                    partition=out.partition,
                )
            )
        batch.outputs.clear()

    async def _settle_oldest(self) -> None:
        task = self._completions.popleft()
        try:
            await task
        except Exception as exc:
            self._fail(exc)

    async def _drain(self) -> None:
        """Every batch in flight finished, and committed."""
        while self._completions:
            await self._settle_oldest()
        if self._to_commit or self._unacked:
            try:
                await self._commit()
            except Exception as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        log.critical(
            "a batch could not be completed; exiting without committing it",
            job=self.job,
            error=f"{type(exc).__name__}: {exc}",
        )
        sys.stderr.flush()
        os._exit(EXIT_STREAM_FAILED)

    async def _complete(self, batch: Batch, previous: asyncio.Task[None] | None) -> None:
        started = time.perf_counter()
        await asyncio.gather(*batch.sent)  # the outputs are on the broker
        batch.sent.clear()
        self._observe("outputs", time.perf_counter() - started)
        if previous is not None:
            with contextlib.suppress(Exception):  # its failure ends the process elsewhere
                await previous
        await self.finish(batch, commit=True)

    async def finish(self, batch: Batch, commit: bool) -> None:
        """State (changelog, then store), replies, and the commit of the batch. Replies
        are handed to the producer here; their acknowledgements are awaited before the
        next commit (at most every COMMIT_INTERVAL_S), not before the next batch's state."""
        await asyncio.gather(*batch.sent)
        batch.sent.clear()
        t0 = time.perf_counter()
        await self._write_state(batch)
        t1 = time.perf_counter()
        assert self.reply_producer is not None
        for r in batch.replies:
            sent = await self.reply_producer.send(
                r.topic, r.value, key=r.key, headers=list(r.headers)
            )
            self._unacked.append(sent)
        batch.replies.clear()
        self._observe("state", t1 - t0)
        if commit:
            for tp, offset in batch.offsets.items():
                self._to_commit[tp] = max(offset, self._to_commit.get(tp, 0))
            if time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
                await self._commit()

    async def _commit(self) -> None:
        """Everything finished so far: replies acknowledged, then the offsets committed."""
        t0 = time.perf_counter()
        unacked, self._unacked = self._unacked, []
        await asyncio.gather(*unacked)
        t1 = time.perf_counter()
        self._observe("replies", t1 - t0)
        assert self.consumer is not None
        mine = self.consumer.assignment()
        offsets = {tp: o for tp, o in self._to_commit.items() if tp in mine}
        self._to_commit.clear()
        self._committed_at = time.monotonic()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # read again and decided again after a restart: harmless
            log.warning("offset commit failed", job=self.job, error=f"{type(exc).__name__}")
        self._observe("commit", time.perf_counter() - t1)

    async def _write_state(self, batch: Batch) -> None:
        if not batch.changes:
            return
        assert self.producer is not None
        sent: list[tuple[tuple[str, int], asyncio.Future[Any]]] = []
        for (table, partition), changes in batch.changes.items():
            topic = changelog_topic(self.job, table)
            for key, value in changes.items():
                # None deletes: a tombstone, which compaction removes in the end
                fut = await self.producer.send(topic, value, key=key, partition=partition)
                sent.append(((table, partition), fut))
        done = await asyncio.gather(*(fut for _where, fut in sent))
        last: dict[tuple[str, int], int] = {}
        for (where, _fut), meta in zip(sent, done, strict=True):
            last[where] = max(last.get(where, -1), meta.offset)
        for where, changes in batch.changes.items():
            store = self.stores.get(where)
            if store is None:
                continue  # revoked meanwhile: the changelog has it for the next owner
            store.apply(changes, last[where] + 1)
            overlay = self._overlay.get(where, {})
            for key in changes:
                slot = overlay.get(key)
                if slot is not None and slot.batch <= batch.number:
                    del overlay[key]
        batch.changes.clear()

    def _observe(self, step: str, seconds: float) -> None:
        metrics.STREAM_STEP_SECONDS.labels(self.job, step).observe(seconds)
        if self.observe_step is not None:
            self.observe_step(step, seconds)

    # ------------------------------------------------------------------ rebalances

    async def revoked(self, revoked: list[TopicPartition]) -> None:
        metrics.STREAM_REBALANCES.labels(self.job, "revoked").inc(len(revoked))
        async with self._lock:
            self._ready = False
            set_ready(self, False)
            await self._drain()  # every batch in flight finished and committed
            for tp in revoked:
                for table in self.tables:
                    store = self.stores.pop((table, tp.partition), None)
                    if store is not None:
                        store.close()
                    self._overlay.pop((table, tp.partition), None)

    async def assigned(self, assigned: list[TopicPartition]) -> None:
        metrics.STREAM_REBALANCES.labels(self.job, "assigned").inc(len(assigned))
        async with self._lock:
            for tp in sorted(assigned, key=lambda t: t.partition):
                for table in self.tables:
                    await self._open_and_restore(table, tp.partition)
            self._ready = bool(assigned)
            log.info(
                "partitions assigned",
                job=self.job,
                partitions=sorted(tp.partition for tp in assigned),
            )
        if self._ready and self.on_ready is not None:
            await self.on_ready()
        set_ready(self, self._ready)

    async def _open_and_restore(self, table: str, partition: int) -> None:
        if (table, partition) in self.stores:
            return
        store = PartitionStore(self.data_dir / table / str(partition))
        self.stores[(table, partition)] = store
        assert self._restorer is not None
        tp = TopicPartition(changelog_topic(self.job, table), partition)
        end = (await self._restorer.end_offsets([tp]))[tp]
        remaining = metrics.STREAM_RESTORE_REMAINING.labels(self.job, table)
        remaining.inc(max(0, end - store.next_offset))
        restored = metrics.STREAM_RESTORED_RECORDS.labels(self.job, table)

        def chunk(n: int) -> None:
            restored.inc(n)
            remaining.dec(n)

        started = time.monotonic()
        applied = await restore(self._restorer, tp, store, chunk)
        remaining.set(0)
        if applied:
            log.info(
                "restored",
                job=self.job,
                table=table,
                partition=partition,
                records=applied,
                seconds=round(time.monotonic() - started, 2),
            )

    async def _export_lag(self, stopping: asyncio.Event) -> None:
        """`medclear_consumer_lag_records`: the broker's high-water mark minus the position
        of every assigned partition."""
        while not stopping.is_set():
            await asyncio.sleep(LAG_INTERVAL_S)
            consumer = self.consumer
            if consumer is None:
                continue
            for tp in consumer.assignment():
                try:
                    position = await consumer.position(tp)
                    highwater = consumer.highwater(tp)
                except Exception:  # a partition mid-rebalance: the next tick
                    continue
                if highwater is not None:
                    metrics.CONSUMER_LAG.labels(self.job, tp.topic, str(tp.partition)).set(
                        max(0, highwater - position)
                    )
