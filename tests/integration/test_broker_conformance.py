"""The Kafka features medclear relies on, checked against the broker the fixtures start
(Apache Kafka, TLS; the tests act as its operator).

Each test fails loudly (with what was expected and what the broker did) on a broker that
lacks the feature. They were written against an emulator that lacked several (noida-db:
acknowledged writes lost at a stop, a dead member never evicted, empty fetches answered at
once); Apache Kafka passes all of them, and the workarounds those defects needed are gone.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import partitions_of
from medclear.stack import StackError, create_topics
from tests.integration.kafka_read import access_argument

if TYPE_CHECKING:
    from conftest import ClusterFactory

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(60)]

T = TypeVar("T")
GROUP_OPTS: dict[str, Any] = {
    "enable_auto_commit": False,  # medclear commits by hand
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def unique(prefix: str) -> str:
    return f"conformance.{prefix}.{uuid.uuid4().hex[:10]}"


async def consume(
    consumer: AIOKafkaConsumer, n: int, timeout_s: float = 15.0, what: str = ""
) -> list[Any]:
    """The next `n` records at least (fails if fewer arrive within `timeout_s`)."""
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{what or 'too few records'}: got {len(records)} of {n} in {timeout_s} s"
        batches = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
        for batch in batches.values():
            records.extend(batch)
    return records


async def stop(consumer: AIOKafkaConsumer) -> None:
    # aiokafka 0.14: a group-less consumer stopped before its first loop iteration raises
    # CancelledError from stop() (NoGroupCoordinator cancels a task that never started)
    await asyncio.sleep(0)
    await consumer.stop()


async def nothing_more(consumer: AIOKafkaConsumer, wait_s: float = 0.5) -> list[Any]:
    batches = await consumer.getmany(timeout_ms=int(wait_s * 1000))
    return [r for batch in batches.values() for r in batch]


def next_offsets(topic: str, records: Sequence[Any]) -> dict[TopicPartition, int]:
    """Per partition: the offset after the last record consumed from it."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(topic, r.partition)
        out[tp] = max(out.get(tp, 0), r.offset + 1)
    return out


async def produce(
    kafka: KafkaAccess,
    topic: str,
    items: Sequence[tuple[bytes | None, bytes]],
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> list[Any]:
    producer = AIOKafkaProducer(**kafka.options(), acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=list(headers) if headers else None)
            for key, value in items
        ]
        return list(await asyncio.gather(*futures))
    finally:
        await producer.stop()


def test_a_topic_created_with_n_partitions_reports_n(kafka: KafkaAccess) -> None:
    topic = unique("partitions")
    create_topics(kafka, {topic: 7})
    create_topics(kafka, {topic: 7})  # idempotent with the same count

    async def partitions() -> set[int]:
        return {tp.partition for tp in await partitions_of(kafka, topic)}

    assert run(partitions()) == set(range(7)), "broker reports another partition count"
    with pytest.raises(StackError, match="exists with 7 partitions, expected 3"):
        create_topics(kafka, {topic: 3})


def test_b_consumer_group_manual_commit_and_resume(kafka: KafkaAccess) -> None:
    topic, group = unique("group"), unique("group")
    create_topics(kafka, {topic: 3})
    first = [(f"ssn-{i % 5}".encode(), f"v{i}".encode()) for i in range(30)]
    second = [(f"ssn-{i % 5}".encode(), f"v{i}".encode()) for i in range(30, 40)]

    async def body() -> None:
        await produce(kafka, topic, first)
        c1 = AIOKafkaConsumer(topic, **kafka.options(), group_id=group, **GROUP_OPTS)
        await c1.start()
        try:
            got = await consume(c1, len(first))
            assert sorted(r.value for r in got) == sorted(v for _, v in first)
            assert await nothing_more(c1) == [], "records delivered twice"
            await c1.commit()  # the consumed positions (independent of ListOffsets)
            positions = next_offsets(topic, got)
            committed = {tp: await c1.committed(tp) for tp in positions}
            assert committed == positions, "committed offsets differ from what was consumed"
        finally:
            await stop(c1)

        await produce(kafka, topic, second)
        c2 = AIOKafkaConsumer(topic, **kafka.options(), group_id=group, **GROUP_OPTS)
        await c2.start()
        try:
            got = await consume(c2, len(second))
            extra = await nothing_more(c2)
            values = sorted(r.value for r in got + extra)
            assert values == sorted(v for _, v in second), (
                "a new member of the group did not resume exactly after the committed offsets"
            )
        finally:
            await stop(c2)

    run(body())


