"""The sms job: a faust app reading `medclear.events` and sending the consumption SMS.

Decisions are stream_jobs.sms_core's (pure); SMPP is stream_jobs.sms_smpp's; this module
orders the steps so that an SMS is neither lost nor sent twice across redelivery, an SMSC
outage, or a kill -9 of this process:

1. take a batch of events; decide each against the person's row of the `sms-persons`
   table (phone book, settled ids, ids in flight, rate-limit times), keyed by ssn;
2. write the rows, now naming the SMS to send as *in flight*, and wait until the broker
   has the changelog records (`producer.flush()`, acks=all);
3. per window of at most SMS_IN_FLIGHT_MAX SMS: submit_sm every part, retrying with a
   capped exponential back-off until the SMSC has answered every part (an SMSC that is
   down holds the batch: nothing is committed, nothing is skipped);
4. settle those SMS in their rows, publish their outcome records, wait for the broker;
5. only then does the loop ask for the next batch, and faust acknowledges the batch's
   offsets (committed after its producer flush).

A redelivered event whose id is settled sends nothing. One whose id is in flight was
handed to the SMSC by a process that died before step 4 reached the broker: SMPP has no
idempotent submit, so it is sent again and counted (`medclear_sms_resent_uncertain_total`,
outcome `resent_uncertain`). At most SMS_IN_FLIGHT_MAX SMS can be doubled per kill -9, and
only if the kill falls between a window's submit and its settlement's flush.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiokafka
import faust
import structlog

from clearing.redact import CONTACT
from medclear import topics
from medclear.faust_app import (
    SkippedRecords,
    decode_event,
    events_topic,
    export_readiness,
    make_app,
    run_worker,
)
from medclear.policy import load_institutions
from medclear.settings import Settings, smsc_password
from medclear.tokens import load_sealer
from monitoring import metrics
from stream_jobs import sms_core
from stream_jobs.sms_core import Context, Outcome, OutcomeRecord, PersonSms
from stream_jobs.sms_smpp import Receipt, SmppLink, SmscUnavailable, Submission

log = structlog.get_logger(process="sms")
APP_ID = "medclear-sms"
MEMBER_ID = "sms-0"
TABLE = "sms-persons"
BATCH_MAX = 1_000  # events taken from the stream at once
BATCH_WITHIN_S = 0.05  # ... or what arrived within this
SMS_IN_FLIGHT_MAX = 64  # SMS submitted before their settlement is on the broker
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
RECEIPT_POLL_S = 1.0
OUTCOME_LINGER_MS = 2
SMSC_IDS_REMEMBERED_MAX = 200_000  # SMSC message id → event id, for receipts (memory only)
EXIT_BATCH_FAILED = 70  # EX_SOFTWARE: a batch failed (broker gone for longer than its timeouts)
TEMPLATES_FILE = Path(__file__).parent / "templates" / "sms.toml"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def load_context(settings: Settings) -> Context:
    path = settings.sms_templates_file or TEMPLATES_FILE
    templates = sms_core.parse_templates(path.read_text(encoding="utf-8"))
    institutions = load_institutions(settings.institutions_file)
    contact = load_sealer(settings, CONTACT)  # the only job that opens phones
    return Context(templates, contact, {i: inst.name for i, inst in institutions.items()})


class Sender:
    """The SMPP link behind one thread, with retries and the receipts' id map."""

    def __init__(self, settings: Settings) -> None:
        self.link = SmppLink(
            settings.smsc_host,
            settings.smsc_port,
            settings.smsc_system_id,
            smsc_password(settings),
            settings.smsc_source_addr,
            log=log,
        )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smpp")
        self.event_of: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def submit(self, submissions: list[Submission]) -> list[Receipt]:
        """Returns once the SMSC answered every part of every submission (accepted or
        refused for good); retries for as long as it takes."""
        loop = asyncio.get_running_loop()
        delay_s = BACKOFF_FIRST_S
        while True:
            try:
                receipts = await loop.run_in_executor(self.executor, self.link.submit, submissions)
            except SmscUnavailable as exc:
                metrics.SMSC_BOUND.set(0)
                metrics.SMS_RETRIES.inc()
                log.warning("smsc unavailable; retrying", error=str(exc), retry_in_s=delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, BACKOFF_MAX_S)
                continue
            metrics.SMSC_BOUND.set(1)
            for submission in submissions:
                for smsc_id in submission.smsc_message_ids:
                    self.event_of[smsc_id] = submission.sms.message_id
            while len(self.event_of) > SMSC_IDS_REMEMBERED_MAX:
                self.event_of.popitem(last=False)
            return receipts

    async def poll(self) -> list[Receipt]:
        loop = asyncio.get_running_loop()
        receipts = await loop.run_in_executor(self.executor, self.link.poll)
        metrics.SMSC_BOUND.set(1 if self.link.bound else 0)
        return receipts

    def close(self) -> None:
        self.executor.submit(self.link.close).result(timeout=5)
        self.executor.shutdown(wait=False)


