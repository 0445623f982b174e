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
before any of its records is handled.

Every batch carries the stage its completion has reached (stream_runtime/batch.py:
decided → outputs acknowledged → state written → replies acknowledged → committable), and
each step asserts the stage before it. A batch that cannot be completed (the broker gave
up an acknowledgement) fails every batch after it: `run` raises StreamFailed, nothing is
committed any more, and the host (stream_runtime/process.py) ends the process with
EXIT_STREAM_FAILED; a restart reads from the last commit. The producers and the stores
are given by factories (`producer_factory`, `store_factory`), so a test can run the
runtime on its own and crash it between any two stages
(tests/unit/test_runtime_stages.py).

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
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
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
from monitoring import metrics
from stream_runtime.batch import (
    Batch,
    Handler,
    Producer,
    Slot,
    Stage,
    StageHook,
    StepObserver,
    Store,
    StreamFailed,
)
from stream_runtime.changelog import restore
from stream_runtime.store import PartitionStore

log = structlog.get_logger()

BATCH_RECORDS_MAX = 256  # input records decided together at most
LAG_INTERVAL_S = 2.0
COMMIT_INTERVAL_S = 1.0  # finished offsets are committed at most this often
RESTORE_FETCH_WAIT_MS = 10
NOT_READY_SLEEP_S = 0.01  # the poll loop while the partitions are being restored
STOP_AFTER_FAILURE_S = 10.0  # after a failure, the clients get this long to stop


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
        producer_factory: Callable[[KafkaAccess], Producer] = new_producer,
        store_factory: Callable[[Path], Store] = PartitionStore,
        on_stage: StageHook | None = None,
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
        self.producer_factory, self.store_factory = producer_factory, store_factory
        self.on_stage = on_stage
        self.stores: dict[tuple[str, int], Store] = {}
        self._overlay: dict[tuple[str, int], dict[bytes, Slot]] = {}
        self._lock = asyncio.Lock()
        self._committing = asyncio.Lock()
        self._completions: deque[asyncio.Task[None]] = deque()
        self._replying: deque[Batch] = deque()  # state written, replies not yet acknowledged
        self._to_commit: dict[TopicPartition, int] = {}  # committable, not yet committed
        self._committed_at = 0.0
        self._batches = 0
        self._ready = False
        self.failure: StreamFailed | None = None  # set once: nothing is committed after it
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: Producer | None = None
        self.reply_producer: Producer | None = None  # see start()
        self._restorer: AIOKafkaConsumer | None = None
        self.stopping = asyncio.Event()  # set when the process is asked to stop
        set_ready(self, False)

    # ------------------------------------------------------------------ state

    def overlay(self, table: str, partition: int) -> dict[bytes, Slot]:
        return self._overlay.setdefault((table, partition), {})

    def read(self, table: str, partition: int, key: bytes) -> bytes | None:
        slot = self._overlay.get((table, partition), {}).get(key)
        if slot is not None:
            return slot.value
        store = self.stores.get((table, partition))
        if store is None:
            raise KeyError(f"{self.job}: table {table} partition {partition} is not ours")
        return store.get(key)

    def store_items(self, table: str) -> Iterable[tuple[bytes, bytes]]:
        """Every (key, value) of a table over the assigned partitions (stored values only)."""
        for (name, _partition), store in list(self.stores.items()):
            if name == table:
                yield from store.items()

    def reached(self, batch: Batch) -> None:
        """A batch entered a stage (Batch.advance): the test hook, if any, sees it."""
        if self.on_stage is not None:
            self.on_stage(batch)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # waits for the broker and the topic if they are not there yet (a restart while
        # the broker fails over)
        inputs = (await wait_for_topics(self.kafka, [self.topic]))[self.topic]
        self.producer = self.producer_factory(self.kafka)
        await self.producer.start()
        # Replies have a producer of their own: a producer keeps one request in flight per
        # broker, so on a shared one a batch's replies would wait behind the next batch's
        # events and changelog. The changelog topics are known to the producer before the
        # first batch (_ensure_changelogs), so no output waits for their metadata.
        self.reply_producer = self.producer_factory(self.kafka)
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
        """Finish what is in flight, commit, leave (static members stay in the group).
        After a failure nothing is finished or committed: the clients stop, within
        STOP_AFTER_FAILURE_S."""
        if self.failure is None:
            async with self._lock:
                with contextlib.suppress(StreamFailed):  # recorded in self.failure
                    await self._drain()
        clients = [
            c
            for c in (self.consumer, self._restorer, self.producer, self.reply_producer)
            if c is not None
        ]
        # at once: a consumer's stop waits for the fetch the broker is holding for it
        stopped = asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        if self.failure is None:
            await stopped
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped, STOP_AFTER_FAILURE_S)
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        set_ready(self, False)

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll, decide, hand over, until `stopping` is set; then stop cleanly. Raises
        StreamFailed when a batch could not be completed."""
        self.stopping = stopping  # a handler that waits on the outside world watches it
        await self.start()
        lag = asyncio.create_task(self._export_lag(stopping))
        try:
            while not stopping.is_set():
                if not await self._poll_once():
                    await self._idle()
                if self.failure is not None:  # found by a rebalance or a completion
                    raise self.failure
        finally:
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag
            await self.stop()
        if self.failure is not None:  # the last batches failed while stopping
            raise self.failure

    async def _poll_once(self) -> bool:
        """Fetch (the broker holds the fetch until records come) and handle one batch;
        False when there was nothing to handle."""
        consumer = self.consumer
        assert consumer is not None
        async with self._lock:
            if not self._ready:
                return False
            fetched = await consumer.getmany(timeout_ms=POLL_WAIT_MS, max_records=self.batch_max)
            if not fetched:
                return False
            await self._handle(fetched)
            return True

    async def _idle(self) -> None:
        pending = self._to_commit or self._replying or self._completions
        if pending and time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            async with self._lock:
                await self._drain()  # idle: what is finished gets committed
        if not self._ready:  # partitions being restored, or none assigned
            await asyncio.sleep(NOT_READY_SLEEP_S)

    # ------------------------------------------------------------------ batches

    async def _handle(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Decide a batch, hand its outputs over, and queue its completion; completions
        run in batch order, at most in_flight_max of them at once."""
        records = [r for tp in sorted(fetched, key=lambda t: t.partition) for r in fetched[tp]]
        self._batches += 1
        batch = Batch(self, self._batches, records)
        for tp, got in fetched.items():
            batch.offsets[tp] = got[-1].offset + 1
        metrics.STREAM_BATCH_RECORDS.labels(self.job).observe(len(records))
        started = time.perf_counter()
        await self.handler(batch)
        self._observe("decide", time.perf_counter() - started)
        await self._hand_over(batch)
        batch.advance(Stage.DECIDED)
        previous = self._completions[-1] if self._completions else None
        self._completions.append(asyncio.create_task(self._complete(batch, previous)))
        while len(self._completions) >= self.in_flight_max or (
            self._completions and self._completions[0].done()
        ):
            await self._settle_oldest()

    async def _hand_over(self, batch: Batch) -> None:
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
            raise self._failed(exc) from exc

    async def _drain(self) -> None:
        """Every batch in flight completed, and committed."""
        while self._completions:
            await self._settle_oldest()
        if self._to_commit or self._replying:
            try:
                await self._commit()
            except Exception as exc:
                raise self._failed(exc) from exc

    def _failed(self, exc: BaseException) -> StreamFailed:
        """Record the first failure (nothing is committed after it) and return it."""
        if self.failure is None:
            log.critical(
                "a batch could not be completed; nothing after it is committed",
                job=self.job,
                error=f"{type(exc).__name__}: {exc}",
            )
            failure = exc if isinstance(exc, StreamFailed) else StreamFailed(f"{self.job}: {exc}")
            self.failure = failure
        return self.failure

    async def _complete(self, batch: Batch, previous: asyncio.Task[None] | None) -> None:
        """Outputs acknowledged; then, once the batch before is complete (its failure is
        this batch's too: nothing after a failed batch is written), the state and the
        replies."""
        started = time.perf_counter()
        await asyncio.gather(*batch.sent)
        batch.sent.clear()
        batch.advance(Stage.OUTPUTS_ACKED)
        self._observe("outputs", time.perf_counter() - started)
        if previous is not None:
            await previous
        t0 = time.perf_counter()
        await self._write_state(batch)
        batch.advance(Stage.STATE_WRITTEN)
        self._observe("state", time.perf_counter() - t0)
        batch.reply_acks += await self._send_replies(batch)
        self._replying.append(batch)
        if time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            await self._commit()

    async def _send_replies(self, batch: Batch) -> list[asyncio.Future[Any]]:
        """Hand the batch's replies to the reply producer; their acknowledgements are
        awaited before the next commit (at most every COMMIT_INTERVAL_S), not before the
        next batch's state."""
        assert self.reply_producer is not None
        acks = [
            await self.reply_producer.send(r.topic, r.value, key=r.key, headers=list(r.headers))
            for r in batch.replies
        ]
        batch.replies.clear()
        return acks

    async def flush(self, batch: Batch) -> None:
        """Batch.flush: outputs, state and replies asked for so far, durable now (only
        for a runtime that does not pipeline); the batch's stage does not move."""
        if self.in_flight_max != 1:
            raise RuntimeError("flush() inside a batch needs in_flight_max == 1")
        await self._hand_over(batch)
        await asyncio.gather(*batch.sent)
        batch.sent.clear()
        await self._write_state(batch)
        await asyncio.gather(*await self._send_replies(batch))

    async def _commit(self) -> None:
        """Every batch whose state is written: its replies acknowledged, then its offsets
        committed with the others'. One commit at a time (a completion and the poll loop
        may both ask): a batch's offsets are never committed before its replies are
        acknowledged, nor before the batches ahead of it."""
        async with self._committing:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        if self.failure is not None:
            raise self.failure
        t0 = time.perf_counter()
        while self._replying:
            batch = self._replying.popleft()
            await asyncio.gather(*batch.reply_acks)
            batch.reply_acks.clear()
            batch.advance(Stage.REPLIES_ACKED)
            batch.advance(Stage.COMMITTABLE)
            for tp, offset in batch.offsets.items():
                self._to_commit[tp] = max(offset, self._to_commit.get(tp, 0))
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
        """The batch's changes: on the changelog (acknowledged), then in the store with the
        changelog offset after them."""
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
            # every batch in flight completed and committed; a failure is kept in
            # self.failure for the poll loop to raise (not raised into aiokafka)
            with contextlib.suppress(StreamFailed):
                await self._drain()
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
        store = self.store_factory(self.data_dir / table / str(partition))
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
