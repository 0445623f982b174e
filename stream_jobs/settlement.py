"""The settlement job: state by institution, on medclear's stream runtime.

Events are keyed by person, settlement by institution, so the job runs two runtimes in one
process:
- `route` (group medclear-settlement-route) reads `medclear.events` and forwards each
  settlement event (approved swipe, reversal, refund) unchanged to
  `medclear.settlement-input` (a through topic, created by `medclear up`), keyed by
  institution id: one partition, hence one owner, per institution;
- `settle` (group medclear-settlement) reads that topic and keeps each institution's state
  in the table `settlements` (key institution id, changelog `medclear-settlement-
  settlements-changelog`), applies the pure rules of clearing/settlement.py and publishes
  every changed day to the compacted topic `medclear.settlements`, keyed
  `institution:YYYY-MM-DD` (open updates, then the closed record, which is final). The
  records are outputs: on the broker before the state that made them is written.
A timer closes days: when an institution has a day past its cut-off it sends a close tick
keyed by that institution into the input topic, so the close is decided by the owner of
the institution, in order with its events. Every event is also preceded by a close of
what is due at that moment, so an event read after the cut-off never enters the closed day
even before the tick arrives. A redelivered event has an id the state already holds:
nothing changes and nothing is published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from clearing import codec
from clearing import settlement as rules
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.settings import Settings
from monitoring import metrics
from stream_jobs import jobs
from stream_jobs.events import decoded
from stream_runtime.batch import Batch
from stream_runtime.process import serve_runtimes
from stream_runtime.runtime import Runtime

log = structlog.get_logger(process="settlement")
APP_ID = jobs.KAFKA["settlement"].prefix
ROUTE_ID = f"{APP_ID}-route"
TABLE = "settlements"
TICK_PREFIX = b"close-tick:"  # + institution id; any other value on the input is an event
CLOSE_CHECK_INTERVAL_S = 5.0  # how often the timer looks for days past their cut-off
BATCH_MAX = 512
# The stages an event goes through before settlement counts it, in order: what a report
# waits for (medclear.infra.kafka_admin.wait_caught_up) before it reads the settlements.
STAGES = ((ROUTE_ID, topics.EVENTS.name), (APP_ID, topics.SETTLEMENT_INPUT.name))


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


async def route(batch: Batch) -> None:
    """medclear.events → medclear.settlement-input, keyed by institution."""
    for record, event in decoded(batch.records, topics.EVENTS.name, rules.ENTRY_EVENTS):
        entry = rules.entry_of(event)
        if entry is not None:
            batch.send(
                topics.SETTLEMENT_INPUT.name, record.value, key=entry.institution_id.encode()
            )


class Settle:
    """The handler of `settle`, and the index of each institution's earliest open day that
    the close timer reads."""

    def __init__(self, cutoff_ms: int, clock_ms: Callable[[], int]) -> None:
        self.cutoff_ms = cutoff_ms
        self.clock_ms = clock_ms
        self.earliest_open: dict[str, int] = {}

    def _remember(self, batch: Batch, partition: int, state: rules.InstitutionState) -> None:
        batch.put(TABLE, partition, state.institution_id.encode(), rules.encode_state(state))
        self._index(state)

    def _index(self, state: rules.InstitutionState) -> None:
        open_days = [d.day for d in state.days if not d.closed]
        if open_days:
            self.earliest_open[state.institution_id] = min(open_days)
        else:
            self.earliest_open.pop(state.institution_id, None)

    def rebuild_index(self, runtime: Runtime) -> None:
        """After an assignment: the open days of the institutions this process owns now."""
        self.earliest_open.clear()
        for _key, raw in runtime.store_items(TABLE):
            self._index(rules.decode_state(raw))

    def _publish(self, batch: Batch, records: list[rules.DaySettlement]) -> None:
        for record in records:
            batch.send(
                topics.SETTLEMENTS.name, rules.encode_record(record), key=record.key.encode()
            )
            if record.closed:
                metrics.SETTLEMENT_DAYS_CLOSED.inc()
                log.info(
                    "day closed",
                    institution=record.institution_id,
                    day=rules.iso_day(record.day),
                    net_fen=record.net_fen,
                )

    def _load(
        self, batch: Batch, partition: int, institution: str
    ) -> rules.InstitutionState | None:
        raw = batch.get(TABLE, partition, institution.encode())
        return None if raw is None else rules.decode_state(raw)

    async def handle(self, batch: Batch) -> None:
        for record in batch.records:
            now_ms = self.clock_ms()
            raw = record.value or b""
            if raw.startswith(TICK_PREFIX):
                institution = raw[len(TICK_PREFIX) :].decode()
                state = self._load(batch, record.partition, institution)
                if state is not None:
                    state, closed = rules.close_due(state, now_ms, self.cutoff_ms)
                    self._publish(batch, list(closed))
                    self._remember(batch, record.partition, state)
                continue
            try:
                entry = rules.entry_of(codec.decode(raw))
            except codec.CodecError:
                metrics.UNDECODABLE.labels(topics.SETTLEMENT_INPUT.name).inc()
                continue
            if entry is None:
                continue
            before = self._load(batch, record.partition, entry.institution_id)
            state, records = rules.step(before, entry, now_ms, self.cutoff_ms)
            if state != before:
                self._publish(batch, records)
                self._remember(batch, record.partition, state)
            late = bool(records) and records[-1].day != entry.day
            outcome = (
                "redelivered"
                if before is not None and before.seen(entry.event_id)
                else ("late" if late else "applied")
            )
            metrics.SETTLEMENT_EVENTS.labels(entry.kind.value, outcome).inc()

    async def close_ticks(self, settle: Runtime, stopping: asyncio.Event) -> None:
        """Every CLOSE_CHECK_INTERVAL_S: a close tick for each institution whose earliest
        open day is past its cut-off, into the input (decided in order with its events)."""
        while not stopping.is_set():
            await asyncio.sleep(CLOSE_CHECK_INTERVAL_S)
            producer = settle.producer
            if producer is None:
                continue
            through = rules.closable_through(self.clock_ms(), self.cutoff_ms)
            for institution_id, day in list(self.earliest_open.items()):
                if day <= through:
                    await producer.send(
                        topics.SETTLEMENT_INPUT.name,
                        TICK_PREFIX + institution_id.encode(),
                        key=institution_id.encode(),
                    )
            metrics.SETTLEMENT_OPEN_INSTITUTIONS.set(len(self.earliest_open))


def create(
    settings: Settings, kafka: KafkaAccess, clock_ms: Callable[[], int] = wall_clock_ms
) -> tuple[Runtime, Runtime, Settle]:
    settle = Settle(settings.settlement_cutoff_s * 1000, clock_ms)
    data = settings.state_dir.resolve() / "data" / "settlement-0"
    router = Runtime(
        job=ROUTE_ID,
        member_id="settlement-route-0",
        kafka=kafka,
        topic=topics.EVENTS.name,
        handler=route,
        data_dir=data / "route",
        batch_max=BATCH_MAX,
    )
    settler = Runtime(
        job=APP_ID,
        member_id="settlement-0",
        kafka=kafka,
        topic=topics.SETTLEMENT_INPUT.name,
        handler=settle.handle,
        data_dir=data,
        tables=[TABLE],
        batch_max=BATCH_MAX,
    )

    async def ready() -> None:
        settle.rebuild_index(settler)

    settler.on_ready = ready
    return router, settler, settle


async def serve(settings: Settings, kafka: KafkaAccess, stopping: asyncio.Event) -> None:
    router, settler, settle = create(settings, kafka)
    log.info("settlement starting", cutoff_s=settings.settlement_cutoff_s)
    await serve_runtimes(
        [router, settler], [lambda stopping: settle.close_ticks(settler, stopping)], stopping
    )