def create_app(settings: Settings, bootstrap: str, app_id: str = APP_ID) -> faust.App:
    context = load_context(settings)
    # stream_wait_empty off: a stop must not wait for a batch the SMSC is holding; the
    # agent is cancelled and leaves without acknowledging it (see follow below)
    app = make_app(app_id, MEMBER_ID, settings, bootstrap, settings.event_partitions,
                   stream_wait_empty=False)  # fmt: skip
    events = events_topic(app, settings)
    # Rows keyed by the person token, written with the producer's partitioner: the same
    # partition the clearing worker's events for that person are on (both hash the token's
    # bytes), also for writes made outside a single event's context (a batch).
    persons = app.Table(TABLE, default=None, partitions=settings.event_partitions,
                        key_type=bytes, value_type=bytes, use_partitioner=True)  # fmt: skip
    sender = Sender(settings)

    # Outcome records go through an aiokafka producer of our own: faust's producer hands
    # its buffer over one awaited message at a time (~1.5 ms each, measured here).
    outbox: list[aiokafka.AIOKafkaProducer] = []

    async def publish(records: list[OutcomeRecord]) -> list[asyncio.Future[object]]:
        """Handed to the producer; the futures resolve when the broker has them."""
        if not outbox:
            producer = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                                 linger_ms=OUTCOME_LINGER_MS)  # fmt: skip
            await producer.start()
            outbox.append(producer)
        return [await outbox[0].send(topics.SMS_OUTCOMES.name, key=r.event_id.encode(),
                                     value=r.to_json()) for r in records]  # fmt: skip

    async def record_receipts(receipts: list[Receipt]) -> list[asyncio.Future[object]]:
        records = []
        for receipt in receipts:
            metrics.SMS_RECEIPTS.labels(receipt.stat).inc()
            event_id = sender.event_of.get(receipt.smsc_message_id, "")
            records.append(OutcomeRecord(event_id, "receipt", int(receipt.received_at * 1000),
                                         smsc_message_ids=(receipt.smsc_message_id,),
                                         status=receipt.stat))  # fmt: skip
        return await publish(records)

    async def handle(batch: list[bytes]) -> None:
        seen_ms = now_ms()
        rows: dict[bytes, PersonSms] = {}
        dirty: set[bytes] = set()
        to_send: list[tuple[sms_core.Sms, bool]] = []
        queued: set[str] = set()
        suppressed: list[OutcomeRecord] = []
        for raw in batch:
            event = decode_event(raw)
            if event is None:
                continue
            if not getattr(event, "person_ref", ""):  # not a published event of the worker
                continue
            key = event.person_ref.encode()
            if key not in rows:
                stored = persons.get(key)
                rows[key] = PersonSms.from_json(stored) if stored else PersonSms()
            decision = sms_core.decide(rows[key], event, context, seen_ms)
            if decision.state != rows[key]:
                rows[key] = decision.state
                dirty.add(key)
            if decision.sms is not None:
                if decision.sms.message_id in queued:  # the same event twice in one batch
                    metrics.SMS_SUPPRESSED.labels(Outcome.DUPLICATE.value).inc()
                    continue
                queued.add(decision.sms.message_id)
                to_send.append((decision.sms, decision.outcome == Outcome.RESEND_UNCERTAIN))
            elif decision.kind is not None:
                metrics.SMS_SUPPRESSED.labels(decision.outcome.value).inc()
                if decision.outcome in (Outcome.RATE_LIMITED, Outcome.STALE, Outcome.NO_PHONE):
                    suppressed.append(OutcomeRecord(event.event_id, decision.outcome.value,
                                                    seen_ms, decision.kind.value,
                                                    event.at_ms))  # fmt: skip
        for key in dirty:
            persons[key] = rows[key].to_json()
        published = await publish(suppressed)
        if not to_send:
            await asyncio.gather(*published)
            return
        await app.producer.flush()  # the in-flight marks are on the broker before a submit
        await asyncio.gather(*published)
        for start in range(0, len(to_send), SMS_IN_FLIGHT_MAX):
            window = to_send[start : start + SMS_IN_FLIGHT_MAX]
            submissions = [Submission.of(sms) for sms, _ in window]
            receipts = await sender.submit(submissions)
            records: list[OutcomeRecord] = []
            for submission, (sms, uncertain) in zip(submissions, window, strict=True):
                key = sms.person_ref.encode()
                rows[key] = sms_core.settle(rows[key], sms.message_id)
                persons[key] = rows[key].to_json()
                records.append(outcome_of(submission, uncertain))
            published = await publish(records) + await record_receipts(receipts)
            await app.producer.flush()  # settled on the broker before the next window
            await asyncio.gather(*published)

    skipped = SkippedRecords(bootstrap, topics.EVENTS.name)

    @app.agent(events)
    async def follow(stream: faust.StreamT[bytes]) -> None:
        batches = stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)  # type: ignore[attr-defined]
        async for batch in batches:
            try:
                await handle(await skipped.values(batch))
            except BaseException as exc:  # every way out is handled alike
                # take_events() acknowledges a batch's events in a `finally`, also when the loop
                # body was cancelled (a stop) or failed: leave before it can, so faust
                # never commits an offset whose SMS was not settled. The restart then sees
                # the batch again (in-flight ids are sent again, as after a kill -9).
                stopping = isinstance(exc, asyncio.CancelledError)
                log.error("batch not finished; exiting without acknowledging it",
                          stopping=stopping, error=repr(exc))  # fmt: skip
                sys.stderr.flush()
                os._exit(0 if stopping else EXIT_BATCH_FAILED)

    @app.timer(RECEIPT_POLL_S)  # type: ignore[untyped-decorator]
    async def receipts() -> None:
        await asyncio.gather(*await record_receipts(await sender.poll()))

    export_readiness(app)
    return app


