"""The pre-loss timer job, on medclear's stream runtime.

It reads `medclear.events` and keeps the pending pre-losses in its table `pre-losses`
(card token → the person's sealed ssn, the card token and the deadline; no ssn in clear
on any topic), and every `pre_loss_timer_interval_s` sends an ExpirePreLoss command for
each deadline that has passed to `medclear.commands` (keyed by the person, like every
command). Logic in stream_jobs.pre_loss; this module only translates. A redelivered
event sets the same entry again; an expiry sent twice is decided once by the core.
"""

from __future__ import annotations

import asyncio
import json
import time

import structlog

from clearing import codec
from clearing.model import CardStateChanged
from clearing.redact import PERSON, Sealer
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import Settings
from medclear.infra.tokens import load_sealer
from monitoring import metrics
from stream_jobs import jobs
from stream_jobs.events import decoded
from stream_jobs.pre_loss import Pending, due, track
from stream_runtime.batch import Batch
from stream_runtime.process import serve_runtimes
from stream_runtime.runtime import Runtime

log = structlog.get_logger(process="pre-loss-timer")
APP_ID = jobs.KAFKA["pre-loss-timer"].prefix
TABLE = "pre-losses"
BATCH_MAX = 512


async def follow(batch: Batch) -> None:
    """Every card-state change: a pre-loss report is pending until anything else happens."""
    for record, event in decoded(batch.records, topics.EVENTS.name, (CardStateChanged,)):
        if not isinstance(event, CardStateChanged):
            continue
        key = event.card_ref.encode()
        now = track(event)
        if now is None:
            if batch.get(TABLE, record.partition, key) is not None:
                batch.put(TABLE, record.partition, key, None)
        else:
            entry = json.dumps([now.sealed_ssn, now.card_ref, now.deadline_ms]).encode()
            batch.put(TABLE, record.partition, key, entry)


class Ticker:
    """Sends the expiry commands that are due, every interval."""

    def __init__(self, runtime: Runtime, person: Sealer, interval_s: float) -> None:
        self.runtime = runtime
        self.person = person  # opens the reports' sealed ssn, only to address a command
        self.interval_s = interval_s
        self.sent_at_ms: dict[str, int] = {}

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await asyncio.sleep(self.interval_s)
            await self.tick()

    async def tick(self) -> None:
        producer = self.runtime.producer
        if producer is None:
            return
        entries = [Pending(*json.loads(v)) for _k, v in self.runtime.store_items(TABLE)]
        now_ms = time.time_ns() // 1_000_000
        for command in due(entries, self.sent_at_ms, now_ms, lambda s: self.person.open(s)["ssn"]):
            await producer.send_and_wait(
                topics.COMMANDS.name, codec.encode(command), key=command.ssn.encode()
            )
            self.sent_at_ms[command.request_id] = now_ms
            metrics.PRE_LOSS_EXPIRIES.inc()
        metrics.PRE_LOSSES_PENDING.set(len(entries))


def create(settings: Settings, kafka: KafkaAccess) -> tuple[Runtime, Ticker]:
    runtime = Runtime(
        job=APP_ID,
        member_id="pre-loss-timer-0",
        kafka=kafka,
        topic=topics.EVENTS.name,
        handler=follow,
        data_dir=settings.state_dir.resolve() / "data" / "pre-loss-timer-0",
        tables=[TABLE],
        batch_max=BATCH_MAX,
    )
    return runtime, Ticker(
        runtime, load_sealer(settings, PERSON), settings.pre_loss_timer_interval_s
    )


async def serve(settings: Settings, kafka: KafkaAccess, stopping: asyncio.Event) -> None:
    runtime, ticker = create(settings, kafka)
    log.info("pre-loss timer starting", interval_s=settings.pre_loss_timer_interval_s)
    await serve_runtimes([runtime], [ticker.run], stopping)
