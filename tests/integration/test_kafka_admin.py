"""`wait_caught_up` on the real broker: a report waits until the groups that count the
events have committed them, stage by stage, and says how far behind they are if not."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import ensure_topics, wait_caught_up

PARTITIONS = 2


async def _produce(kafka: KafkaAccess, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(**kafka.options())
    await producer.start()
    try:
        for i in range(count):
            await producer.send_and_wait(topic, b"v", key=str(i).encode(), partition=i % 2)
    finally:
        await producer.stop()


async def _commit_all(kafka: KafkaAccess, group: str, topic: str) -> None:
    """Commit the topic's end offsets for `group`, as a job that has handled everything."""
    consumer = AIOKafkaConsumer(**kafka.options(), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        await consumer.commit({tp: end for tp, end in ends.items() if end > 0})
    finally:
        await consumer.stop()


def test_wait_caught_up_waits_for_each_stage_in_order(kafka: KafkaAccess) -> None:
    run = uuid.uuid4().hex[:8]
    first, second = f"ca-in-{run}", f"ca-out-{run}"
    route, settle = f"ca-route-{run}", f"ca-settle-{run}"
    stages = ((route, first), (settle, second))

    async def scenario() -> None:
        await ensure_topics(kafka, {first: PARTITIONS, second: PARTITIONS})
        assert await wait_caught_up(kafka, stages, timeout_s=1.0) == {}  # empty
        await _produce(kafka, first, 5)
        await _produce(kafka, second, 3)
        # nothing committed: both stages are behind by what their topics hold
        assert await wait_caught_up(kafka, stages, timeout_s=0.5) == {
            route: 5,
            settle: 3,
        }
        await _commit_all(kafka, route, first)
        assert await wait_caught_up(kafka, stages, timeout_s=0.5) == {settle: 3}

        # the wait waits: the second stage commits while it is waiting
        async def later() -> None:
            await asyncio.sleep(1.0)
            await _commit_all(kafka, settle, second)

        committer = asyncio.create_task(later())
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await wait_caught_up(kafka, stages, timeout_s=20.0) == {}
        assert loop.time() - started >= 0.9
        await committer

    asyncio.run(scenario())
