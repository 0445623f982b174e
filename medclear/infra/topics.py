"""Every Kafka topic medclear uses, with its key and partitioning, in one place."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from medclear.infra.settings import Settings


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
SMS_OUTCOMES = Topic(
    "medclear.sms-outcomes",
    key="event id",
    purpose="what became of each event's SMS (submitted, failed, suppressed, receipts)",
)
REPLY_PREFIX = "medclear.replies."  # + gateway instance id; one partition each
GATEWAY_INSTANCE_PREFIX = "gw-"  # a gateway's instance id (its reply topic): gw-0, gw-1, …
REGISTRY_INSTANCE_PREFIX = "reg-"  # a card registry's: reg-0, …
CHANGELOG_SUFFIX = "-changelog"  # a stream job's table: <job>-<table>-changelog
# The latest record per key is what these hold: a changelog's value for a key replaces the
# one before it (an empty value deletes it), so they are compacted, never expired.
COMPACTED = {SETTLEMENTS.name, CARD_INDEX.name}
REPLY_RETENTION_MS = 3_600_000  # a reply is read within seconds or never (the caller gave up)
REPLY_SEGMENT_MS = 600_000  # … so the broker rolls and deletes them in small pieces
# Headers of a command record: where the worker sends the reply, and the id the waiting
# gateway or registry matches it by (medclear/infra/replies.py).
HEADER_REPLY_TO = "reply-to"
HEADER_CORRELATION = "correlation-id"
# Header of an event record: the event's class name (codec.RECORD_TYPES), so a job skips
# the events it does not read without decoding them (stream_jobs/events.py).
HEADER_EVENT_TYPE = "event-type"


def header(headers: Iterable[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """The value of a record's header `name` (its first), None if it has none."""
    for key, value in headers or ():
        if key == name:
            return bytes(value) if value is not None else None
    return None


def reply_topic(instance_id: str) -> str:
    return REPLY_PREFIX + instance_id


def changelog_topic(job: str, table: str) -> str:
    return f"{job}-{table}{CHANGELOG_SUFFIX}"


def config(name: str) -> dict[str, str]:
    """The topic configuration medclear creates a topic with: compacted tables, short-lived
    replies, and the events kept for ever (the log of record: ClickHouse, settlement and
    reconciliation can be rebuilt from it). Anything else keeps the cluster's retention."""
    if name in COMPACTED or name.endswith(CHANGELOG_SUFFIX):
        return {"cleanup.policy": "compact"}
    if name.startswith(REPLY_PREFIX):
        return {"retention.ms": str(REPLY_RETENTION_MS), "segment.ms": str(REPLY_SEGMENT_MS)}
    if name == EVENTS.name:
        return {"retention.ms": "-1"}
    return {}


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
