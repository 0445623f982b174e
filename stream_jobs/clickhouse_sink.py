"""The ClickHouse sink: every record of `medclear.events` becomes one row of `events`.

One process, three feeds, each with its own consumer group and the same batching rules:
events (the primary: migrations, READY and the lag gauges follow it), alerts and SMS
outcomes. Each feed is a plain aiokafka consumer with manual commits, not the stream
runtime (it needs no state, and its batches follow ClickHouse's insert size, not the
runtime's): the offsets committed are exactly those of rows ClickHouse has acknowledged,
and nothing else commits behind the job's back. It uses static membership
(`clickhouse-sink-0`), as every job does: a restarted sink takes its partitions back at
once.

- Batches are bounded by size (MEDCLEAR_CLICKHOUSE_SINK_BATCH_ROWS, 5,000) and time
  (MEDCLEAR_CLICKHOUSE_SINK_BATCH_WAIT_MS, 200 ms from the batch's first record); rows
  go to ClickHouse as parameters of one INSERT per batch (clickhouse-driver, native
  protocol), run in a thread so that heartbeats go on.
- ClickHouse down: the partitions are paused, nothing is committed, and the same batch
  is retried with a back-off of 0.1 s doubling to 2 s; then the backlog is read from the
  broker. A rebalance drops the pending batch and seeks back to the committed offsets.
- Exactly one row per event id: a batch retried after a timeout, or records redelivered
  after a restart, are inserted again with the same event ids. `events` is a
  ReplacingMergeTree ORDER BY event_id (PARTITION BY the month of the event's day, so
  duplicates share a partition), and every query reads `events FINAL` (stream_jobs/ch.py).
  A materialised view into a SummingMergeTree was rejected: each duplicate insert would
  add to it. Tested by re-publishing every event, and by a second consumer group reading
  from offset 0.
- A record that is not a decodable event is counted
  (`medclear_clickhouse_sink_skipped_total`, by reason), logged by partition and offset
  (never its content) and skipped: its offset is committed with its batch.
- Migrations (stream_jobs/schema) run at start; READY is 1 once they have run and the
  consumer has partitions, and `medclear up` waits for it.

Metrics: rows, batches, insert seconds, retries, skipped records by reason, and the lag:
`medclear_clickhouse_sink_lag_seconds` is the age (Kafka timestamp) of the oldest event
read but not yet in ClickHouse, 0 when the pending batch is empty;
`medclear_clickhouse_sink_lag_records` is end offsets minus inserted offsets.

Throughput (one process, on a 2-core machine shared with other test runs): about
7,000–7,700 rows/s, most of the cost in `clearing.codec.decode` (~0.1–0.4 ms a record); a
20,000-event burst was in ClickHouse 2.8 s after its first send (lag at most 2.2 s);
after a 7 s outage the backlog was in 3.3 s after ClickHouse was ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from clickhouse_driver import Client

from clearing import codec
from clearing.abnormal import Alert
from clearing.model import Event
from clearing.redact import CardTokens
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import DOWNSTREAM_FETCH_WAIT_MS, POLL_WAIT_MS, wait_for_topics
from medclear.infra.settings import Settings
from medclear.infra.tokens import load_card_tokens
from monitoring import metrics
from stream_jobs import ch, jobs
from stream_runtime.runtime import set_ready

log = structlog.get_logger(process="clickhouse-sink")

GROUP_ID = jobs.KAFKA["clickhouse-sink"].prefix
MEMBER_ID = "clickhouse-sink-0"  # static membership (streams/runtime.py)
RETRY_BACKOFF_S_MIN = 0.1
RETRY_BACKOFF_S_MAX = 2.0  # a returning ClickHouse is noticed within 2 s
LAG_REFRESH_S = 1.0
STOP_FLUSH_ATTEMPTS_MAX = 3  # on SIGTERM: try the pending batch this often, then leave it
MIGRATION_POLL_S = 0.05  # the other sinks start once the first has migrated


def clickhouse_url(settings: Settings) -> str:
    """Where to write (`medclear serve` fills it in from the running stack if unset)."""
    if not settings.clickhouse_url:
        raise ValueError("no ClickHouse to write to: set MEDCLEAR_CLICKHOUSE_URL")
    return settings.clickhouse_url


@dataclasses.dataclass
class Batch:
    """Rows read but not yet in ClickHouse, and the offsets that commit them."""

    epoch: int  # the assignment they were read under
    rows: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    next_offsets: dict[TopicPartition, int] = dataclasses.field(default_factory=dict)
    oldest_ms: int | None = None  # Kafka timestamp of the oldest record (lag)
    started: float = 0.0  # monotonic time of the first record

    @property
    def empty(self) -> bool:
        return not self.next_offsets


def classify(raw: bytes | None) -> Event | str:
    """The event in a record's value, or why it is skipped ("undecodable", "not_event")."""
    if raw is None:
        return "undecodable"
    try:
        record = codec.decode(raw)
    except codec.CodecError:
        return "undecodable"
    if not isinstance(record, ch.EVENT_TYPES):
        return "not_event"
    event: Event = record
    return event