def test_c_end_offsets_exact_after_multi_record_batches(kafka: KafkaAccess) -> None:
    topic = unique("batches")
    create_topics(kafka, {topic: 2})
    plan = {0: [5, 3, 7], 1: [1, 6]}  # the LAST batch of each partition has >1 record

    async def body() -> None:
        producer = AIOKafkaProducer(**kafka.options(), acks="all")
        await producer.start()
        try:
            for partition, sizes in plan.items():
                base = 0
                for size in sizes:
                    batch = producer.create_batch()
                    for j in range(size):
                        assert batch.append(
                            key=b"k", value=f"{partition}-{base + j}".encode(), timestamp=None
                        )
                    batch.close()
                    meta = await (await producer.send_batch(batch, topic, partition=partition))
                    assert meta.offset == base, f"batch of {size} got base offset {meta.offset}"
                    base += size
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(**kafka.options(), enable_auto_commit=False)
        await consumer.start()
        try:
            tps = {p: TopicPartition(topic, p) for p in plan}
            ends = await consumer.end_offsets(list(tps.values()))
            expected = {tps[p]: sum(sizes) for p, sizes in plan.items()}
            assert ends == expected, f"ListOffsets (latest) is wrong: {ends} != {expected}"
            begins = await consumer.beginning_offsets(list(tps.values()))
            assert set(begins.values()) == {0}
            consumer.assign(list(tps.values()))
            await consumer.seek_to_beginning()
            got = await consume(consumer, sum(expected.values()))
            for p, tp in tps.items():
                offsets = [r.offset for r in got if r.partition == p]
                assert offsets == list(range(expected[tp])), f"partition {p}: offsets {offsets}"
        finally:
            await stop(consumer)

    run(body())


