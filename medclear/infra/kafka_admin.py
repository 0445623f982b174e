"""Topics on the broker: each missing one created with its partition count, the cluster's
replication factor and its configuration (medclear.infra.topics.config: compacted tables,
short-lived replies), a whole topic read once for a report or a check, and a wait until
consumer groups have committed what their topics held (a report made right after a swipe
must not race the jobs that count it), and the producer every service and job writes
with. Every client here is made from a KafkaAccess (medclear/infra/kafka_access.py): the
servers and the principal it acts as. The names live in medclear.infra.topics, which
imports no Kafka client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from medclear.errors import MedclearError
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess

TOPIC_VISIBLE_WAIT_S = 10.0  # after creation, until every topic is described
BROKER_WAIT_S = 60.0  # a process started beside its broker waits this long for its topics
BROKER_WAIT_POLL_S = 0.2
TOPIC_VISIBLE_POLL_S = 0.1
ADMIN_REQUEST_TIMEOUT_MS = 15_000
ERROR_NONE = 0
TOPIC_READ_TIMEOUT_S = 60.0  # read_topic: a whole topic, for a report or a check
READ_POLL_MS = 500
READ_RECORDS_MAX = 50_000  # per poll
ERROR_TOPIC_ALREADY_EXISTS = 36  # a concurrent creator
CATCH_UP_WAIT_S = 30.0  # wait_caught_up: the whole wait, all stages
CATCH_UP_POLL_S = 0.1
# How long the broker holds a fetch that finds nothing (fetch.max.wait.ms). A held fetch
# costs nothing while it waits, and returns as soon as a record comes, so it does not add
# latency; but a broker answers a connection's requests one at a time, so a metadata or
# offsets request on the same connection waits behind it (after a broker fails over, the
# new leader's address is such a metadata request). And each expiry is a request answered:
# on this machine ~2.5 ms of broker CPU over TLS, so an idle consumer at 500 ms costs the
# broker ~0.5 % of a core (docs/PERFORMANCE.md).
FETCH_WAIT_MS = 500  # the decision path (the worker, the replies): fail over quickly
DOWNSTREAM_FETCH_WAIT_MS = 5_000  # the stream jobs after the decision, the card index
POLL_WAIT_MS = 100  # one getmany's wait in a loop that has other work (commits) to do
COMPRESSION = "lz4"  # bytes on the disks and between the brokers (docs/PERFORMANCE.md)


def new_producer(kafka: KafkaAccess) -> AIOKafkaProducer:
    """The producer of every service and job: idempotent (a batch the broker wrote but
    whose acknowledgement was lost is not written twice when it is sent again: retries
    after a broker fails over cannot reorder or double a partition's records), acks from
    all in-sync replicas (min.insync.replicas 2 on a cluster), no linger (a decision's
    outputs leave at once; records that pile up behind a request in flight are batched
    anyway), lz4. No transactions: docs/ARCHITECTURE.md, decision 12."""
    return AIOKafkaProducer(
        **kafka.options(),
        acks="all",
        linger_ms=0,
        enable_idempotence=True,
        compression_type=COMPRESSION,
    )


class TopicError(MedclearError):
    """A topic could not be created as asked, or exists with another partition count."""


def new_admin(kafka: KafkaAccess) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**kafka.options(), request_timeout_ms=ADMIN_REQUEST_TIMEOUT_MS)


async def ensure_topics(kafka: KafkaAccess, partitions: Mapping[str, int]) -> None:
    """Create each missing topic with its partition count, the access's replication factor
    and medclear's configuration for it, and wait until all are visible. Idempotent; an
    existing topic with another count is a TopicError."""
    admin = new_admin(kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name,
                num_partitions=count,
                replication_factor=kafka.replication,
                topic_configs=topics.config(name),
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


async def describe(kafka: KafkaAccess, topic: str) -> dict[str, Any] | None:
    """The broker's metadata of `topic` (partitions, leaders, replicas, in-sync replicas),
    None if it does not exist or this principal may not see it."""
    admin = new_admin(kafka)
    try:
        await admin.start()
        for found in await admin.describe_topics([topic]):
            if found["topic"] == topic and found["error_code"] == ERROR_NONE:
                return dict(found)
        return None
    finally:
        await admin.close()


async def prepare_groups(kafka: KafkaAccess, group: str) -> None:
    """Ask for a consumer group's coordinator once: on a new cluster the broker then makes
    its offsets topic (__consumer_offsets) while medclear's processes start, instead of
    when the first of them joins its group. The answer (at first, that there is none
    yet) does not matter."""
    admin = new_admin(kafka)
    try:
        await admin.start()
        with contextlib.suppress(KafkaError):
            await admin.find_coordinator(group)
    finally:
        await admin.close()


async def wait_for_topics(
    kafka: KafkaAccess, names: Sequence[str], timeout_s: float = BROKER_WAIT_S
) -> dict[str, list[TopicPartition]]:
    """The partitions of each topic of `names`, once the broker answers and every one is
    there for this principal (created, and its ACLs in force): a process started before
    its broker is ready, or restarted while it fails over, waits instead of failing.
    TopicError if that takes longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = await _partitions(kafka, names)
            missing = [name for name in names if not found.get(name)]
        except (KafkaError, OSError) as exc:  # the broker is not answering yet
            found, missing = {}, [f"the broker ({type(exc).__name__})"]
        if not missing:
            return found
        if time.monotonic() >= deadline:
            raise TopicError(
                f"{kafka.principal}: after {timeout_s:g} s still no "
                f"{', '.join(missing)} on {kafka.bootstrap}"
            )
        await asyncio.sleep(BROKER_WAIT_POLL_S)


async def _partitions(kafka: KafkaAccess, names: Sequence[str]) -> dict[str, list[TopicPartition]]:
    """The partitions of each of `names` that exists and is visible, one request."""
    admin = new_admin(kafka)
    try:
        await admin.start()
        return {
            found["topic"]: [
                TopicPartition(found["topic"], p["partition"])
                for p in sorted(found["partitions"], key=lambda p: p["partition"])
            ]
            for found in await admin.describe_topics(list(names))
            if found["error_code"] == ERROR_NONE
        }
    finally:
        await admin.close()


async def partitions_of(kafka: KafkaAccess, topic: str) -> list[TopicPartition]:
    """The partitions of `topic`, in order ([] if it does not exist or is not visible).
    A consumer's `topics()` does not load a topic into its own metadata, and a broker
    answers a consumer's first metadata request with no topic: so ask an admin."""
    return (await _partitions(kafka, [topic])).get(topic, [])


def new_reader(kafka: KafkaAccess, fetch_wait_ms: int = FETCH_WAIT_MS) -> AIOKafkaConsumer:
    """A consumer of no group (assigned partitions, nothing committed). The broker holds a
    fetch that finds nothing for `fetch_wait_ms`, and answers nothing else on that
    connection meanwhile (a broker serves a connection's requests one at a time): a reader
    that also asks for offsets or metadata waits up to that long for each answer."""
    # earliest: should a background reset of a new assignment win over a seek (an aiokafka
    # race, stream_runtime/changelog.py), the reader reads too much, never too little
    return AIOKafkaConsumer(
        **kafka.options(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_wait_ms,
    )


async def read_topic(
    kafka: KafkaAccess, topic: str, timeout_s: float = TOPIC_READ_TIMEOUT_S
) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of `topic`, partition by partition in offset order, read once."""
    consumer = new_reader(kafka)
    await consumer.start()
    try:
        parts = await partitions_of(kafka, topic)
        if not parts:
            return []
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


async def group_lag(
    admin: AIOKafkaAdminClient, group: str, ends: Mapping[TopicPartition, int]
) -> int:
    """Records before `ends` that `group` has not committed (a partition it never committed
    counts from offset 0)."""
    committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
    lag = 0
    for tp, end in ends.items():
        done = committed.get(tp)
        offset = done.offset if done is not None and done.offset >= 0 else 0
        lag += max(0, end - offset)
    return lag


async def end_offsets(kafka: KafkaAccess, topic: str) -> dict[TopicPartition, int]:
    consumer = new_reader(kafka)
    await consumer.start()
    try:
        parts = await partitions_of(kafka, topic)
        if not parts:
            return {}
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def wait_caught_up(
    kafka: KafkaAccess, stages: Sequence[tuple[str, str]], timeout_s: float = CATCH_UP_WAIT_S
) -> dict[str, int]:
    """For each (consumer group, topic) in order: take the topic's end offsets, then wait
    until the group has committed up to them. In order, because a stage's topic is fed by
    the stage before it. Returns the records each group still lacked when `timeout_s` ran
    out (empty: every stage caught up)."""
    deadline = time.monotonic() + timeout_s
    admin = new_admin(kafka)
    await admin.start()
    try:
        for index, (group, topic) in enumerate(stages):
            ends = await end_offsets(kafka, topic)
            while (lag := await group_lag(admin, group, ends)) > 0:
                if time.monotonic() >= deadline:
                    behind = {group: lag}
                    for later, later_topic in stages[index + 1 :]:
                        behind[later] = await group_lag(
                            admin, later, await end_offsets(kafka, later_topic)
                        )
                    return behind
                await asyncio.sleep(CATCH_UP_POLL_S)
        return {}
    finally:
        await admin.close()
