"""Reading topics back in tests: every record of the broker, or one topic's, once; and a
broker's access passed to a process of a test on its command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import partitions_of


async def all_records(kafka: KafkaAccess, only: str | None = None) -> list[tuple[str, bytes]]:
    """Every record (key | value, then headers) of every topic on the broker (or of the
    topic `only`), read once from the beginning."""
    consumer = AIOKafkaConsumer(**kafka.options(), enable_auto_commit=False)
    await consumer.start()
    try:
        existing = await consumer.topics()
        names = [only] if only in existing else [] if only else existing
        parts = [tp for t in sorted(names) for tp in await partitions_of(kafka, t)]
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


def access_argument(kafka: KafkaAccess) -> str:
    """The access as one command-line argument (JSON)."""
    return json.dumps(
        {
            "bootstrap": kafka.bootstrap,
            "principal": kafka.principal,
            "ssl_dir": str(kafka.ssl_dir) if kafka.ssl_dir else None,
            "replication": kafka.replication,
        }
    )


def access_from(argument: str) -> KafkaAccess:
    fields = json.loads(argument)
    ssl_dir = Path(fields["ssl_dir"]) if fields["ssl_dir"] else None
    return KafkaAccess(fields["bootstrap"], fields["principal"], ssl_dir, fields["replication"])
