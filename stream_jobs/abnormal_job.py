"""The abnormal-transaction job: published events in, alerts out (topic `medclear.alerts`),
on medclear's stream runtime.

One instance reads every partition of `medclear.events`: the terminal-burst rule needs
all of a terminal's swipes, which span persons and so partitions. The windows live in
memory; after a restart they refill from the events read again from the committed offset,
and an alert raised twice has the same id (sinks deduplicate by it). The alerts are
outputs: on the broker before the events that raised them are committed. The rules are
in clearing/abnormal.py.
"""

from __future__ import annotations

import asyncio

import structlog

from clearing import codec
from clearing.abnormal import EVENTS_READ, AlertKind, BlockWatch, Detector
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import Settings
from monitoring import metrics
from stream_jobs import jobs
from stream_jobs.events import decoded
from stream_runtime.batch import Batch
from stream_runtime.process import serve_runtimes
from stream_runtime.runtime import Runtime

log = structlog.get_logger(process="abnormal")
APP_ID = jobs.KAFKA["abnormal"].prefix
BATCH_MAX = 512


class Watch:
    def __init__(self) -> None:
        self.detector = Detector()
        self.blocks = BlockWatch()

    async def handle(self, batch: Batch) -> None:
        for _record, event in decoded(batch.records, topics.EVENTS.name, EVENTS_READ):
            propagation_ms = self.blocks.observe(event)
            if propagation_ms is not None:
                metrics.CARD_BLOCK_TO_REFUSAL_SECONDS.observe(propagation_ms / 1000)
            for alert in self.detector.observe(event):
                batch.send(topics.ALERTS.name, codec.encode(alert), key=alert.person_ref.encode())
                metrics.ABNORMAL_ALERTS.labels(alert.kind.value).inc()
                log.info(
                    "abnormal transaction",
                    kind=alert.kind.value,
                    card=alert.card_masked,
                    terminal=alert.terminal_id,
                    institution=alert.institution_id,
                )


def create(settings: Settings, kafka: KafkaAccess) -> Runtime:
    return Runtime(
        job=APP_ID,
        member_id="abnormal-0",
        kafka=kafka,
        topic=topics.EVENTS.name,
        handler=Watch().handle,
        data_dir=settings.state_dir.resolve() / "data" / "abnormal-0",
        batch_max=BATCH_MAX,
    )


async def serve(settings: Settings, kafka: KafkaAccess, stopping: asyncio.Event) -> None:
    log.info("abnormal job starting")
    for kind in AlertKind:  # every kind at 0 from the start: the first alert is an increase
        metrics.ABNORMAL_ALERTS.labels(kind.value)
    await serve_runtimes([create(settings, kafka)], [], stopping)
