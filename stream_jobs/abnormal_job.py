"""The abnormal-transaction job: published events in, alerts out (topic `medclear.alerts`).

One instance reads every partition of `medclear.events`: the terminal-burst rule needs
all of a terminal's swipes, which span persons and so partitions. The windows live in
memory; after a restart they refill from the events read again from the committed
offset, and an alert raised twice has the same id (sinks deduplicate by it). The rules
are in clearing/abnormal.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import faust
import structlog

from clearing import codec
from clearing.abnormal import BlockWatch, Detector
from medclear import topics
from medclear.faust_app import decode_event, events_topic, make_app, run_worker
from medclear.settings import Settings
from monitoring import metrics

log = structlog.get_logger(process="abnormal")
APP_ID = "medclear-abnormal"


def create_app(settings: Settings, bootstrap: str) -> faust.App:
    app = make_app(APP_ID, "abnormal-0", settings, bootstrap, settings.event_partitions)
    events = events_topic(app, settings)
    alerts = app.topic(topics.ALERTS.name, key_type=bytes, value_type=bytes,
                       partitions=settings.event_partitions, internal=False)  # fmt: skip
    detector = Detector()
    blocks = BlockWatch()

    @app.agent(events)
    async def watch(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            event = decode_event(raw)
            if event is None:
                yield None
                continue
            propagation_ms = blocks.observe(event)
            if propagation_ms is not None:
                metrics.CARD_BLOCK_TO_REFUSAL_SECONDS.observe(propagation_ms / 1000)
            for alert in detector.observe(event):
                await alerts.send(key=alert.person_ref.encode(), value=codec.encode(alert))
                metrics.ABNORMAL_ALERTS.labels(alert.kind.value).inc()
                log.info("abnormal transaction", kind=alert.kind.value, card=alert.card_masked,
                         terminal=alert.terminal_id, institution=alert.institution_id)  # fmt: skip
            yield None

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def readiness() -> None:
        metrics.READY.set(1 if app.consumer.assignment() and not app.rebalancing else 0)

    return app


def run(settings: Settings, bootstrap: str) -> None:
    app = create_app(settings, bootstrap)
    log.info("abnormal job starting")
    run_worker(app)