RowOf = Callable[[bytes | None, CardTokens], "tuple[Any, ...] | str"]


def event_row_of(raw: bytes | None, tokens: CardTokens) -> tuple[Any, ...] | str:
    found = classify(raw)
    return found if isinstance(found, str) else ch.event_row(found, tokens)


def alert_row_of(raw: bytes | None, tokens: CardTokens) -> tuple[Any, ...] | str:
    try:
        record = codec.decode(raw or b"")
    except codec.CodecError:
        return "undecodable"
    return ch.alert_row(record, tokens) if isinstance(record, Alert) else "not_alert"


def sms_outcome_row_of(raw: bytes | None, _tokens: CardTokens) -> tuple[Any, ...] | str:
    try:
        return ch.sms_outcome_row(json.loads(raw or b""))
    except (ValueError, KeyError, TypeError):
        return "undecodable"


@dataclasses.dataclass(frozen=True, slots=True)
class Feed:
    """One topic into one table: the records' row mapping and the INSERT."""

    topic: str
    table: str
    insert_sql: str
    row_of: RowOf
    primary: bool = False  # READY and the lag gauges follow the events feed only

    @property
    def group_id(self) -> str:
        return GROUP_ID if self.primary else f"{GROUP_ID}-{self.table}"

    @property
    def member_id(self) -> str:
        return MEMBER_ID if self.primary else f"{MEMBER_ID}-{self.table}"


EVENTS_FEED = Feed(topics.EVENTS.name, "events", ch.INSERT_SQL, event_row_of, primary=True)
ALERTS_FEED = Feed(topics.ALERTS.name, "alerts", ch.ALERTS_INSERT_SQL, alert_row_of)
SMS_OUTCOMES_FEED = Feed(
    topics.SMS_OUTCOMES.name, "sms_outcomes", ch.SMS_OUTCOMES_INSERT_SQL, sms_outcome_row_of
)
FEEDS = (EVENTS_FEED, ALERTS_FEED, SMS_OUTCOMES_FEED)


class _Assignments(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: ClickHouseSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # The pending batch may hold records of partitions that go to someone else: it is
        # dropped (its offsets are not committed) and re-read from the committed offsets.
        self.sink.epoch += 1
        if self.sink.feed.primary:
            set_ready(self.sink, False)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.sink.epoch += 1
        self.sink.assigned = set(assigned)
        if self.sink.feed.primary:
            set_ready(self.sink, bool(assigned) and self.sink.migrated)
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))


