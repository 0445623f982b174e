"""The stream jobs `medclear up` starts: name → "module:function".

Each function is `serve(settings, kafka, stopping)`, a coroutine that runs the job (its
stream runtimes, stream_runtime) until `stopping` is set, then finishes what is in flight
and commits. `medclear serve <name>` runs one job as a process; `medclear serve jobs` runs
the chosen ones (MEDCLEAR_JOBS, default all) in one process and one event loop, which is
how `medclear up` starts them unless MEDCLEAR_JOBS_IN_ONE_PROCESS=false (one process per
job: what production runs, and what isolates a job's crash); stream_jobs/host.py runs
them. This module imports no Kafka client: `medclear serve hsm` reads it too. Adding a job
is one line here.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import Settings
from stream_jobs.errors import StreamJobError

JOBS: dict[str, str] = {
    "pre-loss-timer": "stream_jobs.pre_loss_timer:serve",
    "clickhouse-sink": "stream_jobs.clickhouse_sink:serve",
    "sms": "stream_jobs.sms:serve",
    "abnormal": "stream_jobs.abnormal_job:serve",
    "settlement": "stream_jobs.settlement:serve",
}

JOB_HELP: dict[str, str] = {
    "pre-loss-timer": "sends an expiry command when a pre-loss deadline passes",
    "clickhouse-sink": "writes every event to ClickHouse (one row per event id)",
    "sms": "sends the consumption and card-status SMS over SMPP (medclear.sms-outcomes)",
    "abnormal": "flags abnormal transactions (异常交易) on the alerts topic",
    "settlement": "daily settlement per institution (medclear.settlements)",
}

JOBS_IN_ONE = "jobs"  # the component (and `medclear serve` role) that runs them in one process


@dataclass(frozen=True)
class KafkaNeeds:
    """What a job (its principal, `User:medclear-<job>`) may do on the broker, and no more
    (medclear/stack/acls.py grants exactly this): read `reads`, write `writes`, and own
    the consumer groups and changelog topics whose names start with `prefix` (its
    runtimes' application ids)."""

    prefix: str
    reads: tuple[str, ...]
    writes: tuple[str, ...] = ()


KAFKA: dict[str, KafkaNeeds] = {
    "pre-loss-timer": KafkaNeeds(
        "medclear-pre-loss-timer", (topics.EVENTS.name,), (topics.COMMANDS.name,)
    ),
    "clickhouse-sink": KafkaNeeds(
        "medclear-clickhouse-sink",
        (topics.EVENTS.name, topics.ALERTS.name, topics.SMS_OUTCOMES.name),
    ),
    "sms": KafkaNeeds("medclear-sms", (topics.EVENTS.name,), (topics.SMS_OUTCOMES.name,)),
    "abnormal": KafkaNeeds("medclear-abnormal", (topics.EVENTS.name,), (topics.ALERTS.name,)),
    "settlement": KafkaNeeds(
        "medclear-settlement",
        (topics.EVENTS.name, topics.SETTLEMENT_INPUT.name),
        (topics.SETTLEMENT_INPUT.name, topics.SETTLEMENTS.name),
    ),
}
# The clearing worker (stream_jobs/worker.py, a process of its own): the commands in, the
# events and the card index out, and a reply to whichever topic a command names.
WORKER_KAFKA = KafkaNeeds(
    "medclear-clearing", (topics.COMMANDS.name,), (topics.EVENTS.name, topics.CARD_INDEX.name)
)

ServeJob = Callable[[Settings, KafkaAccess, asyncio.Event], Coroutine[Any, Any, None]]


def selected(settings: Settings) -> list[str]:
    """The jobs to run: all of JOBS, or those MEDCLEAR_JOBS names, in JOBS's order."""
    wanted = [name.strip() for name in settings.jobs.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in JOBS]
    if unknown:
        raise StreamJobError(
            f"unknown stream job(s) {', '.join(unknown)}; known: {', '.join(JOBS)}"
        )
    return [name for name in JOBS if not wanted or name in wanted]


def server(name: str) -> ServeJob:
    """A job's `serve` coroutine function, imported only when it is asked for."""
    module, _, function = JOBS[name].partition(":")
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]
