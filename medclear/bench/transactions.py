"""`medclear bench transactions`: what a Kafka transaction would cost the stream runtime's
batches (docs/ARCHITECTURE.md, decision 12), on an Apache Kafka cluster of its own.

A batch of the clearing worker writes its events, its changed persons (changelog) and its
replies, then commits its input offsets. Measured per batch, the same records either way:

- idempotent: every record handed to an idempotent producer (acks=all), all the
  acknowledgements awaited, then the offsets committed by the consumer group (what the
  runtime does: stream_runtime/runtime.py);
- transactional: begin, the same records, the offsets sent to the transaction, commit
  (one atomic write; readers with isolation read_committed see it only after the commit
  markers are written).

Prints p50/p99/mean per batch and the batches a second one producer reaches sequentially.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from medclear.infra.kafka_access import OPERATOR, KafkaAccess
from medclear.infra.kafka_admin import COMPRESSION, ensure_topics
from medclear.infra.pki import ensure_kafka_pki
from medclear.stack.kafka import Cluster

console = Console()
TOPICS = ("bench.events", "bench.changelog", "bench.replies")
GROUP = "bench-transactions"


async def _batch_idempotent(
    producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, records: int, offset: int
) -> None:
    sent = [
        await producer.send(TOPICS[i % len(TOPICS)], b"x" * 300, key=b"%d" % i, partition=0)
        for i in range(records)
    ]
    await asyncio.gather(*sent)
    await consumer.commit({TopicPartition(TOPICS[0], 0): offset})


async def _batch_transactional(
    producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, records: int, offset: int
) -> None:
    async with producer.transaction():
        for i in range(records):
            await producer.send(TOPICS[i % len(TOPICS)], b"x" * 300, key=b"%d" % i, partition=0)
        await producer.send_offsets_to_transaction({TopicPartition(TOPICS[0], 0): offset}, GROUP)


Step = Callable[[AIOKafkaProducer, AIOKafkaConsumer, int, int], Awaitable[None]]


async def _measure(
    kafka: KafkaAccess, step: Step, transactional: bool, batches: int, records: int
) -> list[float]:
    options = {"transactional_id": f"bench-{uuid.uuid4().hex[:8]}"} if transactional else {}
    producer = AIOKafkaProducer(
        **kafka.options(),
        acks="all",
        enable_idempotence=True,
        linger_ms=0,
        compression_type=COMPRESSION,
        **options,
    )
    consumer = AIOKafkaConsumer(
        TOPICS[0], **kafka.options(), group_id=GROUP, enable_auto_commit=False
    )
    await producer.start()
    await consumer.start()
    try:
        taken = []
        for n in range(batches):
            started = time.perf_counter()
            await step(producer, consumer, records, n + 1)
            taken.append((time.perf_counter() - started) * 1000)
        return taken
    finally:
        await consumer.stop()
        await producer.stop()


async def _both(kafka: KafkaAccess, batches: int, records: int) -> dict[str, list[float]]:
    await ensure_topics(kafka, dict.fromkeys(TOPICS, 1))
    out = {}
    for name, step, transactional in (
        ("idempotent, then commit", _batch_idempotent, False),
        ("transaction", _batch_transactional, True),
    ):
        await _measure(kafka, step, transactional, max(1, batches // 10), records)  # warm up
        out[name] = await _measure(kafka, step, transactional, batches, records)
    return out


def command(
    brokers: Annotated[int, typer.Option(min=1, max=3, help="Apache Kafka nodes")] = 1,
    batches: Annotated[int, typer.Option(min=10, max=100_000, help="batches per way")] = 500,
    records: Annotated[int, typer.Option(min=1, max=10_000, help="records per batch")] = 12,
) -> None:
    """A batch's writes and its offset commit, idempotent (as the runtime does) or as one
    transaction, on a TLS cluster of its own: latency per batch. Asserts nothing."""
    with tempfile.TemporaryDirectory(prefix="medclear-bench-txn-") as tmp:
        base = Path(tmp)
        cluster = Cluster(base / "kafka", brokers, ensure_kafka_pki(base / "pki", [OPERATOR]))
        with console.status(f"starting {brokers} Kafka node(s) …"):
            cluster.start()
        try:
            with console.status(f"{batches} batches of {records} records, each way …"):
                figures = asyncio.run(_both(cluster.access, batches, records))
        finally:
            cluster.stop()
    table = Table(
        title=f"a batch of {records} records + its offset commit, {brokers} "
        f"broker(s), TLS, acks=all ({batches} batches)"
    )
    for column in ("way", "p50 ms", "p99 ms", "mean ms", "batches/s"):
        table.add_column(column, justify="right" if column != "way" else "left")
    for name, taken in figures.items():
        ordered = sorted(taken)
        table.add_row(
            name,
            f"{statistics.median(ordered):.2f}",
            f"{ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))]:.2f}",
            f"{statistics.fmean(ordered):.2f}",
            f"{1000 / statistics.fmean(ordered):,.0f}",
        )
    console.print(table)
