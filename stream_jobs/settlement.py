"""The settlement job: a faust app reading `medclear.events`, state in Kafka by institution.

Events are keyed by person, settlement by institution, so the job has two agents:
- `route` reads `medclear.events` and forwards each settlement event (approved swipe,
  reversal, refund) unchanged to `medclear.settlement-input`, keyed by institution id: one
  partition, hence one agent, owns an institution (the through-topic faust's group_by
  would make, named and created by `up` like every topic);
- `settle` reads that topic and keeps each institution's state in the table
  `settlements` (key institution id, changelog in Kafka), applies the pure rules of
  clearing/settlement.py and publishes every changed day to the compacted topic
  `medclear.settlements`, keyed `institution:YYYY-MM-DD` (open updates, then the closed
  record, which is final).
A timer closes days: when an institution has a day past its cut-off it sends a close tick
keyed by that institution into the input topic, so the close is decided by the agent that
owns the institution, in order with its events (faust tables change only inside their
stream). Every event is also preceded by a close of what is due at that moment, so an
event read after the cut-off never enters the closed day even before the tick arrives.
A redelivered event (the input and events topics are at-least-once) has an id the state
already holds: nothing changes and nothing is published.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import faust
import structlog

from clearing import codec
from clearing import settlement as rules
from medclear import topics
from medclear.faust_app import decode_event, events_topic, export_readiness, make_app, run_worker
from medclear.settings import Settings
from monitoring import metrics

log = structlog.get_logger(process="settlement")
APP_ID = "medclear-settlement"
TICK_PREFIX = b"close-tick:"  # + institution id; any other value on the input is an event
CLOSE_CHECK_INTERVAL_S = 5.0  # how often the timer looks for days past their cut-off


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def create_app(
    settings: Settings, bootstrap: str, clock_ms: Callable[[], int] = wall_clock_ms
) -> faust.App:
    cutoff_ms = settings.settlement_cutoff_s * 1000
    partitions = settings.event_partitions
    app = make_app(APP_ID, "settlement-0", settings, bootstrap, partitions)
    events = events_topic(app, settings)
    by_institution = app.topic(topics.SETTLEMENT_INPUT.name, key_type=bytes, value_type=bytes,
                               partitions=partitions, internal=False)  # fmt: skip
    published = app.topic(topics.SETTLEMENTS.name, key_type=bytes, value_type=bytes,
                          partitions=partitions, internal=False)  # fmt: skip
    table = app.Table("settlements", default=None, partitions=partitions,
                      key_type=bytes, value_type=bytes)  # fmt: skip
    earliest_open: dict[str, int] = {}  # institution → its earliest open day (timer's index)
    indexed = [False]  # the index is built from the table once, after recovery

    @app.agent(events)
    async def route(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            event = decode_event(raw)
            entry = rules.entry_of(event) if event is not None else None
            if entry is not None:
                await by_institution.send(key=entry.institution_id.encode(), value=raw)
            yield None

    async def publish(records: list[rules.DaySettlement]) -> None:
        for record in records:
            await published.send(key=record.key.encode(), value=rules.encode_record(record))
            if record.closed:
                metrics.SETTLEMENT_DAYS_CLOSED.inc()
                log.info("day closed", institution=record.institution_id,
                         day=rules.iso_day(record.day), net_fen=record.net_fen)  # fmt: skip

    def remember(state: rules.InstitutionState) -> None:
        table[state.institution_id.encode()] = rules.encode_state(state)
        open_days = [d.day for d in state.days if not d.closed]
        if open_days:
            earliest_open[state.institution_id] = min(open_days)
        else:
            earliest_open.pop(state.institution_id, None)

    def load(institution_id: str) -> rules.InstitutionState | None:
        raw = table.get(institution_id.encode())
        return None if raw is None else rules.decode_state(raw)

    @app.agent(by_institution)
    async def settle(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for raw in stream:
            now_ms = clock_ms()
            if raw.startswith(TICK_PREFIX):
                institution_id = raw[len(TICK_PREFIX) :].decode()
                state = load(institution_id)
                if state is not None:
                    state, closed = rules.close_due(state, now_ms, cutoff_ms)
                    await publish(list(closed))
                    remember(state)
                yield None
                continue
            try:
                entry = rules.entry_of(codec.decode(raw))
            except codec.CodecError:
                metrics.UNDECODABLE.labels(topics.SETTLEMENT_INPUT.name).inc()
                yield None
                continue
            if entry is None:
                yield None
                continue
            before = load(entry.institution_id)
            state, records = rules.step(before, entry, now_ms, cutoff_ms)
            if state != before:
                await publish(records)
                remember(state)
            late = bool(records) and records[-1].day != entry.day
            outcome = "redelivered" if before is not None and before.seen(entry.event_id) else (
                "late" if late else "applied")  # fmt: skip
            metrics.SETTLEMENT_EVENTS.labels(entry.kind.value, outcome).inc()
            yield None

    @app.timer(CLOSE_CHECK_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def close_check() -> None:
        if not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
            return
        if not indexed[0]:
            for key, raw in list(table.items()):
                if raw is not None:
                    state = rules.decode_state(raw)
                    open_days = [d.day for d in state.days if not d.closed]
                    if open_days:
                        earliest_open.setdefault(key.decode(), min(open_days))
            indexed[0] = True
        through = rules.closable_through(clock_ms(), cutoff_ms)
        for institution_id, day in list(earliest_open.items()):
            if day <= through:
                await by_institution.send(
                    key=institution_id.encode(), value=TICK_PREFIX + institution_id.encode()
                )
        metrics.SETTLEMENT_OPEN_INSTITUTIONS.set(len(earliest_open))

    export_readiness(app)
    return app


def run(settings: Settings, bootstrap: str) -> None:
    app = create_app(settings, bootstrap)
    log.info("settlement starting", cutoff_s=settings.settlement_cutoff_s)
    run_worker(app)