class ClickHouseSink:
    def __init__(
        self,
        kafka: KafkaAccess,
        url: str,
        tokens: CardTokens,
        *,
        database: str = "medclear",
        topic: str = topics.EVENTS.name,
        group_id: str = GROUP_ID,
        member_id: str | None = MEMBER_ID,
        feed: Feed = EVENTS_FEED,
        batch_rows_max: int = 5_000,
        batch_wait_ms: int = 200,
    ) -> None:
        if batch_rows_max < 1 or batch_wait_ms < 1:
            raise ValueError("batch bounds are positive")
        self.kafka, self.url, self.tokens, self.database = kafka, url, tokens, database
        self.feed = feed
        if feed is not EVENTS_FEED:  # another feed: its own topic and consumer group
            topic, group_id, member_id = feed.topic, feed.group_id, feed.member_id
        self.topic, self.group_id, self.member_id = topic, group_id, member_id
        self.batch_rows_max, self.batch_wait_s = batch_rows_max, batch_wait_ms / 1000
        self.epoch = 0
        self.assigned: set[TopicPartition] = set()
        self.migrated = False
        self.inserted_to: dict[TopicPartition, int] = {}  # next offset not yet in ClickHouse
        self.stopping = asyncio.Event()
        if feed.primary:
            set_ready(self, False)
        self._client: Client | None = None
        self._lag_checked = 0.0

    # -------------------------------------------------------------- ClickHouse, blocking
    def _ch(self) -> Client:
        if self._client is None:
            self._client = ch.connect(self.url, self.database)
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client = None

    def _migrate(self) -> list[str]:
        return ch.migrate(self._ch())

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        self._ch().execute(self.feed.insert_sql, rows)

    async def _with_retry(self, what: str, call: Callable[[], Any], batch: Batch | None) -> bool:
        """Run a blocking ClickHouse call in a thread until it succeeds (True), or until
        the batch was read under an assignment that no longer holds or the sink stops
        with nothing to save (False)."""
        backoff_s = RETRY_BACKOFF_S_MIN
        attempts = 0
        while True:
            try:
                await asyncio.to_thread(call)
                return True
            except Exception as exc:  # the driver raises socket, EOF and server errors
                self._drop_client()
                metrics.CLICKHOUSE_SINK_RETRIES.inc()
                attempts += 1
                log.warning(
                    f"{what} failed, retrying",
                    error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    attempt=attempts,
                    backoff_s=backoff_s,
                )
            if self.stopping.is_set() and attempts >= STOP_FLUSH_ATTEMPTS_MAX:
                return False
            await asyncio.sleep(backoff_s)
            backoff_s = min(RETRY_BACKOFF_S_MAX, backoff_s * 2)
            if batch is not None:
                self._lag_from(batch)
                if batch.epoch != self.epoch:
                    return False

    # -------------------------------------------------------------- lag
    def _lag_from(self, batch: Batch) -> None:
        if not self.feed.primary:
            return
        if batch.oldest_ms is None:
            metrics.CLICKHOUSE_SINK_LAG_SECONDS.set(0)
        else:
            age_s = max(0.0, time.time() - batch.oldest_ms / 1000)
            metrics.CLICKHOUSE_SINK_LAG_SECONDS.set(age_s)

    async def _refresh_lag_records(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._lag_checked < LAG_REFRESH_S or not self.assigned:
            return
        self._lag_checked = now
        partitions = sorted(self.assigned, key=lambda tp: tp.partition)
        try:
            behind = 0
            for tp in partitions:
                # the high-water mark of the last fetch answer: no request, which would
                # wait behind the fetch the broker holds on this connection
                end = consumer.highwater(tp)
                if end is None:
                    continue
                done = self.inserted_to.get(tp)
                if done is None:
                    committed = await consumer.committed(tp)
                    done = committed if committed is not None else 0
                    self.inserted_to[tp] = done
                behind += max(0, end - done)
        except KafkaError as exc:
            log.warning("end offsets unavailable", error=type(exc).__name__)
            return
        if self.feed.primary:
            metrics.CLICKHOUSE_SINK_LAG_RECORDS.set(behind)

    # -------------------------------------------------------------- the loop
    def _add(self, batch: Batch, tp: TopicPartition, record: Any) -> None:
        found = self.feed.row_of(record.value, self.tokens)
        if isinstance(found, str):
            metrics.CLICKHOUSE_SINK_SKIPPED.labels(found).inc()
            if found == "undecodable":
                metrics.UNDECODABLE.labels(tp.topic).inc()
            log.warning(
                "record skipped",
                reason=found,
                partition=tp.partition,
                offset=record.offset,
                size=len(record.value or b""),
            )
        else:
            batch.rows.append(found)
        if batch.empty:
            batch.started = time.monotonic()
        batch.next_offsets[tp] = record.offset + 1
        stamp = record.timestamp if record.timestamp and record.timestamp > 0 else None
        if stamp is None and not isinstance(found, str):
            stamp = int(found[3])  # every table's fourth column is at_ms
        if stamp is not None and (batch.oldest_ms is None or stamp < batch.oldest_ms):
            batch.oldest_ms = stamp

    async def _flush(self, consumer: AIOKafkaConsumer, batch: Batch) -> bool:
        """Insert the batch (retrying), then commit its offsets. False if it was dropped."""
        if batch.empty:
            return True
        paused = [tp for tp in consumer.assignment() if tp not in consumer.paused()]
        consumer.pause(*paused)  # the broker keeps the backlog while ClickHouse is away
        t0 = time.perf_counter()
        try:
            if batch.rows:
                rows = batch.rows
                if not await self._with_retry("insert", lambda: self._insert(rows), batch):
                    log.info("batch dropped: assignment changed or stopping", rows=len(rows))
                    return False
                metrics.CLICKHOUSE_SINK_INSERT_SECONDS.observe(time.perf_counter() - t0)
                metrics.CLICKHOUSE_SINK_ROWS.inc(len(rows))
                metrics.CLICKHOUSE_SINK_BATCHES.inc()
            if batch.epoch != self.epoch:
                return False  # in ClickHouse, but the partitions moved: the new owner re-reads
            try:
                await consumer.commit(dict(batch.next_offsets))
            except KafkaError as exc:  # redelivery follows; the rows dedupe by event id
                log.warning("offset commit failed", error=f"{type(exc).__name__}: {exc}")
                return False
            self.inserted_to.update(batch.next_offsets)
            return True
        finally:
            with contextlib.suppress(Exception):
                consumer.resume(*[tp for tp in paused if tp in consumer.assignment()])

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        """Back to the committed offsets of every assigned partition: after a rebalance,
        records fetched but not inserted must be read again, not skipped."""
        for tp in consumer.assignment():
            committed = await consumer.committed(tp)
            # nothing committed: from offset 0, or (auto_offset_reset earliest) the log's
            # start if records before it are gone. Not seek_to_beginning, which waits for
            # a ListOffsets answer behind the fetch the broker holds on this connection
            consumer.seek(tp, committed if committed is not None else 0)
            self.inserted_to.pop(tp, None)

    async def run(self) -> None:
        if not await self._with_retry("migrations", self._migrate, None):
            return  # asked to stop before ClickHouse answered
        self.migrated = True
        log.info("migrations done", database=self.database)
        await wait_for_topics(self.kafka, [self.topic])  # started beside its broker: waits
        consumer = AIOKafkaConsumer(
            **self.kafka.options(),
            group_id=self.group_id,
            group_instance_id=self.member_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_rows_max,
            fetch_max_wait_ms=DOWNSTREAM_FETCH_WAIT_MS,
        )
        consumer.subscribe([self.topic], listener=_Assignments(self))
        await consumer.start()
        seen_epoch = -1
        batch = Batch(self.epoch)
        try:
            while not self.stopping.is_set():
                if seen_epoch != self.epoch:
                    seen_epoch = self.epoch
                    batch = Batch(self.epoch)
                    await self._rewind(consumer)
                wait_s = self.batch_wait_s
                if not batch.empty:
                    wait_s = max(0.0, batch.started + self.batch_wait_s - time.monotonic())
                # no longer than the batch may wait; at once if records are there
                fetched = await consumer.getmany(
                    timeout_ms=max(1, min(POLL_WAIT_MS, int(wait_s * 1000))),
                    max_records=self.batch_rows_max - len(batch.rows),
                )
                if seen_epoch != self.epoch:
                    continue  # a rebalance ran meanwhile: re-read from the committed offsets
                for tp, records in fetched.items():
                    for record in records:
                        self._add(batch, tp, record)
                full = len(batch.rows) >= self.batch_rows_max
                due = not batch.empty and time.monotonic() >= batch.started + self.batch_wait_s
                if full or due:
                    self._lag_from(batch)
                    await self._flush(consumer, batch)
                    batch = Batch(self.epoch)
                self._lag_from(batch)
                await self._refresh_lag_records(consumer)
            if not batch.empty and batch.epoch == self.epoch:
                await self._flush(consumer, batch)
        finally:
            if self.feed.primary:
                set_ready(self, False)
            await consumer.stop()
            self._drop_client()


async def serve(settings: Settings, kafka: KafkaAccess, stopping: asyncio.Event) -> None:
    """Three feeds: events (the primary: migrations, READY, lag), alerts and SMS outcomes,
    each with its own consumer group and the same batching rules."""
    tokens = load_card_tokens(settings)
    sinks = [
        ClickHouseSink(
            kafka,
            clickhouse_url(settings),
            tokens,
            database=settings.clickhouse_database,
            batch_rows_max=settings.clickhouse_sink_batch_rows,
            batch_wait_ms=settings.clickhouse_sink_batch_wait_ms,
            feed=feed,
        )
        for feed in FEEDS
    ]
    primary, others = sinks[0], sinks[1:]
    log.info(
        "clickhouse sink starting",
        feeds=[s.topic for s in sinks],
        batch_rows_max=primary.batch_rows_max,
        batch_wait_ms=settings.clickhouse_sink_batch_wait_ms,
    )

    async def stop_all() -> None:
        await stopping.wait()
        for sink in sinks:
            sink.stopping.set()

    stopper = asyncio.create_task(stop_all())
    try:
        first = asyncio.ensure_future(primary.run())
        while not primary.migrated and not first.done():  # one migration, then the rest
            await asyncio.sleep(MIGRATION_POLL_S)
        await asyncio.gather(first, *(sink.run() for sink in others))
    finally:
        stopper.cancel()
    log.info("clickhouse sink stopped")
