"""The pre-loss timer job: a faust app reading `medclear.events`.

It keeps the pending pre-losses in a table (card token → the person's sealed ssn and the
deadline, with a changelog: no ssn in clear on any topic) and, every
`pre_loss_timer_interval_s`, sends an ExpirePreLoss command for each deadline that has
passed to `medclear.commands` (keyed by the person, like every command). Logic in
stream_jobs.pre_loss; this module only translates.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import faust
import structlog

from clearing import codec
from clearing.model import CardStateChanged
from clearing.redact import PERSON
from medclear import topics
from medclear.faust_app import decode_event, events_topic, export_readiness, make_app, run_worker
from medclear.settings import Settings
from medclear.tokens import load_sealer
from monitoring import metrics
from stream_jobs.pre_loss import Pending, due, track

log = structlog.get_logger(process="pre-loss-timer")
APP_ID = "medclear-pre-loss-timer"


def create_app(settings: Settings, bootstrap: str) -> faust.App:
    app = make_app(APP_ID, "pre-loss-timer-0", settings, bootstrap, settings.event_partitions)
    events = events_topic(app, settings)
    commands = app.topic(topics.COMMANDS.name, key_type=bytes, value_type=bytes,
                         internal=False)  # fmt: skip
    pending = app.Table("pre-losses", default=None, partitions=settings.event_partitions,
                        key_type=bytes, value_type=bytes)  # fmt: skip
    sent_at_ms: dict[str, int] = {}
    person = load_sealer(settings, PERSON)  # opens the reports' sealed ssn

    @app.agent(events)
    async def follow(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            event = decode_event(raw)
            if isinstance(event, CardStateChanged):
                key = event.card_ref.encode()
                now = track(event)
                if now is None:
                    if pending.get(key) is not None:
                        del pending[key]
                else:
                    pending[key] = json.dumps([now.sealed_ssn, now.card_ref,
                                               now.deadline_ms]).encode()  # fmt: skip
            yield None

    @app.timer(settings.pre_loss_timer_interval_s)  # type: ignore[untyped-decorator]
    async def tick() -> None:
        entries = [Pending(*json.loads(v)) for v in pending.values() if v is not None]
        now_ms = time.time_ns() // 1_000_000
        for command in due(entries, sent_at_ms, now_ms, lambda s: person.open(s)["ssn"]):
            await commands.send(key=command.ssn.encode(), value=codec.encode(command))
            sent_at_ms[command.request_id] = now_ms
            metrics.PRE_LOSS_EXPIRIES.inc()
        metrics.PRE_LOSSES_PENDING.set(len(entries))

    export_readiness(app)
    return app


def run(settings: Settings, bootstrap: str) -> None:
    app = create_app(settings, bootstrap)
    log.info("pre-loss timer starting", interval_s=settings.pre_loss_timer_interval_s)
    run_worker(app)
