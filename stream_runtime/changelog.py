"""A table partition's changelog: written with the state, read back into a store in bulk.

The changelog topic has the input's partitions: the state of input partition p is written
to changelog partition p, so whoever owns input partition p restores from changelog
partition p alone. A record's key is the state key, its value the new value (an empty
value: the key was deleted).

Restoring reads [store.next_offset, end) in chunks of RESTORE_CHUNK_RECORDS, each applied
as one RocksDB write batch together with the offset after it. Memory is bounded by reading
one partition at a time and one chunk of parsed records at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from medclear.errors import MedclearError
from monitoring import metrics
from stream_runtime.batch import Store

log = structlog.get_logger()

RESTORE_CHUNK_RECORDS = 5_000  # records applied per RocksDB write batch while restoring
RESTORE_POLL_MS = 200
RESTORE_STALL_S_MAX = 120.0  # no record for this long while behind: the broker is gone


class RestoreError(MedclearError):
    """A changelog partition could not be read to its end."""


async def restore(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    store: Store,
    on_chunk: Callable[[int], None] = lambda _n: None,
) -> int:
    """Apply changelog partition `tp` from the store's next offset to the end; returns the
    records applied. `consumer` belongs to no group and is assigned `tp` alone while this
    runs (and nothing after it: an assigned partition would be fetched for ever)."""
    try:
        return await _restore(consumer, tp, store, on_chunk)
    finally:
        consumer.unsubscribe()


async def _restore(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    store: Store,
    on_chunk: Callable[[int], None],
) -> int:
    # The offsets first, then assign and seek with no await between: aiokafka resets a
    # newly assigned partition's position in the background, and a reset still running
    # when a later seek is made can win over it (seen with seek_to_beginning after
    # end_offsets: the reader started at the end and read nothing)
    first = await consumer.beginning_offsets([tp])
    end = (await consumer.end_offsets([tp]))[tp]
    start = max(store.next_offset, first[tp])
    if store.next_offset > end:
        # The changelog holds less than the store: the topic was deleted and made again,
        # or a cluster that allowed an unclean leader election lost acknowledged records
        # (the embedded one does not; noida-db, the emulator before it, did after a kill
        # -9). Keep the store, write on from the broker's end.
        metrics.STREAM_CHANGELOG_BEHIND_STORE.labels(tp.topic).inc(store.next_offset - end)
        log.warning(
            "changelog shorter than the store: keeping the store",
            topic=tp.topic,
            partition=tp.partition,
            store_offset=store.next_offset,
            end=end,
        )
        store.apply({}, end)
        return 0
    if start >= end:
        return 0
    consumer.assign([tp])
    consumer.seek(tp, start)
    applied, position, last_progress = 0, start, time.monotonic()
    while position < end:
        fetched = await consumer.getmany(
            tp, timeout_ms=RESTORE_POLL_MS, max_records=RESTORE_CHUNK_RECORDS
        )
        records = fetched.get(tp, [])
        if not records:
            if time.monotonic() - last_progress > RESTORE_STALL_S_MAX:
                raise RestoreError(f"{tp.topic}[{tp.partition}] stalled at {position} of {end}")
            await asyncio.sleep(0)
            continue
        changes: dict[bytes, bytes | None] = {}
        for record in records:
            if record.key is not None:
                changes[record.key] = record.value or None
        position = records[-1].offset + 1
        store.apply(changes, position)
        applied += len(records)
        last_progress = time.monotonic()
        on_chunk(len(records))
    return applied
