"""The stream runtime on a real broker: exact state and outputs, a restart that keeps its
disk reads only the changelog's tail, a cold restart rebuilds every store from the
changelog, a rebalance hands partitions over without losing or changing anything
(revocation finishes the batches in flight; assignment restores before handling), and
kill -9 at any moment loses nothing and applies nothing twice."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from medclear import stack
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import ensure_topics
from medclear.infra.topics import changelog_topic
from monitoring import metrics
from tests.integration import stream_job
from tests.integration.kafka_read import access_argument, all_records

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]
PARTITIONS = 4
ACCOUNTS = [f"acct-{i:02d}".encode() for i in range(24)]
REPO = Path(__file__).resolve().parents[2]


def make_topics(kafka: KafkaAccess) -> str:
    prefix = f"st-{uuid.uuid4().hex[:8]}"
    asyncio.run(
        ensure_topics(
            kafka, {f"{prefix}.in": PARTITIONS, f"{prefix}.out": PARTITIONS, f"{prefix}.replies": 1}
        )
    )
    return prefix


def produce(kafka: KafkaAccess, prefix: str, amounts: list[tuple[bytes, int]]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(**kafka.options(), acks="all")
        await producer.start()
        try:
            futures = [
                await producer.send(f"{prefix}.in", str(n).encode(), key=account)
                for account, n in amounts
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


def random_amounts(rng: random.Random, count: int) -> list[tuple[bytes, int]]:
    return [(rng.choice(ACCOUNTS), rng.randint(1, 999)) for _ in range(count)]


def committed_behind(kafka: KafkaAccess, prefix: str) -> int:
    """Input records not yet committed by the ledger's group."""

    async def behind() -> int:
        consumer = AIOKafkaConsumer(
            **kafka.options(), group_id=f"{prefix}-ledger", enable_auto_commit=False
        )
        await consumer.start()
        try:
            tps = [TopicPartition(f"{prefix}.in", p) for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(tps)
            behind = 0
            for tp in tps:
                behind += ends[tp] - (await consumer.committed(tp) or 0)
            return behind
        finally:
            await consumer.stop()

    return asyncio.run(behind())


def outputs(kafka: KafkaAccess, prefix: str) -> dict[str, set[str]]:
    """Output key (the input's partition:offset) → every value produced for it."""
    found: dict[str, set[str]] = {}
    for _topic, blob in asyncio.run(all_records(kafka, f"{prefix}.out")):
        key, _, value = blob.decode().partition("|")
        found.setdefault(key, set()).add(value)
    return found


def check_exact(kafka: KafkaAccess, prefix: str, sent: list[tuple[bytes, int]]) -> None:
    """Every input has exactly one output value (a redelivery may repeat it, never change
    it), and each account's last balance is the sum of its amounts."""
    got = outputs(kafka, prefix)
    assert len(got) == len(sent), (len(got), len(sent))
    assert all(len(values) == 1 for values in got.values()), [v for v in got.values() if len(v) > 1]
    final: dict[str, tuple[int, int]] = {}
    for key, values in got.items():
        partition, offset = (int(x) for x in key.split(":"))
        account, balance = next(iter(values)).rsplit(":", 1)
        if (partition, offset) > final.get(account, (-1, -1))[:2]:  # type: ignore[operator]
            final[account] = (partition, offset, int(balance))  # type: ignore[assignment]
    sums: Counter[str] = Counter()
    for account, amount in sent:
        sums[account.decode()] += amount
    assert {a: f[2] for a, f in final.items()} == dict(sums)  # type: ignore[misc]


def run_until_caught_up(
    runtimes: list[stream_job.Runtime], kafka: KafkaAccess, prefix: str, timeout_s: float = 90
) -> None:
    async def go() -> None:
        stopping = asyncio.Event()
        tasks = [asyncio.create_task(rt.run(stopping)) for rt in runtimes]
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                if await asyncio.to_thread(committed_behind, kafka, prefix) == 0:
                    return
            raise AssertionError("the ledger did not catch up")
        finally:
            stopping.set()
            await asyncio.gather(*tasks)

    asyncio.run(go())


def restored(prefix: str) -> float:
    return metrics.STREAM_RESTORED_RECORDS.labels(f"{prefix}-ledger", stream_job.TABLE)._value.get()


def test_a_ledger_is_exact_and_a_restart_with_its_disk_reads_only_the_tail(
    kafka: KafkaAccess, tmp_path: Path
) -> None:
    prefix, rng = make_topics(kafka), random.Random(1)
    sent = random_amounts(rng, 400)
    produce(kafka, prefix, sent)
    run_until_caught_up([stream_job.runtime(kafka, prefix, tmp_path, "m1")], kafka, prefix)
    check_exact(kafka, prefix, sent)
    assert restored(prefix) == 0  # a new store, an empty changelog
    more = random_amounts(rng, 100)
    produce(kafka, prefix, more)
    run_until_caught_up([stream_job.runtime(kafka, prefix, tmp_path, "m1")], kafka, prefix)
    assert restored(prefix) == 0  # the store had everything: no changelog record read
    check_exact(kafka, prefix, sent + more)
    replies = asyncio.run(all_records(kafka, f"{prefix}.replies"))
    assert len(replies) >= len(sent + more)


def test_a_cold_start_rebuilds_every_store_from_the_changelog(
    kafka: KafkaAccess, tmp_path: Path
) -> None:
    prefix, rng = make_topics(kafka), random.Random(2)
    sent = random_amounts(rng, 300)
    produce(kafka, prefix, sent)
    run_until_caught_up([stream_job.runtime(kafka, prefix, tmp_path, "m1")], kafka, prefix)
    changelog = asyncio.run(
        all_records(kafka, changelog_topic(f"{prefix}-ledger", stream_job.TABLE))
    )
    shutil.rmtree(tmp_path / stream_job.TABLE)  # a new machine: no local files
    more = random_amounts(rng, 60)
    produce(kafka, prefix, more)
    run_until_caught_up([stream_job.runtime(kafka, prefix, tmp_path, "m1")], kafka, prefix)
    assert restored(prefix) == len(changelog)  # every changelog record, once
    check_exact(kafka, prefix, sent + more)  # balances carried on, not restarted


def test_a_rebalance_hands_partitions_over_without_a_change(
    kafka: KafkaAccess, tmp_path: Path
) -> None:
    """m1 owns every partition with batches in flight; m2 joins: m1 finishes and commits
    what it decided for the partitions it gives up, m2 restores them from the changelog
    before handling any record, and the ledger stays exact."""
    prefix, rng = make_topics(kafka), random.Random(3)
    sent = random_amounts(rng, 300)
    produce(kafka, prefix, sent)
    first = stream_job.runtime(kafka, prefix, tmp_path / "m1", "m1", batch_max=8)
    second = stream_job.runtime(kafka, prefix, tmp_path / "m2", "m2", batch_max=8)

    async def go() -> tuple[int, int]:
        stopping = asyncio.Event()
        one = asyncio.create_task(first.run(stopping))
        await asyncio.sleep(1.5)  # m1 is handling; then produce more while m2 joins
        extra = asyncio.create_task(asyncio.to_thread(produce, kafka, prefix, more))
        two = asyncio.create_task(second.run(stopping))
        await extra
        deadline = time.monotonic() + 90
        # until m2 has taken its share (the rebalance waits for m1's next heartbeat) and
        # the input is all committed
        while not second.stores or await asyncio.to_thread(committed_behind, kafka, prefix):
            assert time.monotonic() < deadline, "not caught up"
            await asyncio.sleep(0.5)
        shares = (len({p for _t, p in first.stores}), len({p for _t, p in second.stores}))
        stopping.set()
        await asyncio.gather(one, two)
        return shares

    more = random_amounts(rng, 300)
    shares = asyncio.run(go())
    assert shares[0] >= 1 and shares[1] >= 1 and sum(shares) == PARTITIONS, shares
    assert restored(prefix) > 0  # m2 read m1's changelog for what it took over
    check_exact(kafka, prefix, sent + more)  # so it did so before handling
    # no crash, so no redelivery either: m1 finished and committed every batch it had
    # decided for the partitions it gave up before m2 read them
    produced = asyncio.run(all_records(kafka, f"{prefix}.out"))
    assert len(produced) == len(sent + more)


def test_kill_9_at_any_moment_loses_nothing_and_applies_nothing_twice(
    kafka: KafkaAccess, tmp_path: Path
) -> None:
    prefix, rng = make_topics(kafka), random.Random(4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "tests.integration.stream_job",
        access_argument(kafka),
        prefix,
        str(tmp_path / "data"),
        "k1",
    ]
    sent: list[tuple[bytes, int]] = []

    def start() -> stack.Process:
        return stack.Process("ledger", argv, tmp_path / "ledger.log", env=env, cwd=REPO).start()

    job = start()
    try:
        for _round in range(4):
            chunk = random_amounts(rng, 250)
            produce(kafka, prefix, chunk)
            sent += chunk
            time.sleep(rng.uniform(0.3, 1.5))  # somewhere in the middle of handling it
            assert job.pid is not None
            os.killpg(job.pid, signal.SIGKILL)
            job.stop(timeout=5)
            job = start()
        deadline = time.monotonic() + 120
        while committed_behind(kafka, prefix):
            assert time.monotonic() < deadline, (tmp_path / "ledger.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        job.stop()
    check_exact(kafka, prefix, sent)
