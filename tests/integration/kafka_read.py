"""Reading topics back in tests: every record of the broker, or one topic's, once."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, TopicPartition


async def all_records(bootstrap: str, only: str | None = None) -> list[tuple[str, bytes]]:
    """Every record (key | value, then headers) of every topic on the broker (or of the
    topic `only`), read once from the beginning."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        existing = await consumer.topics()  # also loads the partition metadata
        names = [only] if only in existing else [] if only else existing
        parts = [TopicPartition(t, p) for t in names
                 for p in consumer.partitions_for_topic(t) or ()]  # fmt: skip
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 30

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while time.monotonic() < deadline and await behind():
            for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                for r in batch:
                    blob = (r.key or b"") + b"|" + (r.value or b"")
                    blob += b"".join(v or b"" for _, v in r.headers or ())
                    out.append((tp.topic, blob))
        return out
    finally:
        await consumer.stop()