def test_d_messages_and_commits_survive_a_broker_restart(kafka_cluster: ClusterFactory) -> None:
    cluster = kafka_cluster()
    kafka = cluster.access
    topic, group = unique("restart"), unique("restart")
    create_topics(kafka, {topic: 2})
    items = [(f"ssn-{i % 4}".encode(), f"v{i}".encode()) for i in range(20)]

    async def before() -> tuple[list[bytes], dict[TopicPartition, int], list[bytes]]:
        await produce(kafka, topic, items, headers=[("correlation-id", b"c-1")])
        consumer = AIOKafkaConsumer(topic, **kafka.options(), group_id=group, **GROUP_OPTS)
        await consumer.start()
        try:
            got = await consume(consumer, len(items))
            # commit only part of each partition: what is after must be read again
            commit = {tp: end // 2 for tp, end in next_offsets(topic, got).items()}
            await consumer.commit(commit)
            rest = [r.value for r in got if r.offset >= commit[TopicPartition(topic, r.partition)]]
            return sorted(r.value for r in got), commit, sorted(rest)
        finally:
            await stop(consumer)

    everything, commit, rest = run(before())
    assert len(commit) == 2, "keys should have used both partitions"
    cluster.stop_node(0)  # graceful: SIGTERM, a controlled shutdown
    cluster.start_node(0)  # the same storage and ports

    async def after() -> None:
        reader = AIOKafkaConsumer(**kafka.options(), enable_auto_commit=False)
        await reader.start()
        try:
            reader.assign(list(commit))
            await reader.seek_to_beginning()
            got = await consume(reader, len(items), 8.0, "records lost in the restart")
            got += await nothing_more(reader)
            assert sorted(r.value for r in got) == everything, "records lost in the restart"
        finally:
            await stop(reader)
        consumer = AIOKafkaConsumer(topic, **kafka.options(), group_id=group, **GROUP_OPTS)
        await consumer.start()
        try:
            committed = {tp: await consumer.committed(tp) for tp in commit}
            assert committed == commit, "committed offsets lost in the restart"
            got = await consume(consumer, len(rest)) + await nothing_more(consumer)
            assert sorted(r.value for r in got) == rest, "did not resume after the commits"
            assert all(list(r.headers) == [("correlation-id", b"c-1")] for r in got)
        finally:
            await stop(consumer)

    run(after())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_d2_writes_acknowledged_while_the_broker_stops_survive(
    kafka_cluster: ClusterFactory, how: str
) -> None:
    """Writers keep writing while the broker is stopped (SIGTERM, as `medclear down` stops
    it) or killed (-9): every write it acknowledged is there after the restart. (noida-db,
    the emulator before Apache Kafka, lost 78-552 of them to a bare SIGTERM in 11 runs of
    11, and more to a kill -9.)"""
    cluster = kafka_cluster()
    kafka = cluster.access
    topic = unique("stopping")
    create_topics(kafka, {topic: 1})
    acknowledged: list[bytes] = []

    async def write_until_gone() -> None:
        producer = AIOKafkaProducer(**kafka.options(), acks="all", request_timeout_ms=2000)
        await producer.start()

        async def writer(w: int) -> None:
            for i in range(100_000):
                value = f"{w}-{i}".encode()
                try:
                    await producer.send_and_wait(topic, value, partition=0)
                except Exception:  # the broker is going: stop writing
                    return
                acknowledged.append(value)

        try:
            await asyncio.gather(*(writer(w) for w in range(4)))
        finally:
            await asyncio.wait_for(producer.stop(), 5)

    async def stop_under_load() -> None:
        writing = asyncio.ensure_future(write_until_gone())
        while len(acknowledged) < 2_000:  # well under way
            await asyncio.sleep(0.05)
        await asyncio.to_thread(cluster.stop_node if how == "SIGTERM" else cluster.kill_node, 0)
        await writing

    run(stop_under_load())
    cluster.start_node(0)

    async def read_back() -> list[bytes]:
        reader = AIOKafkaConsumer(**kafka.options(), enable_auto_commit=False)
        await reader.start()
        try:
            reader.assign([TopicPartition(topic, 0)])
            await reader.seek_to_beginning()
            got = await consume(reader, len(acknowledged), 15.0, "acknowledged writes lost")
            return [r.value for r in got]
        finally:
            await stop(reader)

    present = set(run(read_back()))
    lost = [v for v in acknowledged if v not in present]
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged writes lost"


def test_e_record_headers_round_trip(kafka: KafkaAccess) -> None:
    topic = unique("headers")
    create_topics(kafka, {topic: 1})
    correlation = uuid.uuid4().hex.encode()
    headers = [
        ("correlation-id", correlation),
        ("reply-to", "medclear.replies.网关-1".encode()),
        ("empty", b""),
        ("binary", bytes(range(256))),
    ]

    async def body() -> ConsumerRecord[bytes, bytes]:
        await produce(kafka, topic, [(b"ssn-1", b"payload")], headers=headers)
        consumer = AIOKafkaConsumer(**kafka.options(), enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            await consumer.seek_to_beginning()
            (record,) = await consume(consumer, 1)
            return record
        finally:
            await stop(consumer)

    record = run(body())
    assert record.key == b"ssn-1" and record.value == b"payload"
    assert list(record.headers) == headers, f"headers changed: {record.headers!r}"


def test_f_same_key_same_partition(kafka: KafkaAccess) -> None:
    # aiokafka's default partitioner is Kafka's Java murmur2 (values from the Java client),
    # so medclear, faust and any Java producer agree on where a person's commands go.
    partitioner = DefaultPartitioner()
    everything = list(range(1000))
    java = {b"": 681, b"a": 524, b"ab": 434, b"abc": 107, b"123456789": 566, b"\x00 ": 742}
    assert {k: partitioner(k, everything, everything) for k in java} == java

    topic, n = unique("keys"), 6
    create_topics(kafka, {topic: n})
    keys = [f"3101{i:014d}".encode() for i in range(24)]
    items = [(key, f"{key.decode()}#{r}".encode()) for r in range(3) for key in keys]

    async def body() -> tuple[list[Any], list[Any]]:
        metas = await produce(kafka, topic, items)
        consumer = AIOKafkaConsumer(**kafka.options(), enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(n)])
            await consumer.seek_to_beginning()
            return metas, await consume(consumer, len(items))
        finally:
            await stop(consumer)

    metas, records = run(body())
    expected = {key: partitioner(key, list(range(n)), list(range(n))) for key in keys}
    assert len(set(expected.values())) > 1, "keys should spread over partitions"
    for (key, _), meta in zip(items, metas, strict=True):
        assert meta.partition == expected[key], f"{key!r} produced to {meta.partition}"
    for record in records:
        assert record.partition == expected[record.key], (
            f"{record.key!r} read from {record.partition}"
        )


# A group member in its own process, so that it can be killed with -9 (a crashed worker).
MEMBER = """
import asyncio, sys, time
from aiokafka import AIOKafkaConsumer
from tests.integration.kafka_read import access_from
access, topic, group, instance, session_ms, hold = sys.argv[1:7]
kafka = access_from(access)
async def main():
    t0 = time.monotonic()
    c = AIOKafkaConsumer(topic, **kafka.options(), group_id=group,
        group_instance_id=instance or None, enable_auto_commit=False,
        session_timeout_ms=int(session_ms), heartbeat_interval_ms=500,
        rebalance_timeout_ms=int(session_ms))
    await c.start()
    while not c.assignment():
        await c.getmany(timeout_ms=100)
    parts = sorted(tp.partition for tp in c.assignment())
    print("assigned", ",".join(map(str, parts)), round(time.monotonic() - t0, 2), flush=True)
    if hold == "1":
        await asyncio.sleep(3600)
    await c.stop()
asyncio.run(main())
"""


def killed_member_then_new_member(
    kafka: KafkaAccess, instance: str, session_ms: int, wait_s: float
) -> tuple[str, float | None]:
    """A member joins and is killed with -9; returns (its assignment, seconds until a new
    member with the same group.instance.id ("" for none) is assigned, or None)."""
    topic, group = unique("crash"), unique("crash")
    create_topics(kafka, {topic: 3})
    args = [access_argument(kafka), topic, group, instance, str(session_ms)]
    first = subprocess.Popen(
        [sys.executable, "-c", MEMBER, *args, "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = first.stdout.readline() if first.stdout else ""
    finally:
        first.send_signal(signal.SIGKILL)
        _, err = first.communicate()
    assert line.startswith("assigned"), f"first member never joined: {err[-2000:]}"
    t0 = time.monotonic()
    try:
        second = subprocess.run(
            [sys.executable, "-c", MEMBER, *args, "0"],
            capture_output=True,
            text=True,
            timeout=wait_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return line.split()[1], None
    assert second.stdout.startswith("assigned"), second.stderr[-2000:]
    return line.split()[1], time.monotonic() - t0


def test_g_crashed_member_is_replaced_by_its_static_successor(kafka: KafkaAccess) -> None:
    # medclear's workers join with group.instance.id = their index: a worker restarted
    # after kill -9 takes its partitions back at once, without a rebalance of the others
    first, took = killed_member_then_new_member(kafka, "worker-0", 6000, 20)
    assert first == "0,1,2"
    assert took is not None, "a restarted static member never got its partitions back"
    assert took < 5, f"the static successor waited {took:.1f} s"


def test_h_crashed_dynamic_member_is_evicted_after_its_session_timeout(
    kafka: KafkaAccess,
) -> None:
    # 6 s: the smallest session timeout Kafka accepts by default
    first, took = killed_member_then_new_member(kafka, "", 6000, 16)
    assert first == "0,1,2"
    assert took is not None, "the dead member was not evicted after its session timeout (6 s)"


def test_i_an_idle_consumer_costs_no_cpu(kafka: KafkaAccess) -> None:
    """The broker holds a fetch that finds nothing for fetch.max.wait.ms, so a consumer
    that polls an empty topic in a loop sleeps in the meantime: no back-off of medclear's
    own is needed (noida-db answered at once, and an idle consumer busy-polled it)."""
    topic = unique("idle")
    create_topics(kafka, {topic: 1})

    async def idle_cpu_s(seconds: float) -> float:
        consumer = AIOKafkaConsumer(**kafka.options(), fetch_max_wait_ms=500)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            await consumer.getmany(timeout_ms=200)
            cpu, deadline = time.process_time(), time.monotonic() + seconds
            while time.monotonic() < deadline:
                await consumer.getmany(timeout_ms=100)
            return time.process_time() - cpu
        finally:
            await stop(consumer)

    seconds = 3.0
    used = run(idle_cpu_s(seconds))
    # a consumer that busy-polls spends most of a core; a held fetch, a few ms a second
    assert used < 0.1 * seconds, f"an idle consumer used {used / seconds:.0%} of a core"
