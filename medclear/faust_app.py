"""One way to build medclear's faust apps: the settings every stream job shares."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import aiokafka
import faust
import structlog

from clearing import codec
from medclear import topics
from medclear.settings import Settings
from monitoring import metrics

log = structlog.get_logger()


def make_app(
    app_id: str, member_id: str, settings: Settings, bootstrap: str, partitions: int, **extra: Any
) -> faust.App:
    """A faust app with raw bytes in and out (records are clearing.codec's), acks=all,
    its data under the state directory, and static group membership: a restarted
    process takes its partitions back at once. noida-db never evicts a member killed
    with -9, so a dynamic member would wait forever (docs/ARCHITECTURE.md)."""
    store = settings.table_store if app_id in TABLE_STORE_APPS else "memory"
    if store == "rocksdb":
        _bound_rocksdb_memory()
    datadir = settings.state_dir.resolve() / "data" / member_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        consumer_group_instance_id=member_id,
        datadir=str(datadir),
        broker=f"kafka://{bootstrap}",
        store=f"{store}://",  # rocksdb: one rocksdict DB per table partition
        topic_partitions=partitions,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        **extra,
    )
    _export_lag(app, app_id)
    # changes to faust's own code, each explained where it is made (docs/ARCHITECTURE.md)
    _keep_fetched_records(app)
    _redeliver_after_a_rewind()
    _fetch_what_was_active()
    _flush_means_delivered()
    return app


def _keep_fetched_records(app: faust.App) -> None:
    """No record that faust fetched and counted as read is dropped unseen.

    Found with a trace of the sms job's kill -9 test (docs/ARCHITECTURE.md, "Records
    faust's stream skipped"): after a restart faust resumes the consumer's flow while it
    recovers the tables, so the stream partitions are fetched and their records queued
    for the agents; when recovery completes it seeks the stream partitions to their
    committed offsets and then resumes its flow control, which *clears* the agents'
    queues. The records dropped there were already counted as read (the fetch loop keeps
    a read offset per partition and drops anything below it), so they were neither
    handled nor fetched again, and faust's commit went past them once a later offset was
    acknowledged (offset holes it books as compaction gaps). Three changes close that:

    - resuming the flow leaves the queues as they are; a rebalance still clears them when
      partitions are revoked, before the next assignment seeks;
    - an offset hole in a fetched partition is not booked as acknowledged. medclear's
      stream topics are neither compacted nor transactional, so their offsets have no holes
      of their own; a hole means records went missing, and committing across it would
      lose them. It is logged and counted, and the commit waits below it: a restart reads
      from there again (every job tolerates a redelivery);
    - no commit passes an offset that was not acknowledged (faust's own check lets one
      through at the head)."""
    flow = app.flow_control

    def resume_keeping_queues() -> None:
        flow._suspend.clear()
        flow._resume.set()

    flow.resume = resume_keeping_queues  # type: ignore[method-assign]
    _never_commit_across_holes()


def _wrap_once(owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
    """`owner.name` becomes `wrap(owner.name)`, once a process: the replacement is marked
    `medclear`, so the next app built here (a process or a test may build several) leaves
    it as it is."""
    current = getattr(owner, name)
    if getattr(current, "medclear", False):
        return
    replacement = wrap(current)
    replacement.medclear = True
    setattr(owner, name, replacement)


def _never_commit_across_holes() -> None:
    from faust.transport.consumer import Consumer

    async def refuse_gap(self: Consumer, tp: Any, offset_from: int, offset_to: int) -> None:
        metrics.STREAM_OFFSET_GAPS.labels(tp.topic).inc(offset_to - offset_from)
        log.error("offset hole in a fetched partition; not committing across it",
                  topic=tp.topic, partition=tp.partition, first=offset_from,
                  until=offset_to)  # fmt: skip

    def checking_the_head(booked: Callable[[Consumer, Any], int | None]) -> Any:
        def new_offset(self: Consumer, tp: Any) -> int | None:
            """faust's own check lets one missing offset through at the head of what was
            acknowledged (`min(acked) - committed > 1`, where `committed` is already the
            next offset to read): the record at `committed` must itself be acknowledged
            first."""
            acked, committed = self._acked[tp], self._committed_offset[tp]
            if acked and committed is not None and min(acked) > committed:
                return None
            return booked(self, tp)

        return new_offset

    _wrap_once(Consumer, "_add_gap", lambda _booking: refuse_gap)
    _wrap_once(Consumer, "_new_offset", checking_the_head)


def _redeliver_after_a_rewind() -> None:
    """A record fetched below faust's read offset of its partition is delivered, not dropped.

    faust's fetch loop keeps the last offset it handed over per partition and silently drops
    any record below it, to skip records fetched twice. That offset can be stale after a
    rebalance: in a broker-restart drill run the sms job, sought back to its committed
    offset 7, still held a read offset of 26 and dropped events 7-25 as they came again
    (docs/PERFORMANCE.md, "Fault drills"). How the offset outlived the revocation, which
    clears it, was not traced; the fetch loop writes it after each record it delivers.

    A partition's offsets only go down after a seek, so a record below the read offset
    means the partition was rewound: the read offset is forgotten and the record goes to
    the agents. Every job tolerates a redelivery (the worker answers a repeated command
    from its remembered reply, the sms job and the sink deduplicate, table recovery skips
    offsets it has applied)."""
    from faust.transport.consumer import Consumer

    _wrap_once(Consumer, "getmany", rewinding)


Fetched = Callable[[Any, float], AsyncIterator[tuple[Any, Any]]]


def rewinding(fetched: Fetched) -> Fetched:
    """`fetched` (faust's Consumer.getmany), forgetting the read offset of a partition
    whose next record lies below it."""

    async def getmany(self: Any, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        read_offset = self._read_offset
        async for tp, message in fetched(self, timeout):
            last = read_offset.get(tp)
            if last is not None and message.offset < last:
                metrics.STREAM_REWINDS.labels(tp.topic).inc()
                log.info("partition rewound below faust's read offset; redelivering",
                         topic=tp.topic, partition=tp.partition, offset=message.offset,
                         read_offset=last)  # fmt: skip
                del read_offset[tp]
            yield tp, message

    return getmany


def _fetch_what_was_active() -> None:
    """Each fetch asks for the partitions that were active when it was made, never for all.

    faust hands its consumer thread the live set of active partitions, and aiokafka reads
    an empty set as "every assigned partition". A rebalance pauses everything (the set
    empties) while a fetch is still waiting in the consumer thread; recovery then seeks the
    changelogs to where it starts reading and the fetch returns their records, moving the
    consumer's position to the end. faust drops a fetch that returns while its flow is
    stopped and seeks back only the stream partitions, so recovery waited for changelog
    records the consumer had already passed: the job stayed in recovery for good (the
    broker-restart drill, 1 run in 4; a traced stuck job had every changelog position at
    its highwater, none applied and no record handed to faust's loop). A copy of the set,
    taken when the fetch is made, keeps records of partitions paused meanwhile in aiokafka
    for the next fetch."""
    from faust.transport.consumer import ThreadDelegateConsumer

    _wrap_once(ThreadDelegateConsumer, "_getmany", fetching_a_copy)


Fetch = Callable[[Any, Any, float], Coroutine[Any, Any, Any]]


def fetching_a_copy(fetch: Fetch) -> Fetch:
    """`fetch` (faust's ThreadDelegateConsumer._getmany), given a copy of the active set;
    nothing is fetched when that set is empty."""

    async def getmany(self: Any, active_partitions: Any, timeout: float) -> Any:
        if active_partitions is not None:
            if not active_partitions:
                return {}
            active_partitions = set(active_partitions)
        return await fetch(self, active_partitions, timeout)

    return getmany


def _flush_means_delivered() -> None:
    """The producer's flush returns once every table write made before it is on the broker.

    A table write (`table[key] = value`) is queued in faust's producer buffer, and a
    background task hands the queued records to aiokafka one at a time. faust 0.15.3's
    buffer flush returned as soon as 0.1 s passed without a record handed over, and took
    a record being handed over (out of the queue, aiokafka still waiting for the broker)
    for done. With the broker away for a moment it returned with changelog records still
    queued. Both faust's commit (flush, then commit the offsets) and a rebalance (flush,
    then recovery reads the changelogs up to their highwater) trust it, and so does the sms
    job (in-flight marks before a submit, settlements before the next window). In the
    broker-restart drill the sms job's recovery read a person's row without the settlement
    its last batch had just written; the event, delivered again, sent its SMS twice (5 of
    59 runs, docs/PERFORMANCE.md).

    The replacement waits until the queue is empty, nothing is being handed over, and
    every record handed over has been acknowledged (acks=all) or has failed. A table
    write the broker never took (aiokafka gave up on it) ends the process at once
    (`exit_for_lost_write`): it must not commit past state that is not on the broker, and
    a restart recovers the tables and reads the batch again. Should that exit be replaced
    (a test), this flush and every later one raise."""
    from faust.transport.producer import ProducerBuffer

    _wrap_once(ProducerBuffer, "_send_pending", tracking_deliveries)
    _wrap_once(ProducerBuffer, "flush", flushing_until_delivered)


class ChangelogWriteLost(RuntimeError):
    """A table's changelog record was never acknowledged by the broker."""


EXIT_STATE_NOT_ON_BROKER = 75  # EX_TEMPFAIL: a table write was lost; restart from the broker


def exit_for_lost_write(error: str) -> None:
    """The process leaves at once: its tables hold a write the broker never took, and
    nothing it does from here may be committed. Restarted, it recovers the tables from the
    changelogs and reads its input again from the last commit."""
    log.critical("a table write never reached the broker; exiting", error=error,
                 exit_code=EXIT_STATE_NOT_ON_BROKER)  # fmt: skip
    sys.stderr.flush()
    os._exit(EXIT_STATE_NOT_ON_BROKER)


class _Deliveries:
    """What one producer buffer has handed over and what became of it."""

    def __init__(self, on_lost: Callable[[str], None] = exit_for_lost_write) -> None:
        self.handing_over = 0  # records out of the queue, aiokafka's send not yet returned
        self.unacknowledged: set[asyncio.Future[Any]] = set()
        self.lost: list[str] = []  # why each lost record was lost
        self.on_lost = on_lost

    def watch(self, fut: asyncio.Future[Any]) -> None:
        self.unacknowledged.add(fut)
        fut.add_done_callback(self._settled)

    def _settled(self, fut: asyncio.Future[Any]) -> None:
        self.unacknowledged.discard(fut)
        error = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or error is not None:
            self.lost.append("cancelled" if error is None else repr(error))
            self.on_lost(self.lost[-1])


def _deliveries(buffer: Any) -> _Deliveries:
    found: _Deliveries | None = buffer.__dict__.get("medclear_deliveries")
    if found is None:
        found = buffer.__dict__["medclear_deliveries"] = _Deliveries()
    return found


SendPending = Callable[[Any, Any], Coroutine[Any, Any, None]]


def tracking_deliveries(send_pending: SendPending) -> SendPending:
    """`send_pending` (faust's ProducerBuffer._send_pending), counting the records being
    handed over and watching each one's acknowledgement from the moment it leaves the
    queue. A record aiokafka refused outright
    is lost too (faust's own task would have died with it, and every later write with it)."""

    async def handing_over(self: Any, fut: asyncio.Future[Any]) -> None:
        deliveries = _deliveries(self)
        deliveries.watch(fut)
        deliveries.handing_over += 1
        try:
            await send_pending(self, fut)
        except Exception as exc:  # the record is lost: see _Deliveries
            if not fut.done():
                fut.set_exception(exc)
        finally:
            deliveries.handing_over -= 1

    return handing_over


def flushing_until_delivered(bounded_flush: Callable[[Any], Any]) -> Any:
    """A replacement for faust's ProducerBuffer.flush (`bounded_flush`), which still serves
    the threaded producer (medclear does not use it).

    It waits until the queue is empty, nothing is being handed over, and nothing handed
    over is unacknowledged. (A version that waited only for the records owed when it
    began failed the broker-restart drill in its first fresh-stack run, the settlement
    job never committing one partition; not understood, so not kept. This one passed 35
    runs of 35. Under steady writes a commit may wait longer: ~0.75 s while seeding.)"""

    async def flush(self: Any) -> None:
        if self.app is not None and self.app.conf.producer_threaded:
            await bounded_flush(self)
            return
        deliveries = _deliveries(self)
        while self.size or deliveries.handing_over:
            if self.state != "running":
                raise RuntimeError("Cannot flush: Producer not Running")
            self.message_sent.clear()
            await self.message_sent.wait()
        if deliveries.unacknowledged:
            await asyncio.wait(set(deliveries.unacknowledged))
        if deliveries.lost:
            raise ChangelogWriteLost(
                f"{len(deliveries.lost)} table write(s) not acknowledged by the broker, "
                f"first: {deliveries.lost[0]}"
            )

    return flush


def run_worker(app: faust.App) -> None:
    """Run `app` in the foreground until SIGTERM, logging warnings and up.

    faust's worker, asked for WARNING, still sets the root logger to DEBUG and hangs a
    terminal spinner on it that turns once per record: every aiokafka debug line (one per
    fetch request) is then built and handled, and the spinner stays attached after start-up.
    py-spy of a recovering clearing worker: ~23 % of its main thread and ~70 % of the
    consumer thread's busy time in that logging (docs/PERFORMANCE.md). No spinner: the root
    logger keeps WARNING and debug records are dropped where they are made.

    MEDCLEAR_FAUST_LOGLEVEL=INFO shows faust's own account of rebalances and table
    recovery (highwaters, where reading starts) when a job is being diagnosed. SIGUSR1
    makes the process write every thread's and asyncio task's stack into its log (mode's
    worker)."""
    level = os.environ.get("MEDCLEAR_FAUST_LOGLEVEL", "WARNING")
    worker = faust.Worker(app, loglevel=level, quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()


# The apps MEDCLEAR_TABLE_STORE applies to: the clearing worker (its persons table is the
# state that must fit, issue 7). The others keep memory: faust's RocksDB store asserts a
# current event on every write, and the sms job writes its table after a batch, outside one.
TABLE_STORE_APPS = frozenset({"medclear-clearing"})

# faust opens one RocksDB per table partition with 64 MiB x 3 write buffers and a 2 GiB
# block cache each: 6 partitions could hold ~13 GiB. These bound a worker's store to
# ~0.6 GiB (docs/ARCHITECTURE.md decision 5); the files hold the rest.
ROCKSDB_WRITE_BUFFER_BYTES = 16 * 1024**2
ROCKSDB_WRITE_BUFFERS = 2
ROCKSDB_BLOCK_CACHE_BYTES = 64 * 1024**2


def _bound_rocksdb_memory() -> None:
    from faust.stores.rocksdb import RocksDBOptions

    RocksDBOptions.write_buffer_size = ROCKSDB_WRITE_BUFFER_BYTES
    RocksDBOptions.max_write_buffer_number = ROCKSDB_WRITE_BUFFERS
    RocksDBOptions.block_cache_size = ROCKSDB_BLOCK_CACHE_BYTES


READY_INTERVAL_S = 0.5


def export_readiness(app: faust.App) -> None:
    """`medclear_ready` 1 once the app's tables are recovered and no rebalance is under way
    (what `medclear up` and the restarts wait for)."""

    @app.timer(READY_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def readiness() -> None:
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        metrics.READY.set(1 if recovered and not app.rebalancing else 0)


LAG_INTERVAL_S = 2.0


def _export_lag(app: faust.App, job: str) -> None:
    """`medclear_consumer_lag_records{stream_job,topic,partition}`: records on the broker that
    this job has not yet read, per assigned partition (high-water mark − position)."""

    @app.timer(LAG_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def consumer_lag() -> None:
        consumer = app.consumer
        for tp in consumer.assignment():
            try:
                position = await consumer.position(tp)
                highwater = consumer.highwater(tp)
            except Exception:  # a partition mid-rebalance: the next tick
                continue
            if position is None or highwater is None:
                continue
            metrics.CONSUMER_LAG.labels(job, tp.topic, str(tp.partition)).set(
                max(0, highwater - position)
            )


def events_topic(app: faust.App, settings: Settings) -> faust.TopicT:
    """`medclear.events` as the stream jobs read it: raw bytes, not created by faust."""
    return app.topic(topics.EVENTS.name, key_type=bytes, value_type=bytes,
                     partitions=settings.event_partitions, internal=False)  # fmt: skip


class SkippedRecords:
    """Reads back what faust's stream skipped.

    Seen in the sms job's kill -9 test (in ~1 run of 3): right after a restart, between two
    batches, the stream went on 2-64 offsets further in a partition than the record it
    had handed over last, and faust committed across the hole, so those events were never
    processed (their SMS lost). The cause, faust clearing its queues after recovery's
    seek, is closed in `_keep_fetched_records`; this stays as the sms job's second line,
    and the kill -9 test asserts it never acts. Within one run a partition's offsets must
    follow each other;
    a forward jump is counted (`medclear_stream_skipped_records_total`), logged, and the
    skipped records are read straight from the broker and put in front of the record after
    the hole, so the job sees the partition in order. A jump back (a redelivery) is fine.
    Offsets of a topic that is not compacted and not written in transactions have no
    holes of their own; medclear.events is such a topic."""

    READ_TIMEOUT_S = 30.0

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.last: dict[int, int] = {}  # partition → last offset handed to the job

    async def values(self, events: Sequence[Any]) -> list[bytes]:
        """The batch's record values, with whatever the stream skipped put back in."""
        values: list[bytes] = []
        for event in events:
            partition, offset = event.message.partition, event.message.offset
            before = self.last.get(partition)
            if before is not None and offset > before + 1:
                metrics.STREAM_SKIPPED.labels(self.topic).inc(offset - before - 1)
                log.error("stream skipped records; reading them back", topic=self.topic,
                          partition=partition, first=before + 1, until=offset)  # fmt: skip
                values += await self._read(partition, before + 1, offset)
            if before is None or offset > before:
                self.last[partition] = offset
            values.append(event.value)
        return values

    async def _read(self, partition: int, first: int, until: int) -> list[bytes]:
        """Records [first, until) of one partition, from a consumer of no group."""
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                             enable_auto_commit=False)  # fmt: skip
        await consumer.start()
        try:
            tp = aiokafka.TopicPartition(self.topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, first)
            got: dict[int, bytes] = {}
            deadline = time.monotonic() + self.READ_TIMEOUT_S
            while len(got) < until - first:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.topic}[{partition}] {first}..{until - 1} not read")
                fetched = await consumer.getmany(tp, timeout_ms=500)
                for record in fetched.get(tp, []):
                    if first <= record.offset < until:
                        got[record.offset] = record.value or b""
            return [got[o] for o in sorted(got)]
        finally:
            await consumer.stop()


def decode_event(raw: bytes | None) -> Any | None:
    """A record of `medclear.events`, or None — counted in
    `medclear_undecodable_records_total` — when it does not decode."""
    try:
        return codec.decode(raw or b"")
    except codec.CodecError:
        metrics.UNDECODABLE.labels(topics.EVENTS.name).inc()
        return None
