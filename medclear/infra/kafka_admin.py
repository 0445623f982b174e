"""Topics on the broker: each missing one created with its partition count (the compacted
ones with cleanup.policy=compact), a whole topic read once for a report or a check, and a
wait until consumer groups have committed what their topics held (a report made right after
a swipe must not race the jobs that count it), and the producer every service and job
writes with. The names live in medclear.infra.topics, which imports no Kafka client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from medclear.errors import MedclearError
from medclear.infra.topics import COMPACTED

TOPIC_VISIBLE_WAIT_S = 10.0  # after creation, until every topic is described
TOPIC_VISIBLE_POLL_S = 0.1
ADMIN_REQUEST_TIMEOUT_MS = 15_000
ERROR_NONE = 0
TOPIC_READ_TIMEOUT_S = 60.0  # read_topic: a whole topic, for a report or a check
READ_POLL_MS = 500
READ_RECORDS_MAX = 50_000  # per poll
ERROR_TOPIC_ALREADY_EXISTS = 36  # a concurrent creator
CATCH_UP_WAIT_S = 30.0  # wait_caught_up: the whole wait, all stages
CATCH_UP_POLL_S = 0.1
# lz4 on every batch: noida-db keeps batches as they come and rewrites its whole data file
# about twice a second and at its stop, so bytes on the broker cost CPU while the stack
# runs and seconds at `down`. Seeding 30,000 persons: 293 → 105 MB on its disk, its CPU
# 0.51 → 0.34 ms a person, `down` 4.2 → 1.8 s (docs/PERFORMANCE.md).
COMPRESSION = "lz4"


def new_producer(bootstrap: str) -> AIOKafkaProducer:
    """The producer of every service and job: acks from all in-sync replicas, no linger (a
    decision's outputs leave at once; records that pile up behind a request in flight are
    batched anyway), no idempotence (not every broker here has it: the runtime's offsets
    and the commands' request ids make redelivery harmless), lz4."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                            enable_idempotence=False, compression_type=COMPRESSION)  # fmt: skip


class TopicError(MedclearError):
    """A topic could not be created as asked, or exists with another partition count."""


async def ensure_topics(bootstrap: str, partitions: Mapping[str, int]) -> None:
    """Create each missing topic with its partition count (replication 1) and wait until
    all are visible. Idempotent; an existing topic with another count is a TopicError."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=ADMIN_REQUEST_TIMEOUT_MS
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name,
                num_partitions=count,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"} if name in COMPACTED else {},
            )
            for name, count in partitions.items()
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            for entry in response.topic_errors:
                name, code = entry[0], entry[1]
                if code not in (ERROR_NONE, ERROR_TOPIC_ALREADY_EXISTS):
                    message = entry[2] if len(entry) > 2 else ""
                    raise TopicError(f"creating topic {name} failed: error {code} {message}")
        deadline = time.monotonic() + TOPIC_VISIBLE_WAIT_S
        while True:
            found: dict[str, int] = {}
            for topic in await admin.describe_topics(list(partitions)):
                if topic["error_code"] == ERROR_NONE:
                    found[topic["topic"]] = len(topic["partitions"])
            for name, count in partitions.items():
                if name in found and found[name] != count:
                    raise TopicError(
                        f"topic {name} exists with {found[name]} partitions, "
                        f"expected {count} (delete it or change the setting)"
                    )
            if all(name in found for name in partitions):
                return
            if time.monotonic() >= deadline:
                absent = sorted(set(partitions) - set(found))
                raise TopicError(f"topics not visible after creation: {absent}")
            await asyncio.sleep(TOPIC_VISIBLE_POLL_S)
    finally:
        await admin.close()


async def read_topic(
    bootstrap: str, topic: str, timeout_s: float = TOPIC_READ_TIMEOUT_S
) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of `topic`, partition by partition in offset order, read once."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return []
        parts = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        deadline = time.monotonic() + timeout_s
        while any([await consumer.position(tp) < end for tp, end in ends.items()]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took longer than {timeout_s} s")
            for tp, batch in (
                await consumer.getmany(timeout_ms=READ_POLL_MS, max_records=READ_RECORDS_MAX)
            ).items():
                by_partition.setdefault(tp.partition, []).extend(
                    (r.key, r.value) for r in batch if r.offset < ends[tp]
                )
        return [record for p in sorted(by_partition) for record in by_partition[p]]
    finally:
        await consumer.stop()


async def group_lag(admin: AIOKafkaAdminClient, group: str, ends: Mapping[TopicPartition, int]
                    ) -> int:  # fmt: skip
    """Records before `ends` that `group` has not committed (a partition it never committed
    counts from offset 0)."""
    committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
    lag = 0
    for tp, end in ends.items():
        done = committed.get(tp)
        offset = done.offset if done is not None and done.offset >= 0 else 0
        lag += max(0, end - offset)
    return lag


async def _end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return {}
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def wait_caught_up(bootstrap: str, stages: Sequence[tuple[str, str]],
                         timeout_s: float = CATCH_UP_WAIT_S) -> dict[str, int]:  # fmt: skip
    """For each (consumer group, topic) in order: take the topic's end offsets, then wait
    until the group has committed up to them. In order, because a stage's topic is fed by
    the stage before it. Returns the records each group still lacked when `timeout_s` ran
    out (empty: every stage caught up)."""
    deadline = time.monotonic() + timeout_s
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=ADMIN_REQUEST_TIMEOUT_MS
    )
    await admin.start()
    try:
        for index, (group, topic) in enumerate(stages):
            ends = await _end_offsets(bootstrap, topic)
            while (lag := await group_lag(admin, group, ends)) > 0:
                if time.monotonic() >= deadline:
                    behind = {group: lag}
                    for later, later_topic in stages[index + 1 :]:
                        behind[later] = await group_lag(
                            admin, later, await _end_offsets(bootstrap, later_topic)
                        )
                    return behind
                await asyncio.sleep(CATCH_UP_POLL_S)
        return {}
    finally:
        await admin.close()
