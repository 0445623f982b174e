"""Every Kafka topic medclear uses, with its key and partitioning, in one place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from medclear.settings import Settings


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    purpose: str


COMMANDS = Topic(
    "medclear.commands",
    key="social security number",
    purpose="every command on a person's aggregate (swipes, window operations, credits)",
)
EVENTS = Topic(
    "medclear.events",
    key="person token (keyed hash of the ssn, clearing/redact.py): one partition per person",
    purpose="what the clearing workers decided, as published: no card number, ssn, name or "
    "phone in clear; read by every downstream job",
)
CARD_INDEX = Topic(
    "medclear.card-index",
    key="card token (keyed hash of the card number, clearing/redact.py)",
    purpose="card token -> the owner's ssn sealed under the person data key, for requests "
    "that lack the ssn",
)
ALERTS = Topic(
    "medclear.alerts",
    key="person token",
    purpose="abnormal transactions flagged by the abnormal job (clearing/abnormal.py)",
)
SETTLEMENT_INPUT = Topic(
    "medclear.settlement-input",
    key="institution id",
    purpose="settlement's events re-keyed by institution, and its close ticks",
)
SETTLEMENTS = Topic(
    "medclear.settlements",
    key="institution:YYYY-MM-DD",
    purpose="an institution's day: open updates, then the closed record (compacted)",
)
COMPACTED = {SETTLEMENTS.name}  # created with cleanup.policy=compact: the latest record per key
SMS_OUTCOMES = Topic(
    "medclear.sms-outcomes",
    key="event id",
    purpose="what became of each event's SMS (submitted, failed, suppressed, receipts)",
)
REPLY_PREFIX = "medclear.replies."  # + gateway instance id; one partition each
# Headers of a command record: where the worker sends the reply, and the id the waiting
# gateway or registry matches it by (medclear/bus.py).
HEADER_REPLY_TO = "reply-to"
HEADER_CORRELATION = "correlation-id"


def reply_topic(instance_id: str) -> str:
    return REPLY_PREFIX + instance_id


def partitions(settings: Settings) -> dict[str, int]:
    """The topics `medclear up` creates before any worker starts, with partition counts."""
    return {
        COMMANDS.name: settings.command_partitions,
        EVENTS.name: settings.event_partitions,
        SMS_OUTCOMES.name: settings.event_partitions,
        CARD_INDEX.name: 1,
        ALERTS.name: settings.event_partitions,
        SETTLEMENT_INPUT.name: settings.event_partitions,
        SETTLEMENTS.name: settings.event_partitions,
    }


class TopicError(RuntimeError):
    """A topic could not be created as asked, or exists with another partition count."""


async def ensure_topics(bootstrap: str, partitions: Mapping[str, int]) -> None:
    """Create each missing topic with its partition count (replication 1) and wait until
    all are visible. Idempotent; an existing topic with another count is a TopicError."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
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
                if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a concurrent creator)
                    message = entry[2] if len(entry) > 2 else ""
                    raise TopicError(f"creating topic {name} failed: error {code} {message}")
        deadline = time.monotonic() + 10.0
        while True:
            found: dict[str, int] = {}
            for topic in await admin.describe_topics(list(partitions)):
                if topic["error_code"] == 0:
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
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
