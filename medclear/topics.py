"""Every Kafka topic medclear uses, with its key and partitioning, in one place."""

from __future__ import annotations

from dataclasses import dataclass

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
    key="social security number",
    purpose="what the clearing workers decided; read by every downstream job",
)
CARD_INDEX = Topic(
    "medclear.card-index",
    key="card number",
    purpose="card number -> social security number, for requests that lack the latter",
)
REPLY_PREFIX = "medclear.replies."  # + gateway instance id; one partition each


def reply_topic(instance_id: str) -> str:
    return REPLY_PREFIX + instance_id


def partitions(settings: Settings) -> dict[str, int]:
    """The topics `medclear up` creates before any worker starts, with partition counts."""
    return {
        COMMANDS.name: settings.command_partitions,
        EVENTS.name: settings.event_partitions,
        CARD_INDEX.name: 1,
    }