def outcome_of(submission: Submission, uncertain: bool) -> OutcomeRecord:
    sms = submission.sms
    answered_ms = int(submission.answered_at * 1000) or now_ms()
    if submission.refused_status is not None:
        status = f"0x{submission.refused_status:08x}"
        metrics.SMS_FAILED.labels(status).inc()
        log.warning("sms refused by the smsc", event_id=sms.message_id, status=status)
        outcome, parts = "failed", len(submission.parts)
    else:
        metrics.SMS_SENT.labels(sms.kind.value).inc()
        metrics.SMS_SUBMIT_SECONDS.observe(max(0, answered_ms - sms.event_at_ms) / 1000)
        outcome, parts, status = "submitted", len(submission.parts), ""
    if uncertain:
        metrics.SMS_RESENT_UNCERTAIN.inc()
        log.warning("sms in flight at a crash sent again", event_id=sms.message_id)
    return OutcomeRecord(sms.message_id, outcome, answered_ms, sms.kind.value, sms.event_at_ms,
                         sms.phone_masked, parts, submission.smsc_message_ids, uncertain,
                         status)  # fmt: skip


def run(settings: Settings, bootstrap: str) -> None:
    if not settings.sms_enabled:
        log.info("sms disabled (MEDCLEAR_SMS_ENABLED=false): idle, nothing consumed")
        metrics.READY.set(1)
        threading.Event().wait()
        return
    # its own thread: asyncio.run would leave this thread without the loop faust expects
    wanted = {topics.SMS_OUTCOMES.name: settings.event_partitions}
    creator = threading.Thread(target=asyncio.run, args=(topics.ensure_topics(bootstrap, wanted),))
    creator.start()
    creator.join()
    app = create_app(settings, bootstrap)
    log.info("sms job starting", smsc=f"{settings.smsc_host}:{settings.smsc_port}",
             in_flight_max=SMS_IN_FLIGHT_MAX)  # fmt: skip
    run_worker(app)
