"""The sms job: `medclear.events` in, the consumption SMS out, on medclear's stream runtime.

Decisions are stream_jobs.sms_core's (pure); SMPP is stream_jobs.sms_smpp's; this module
orders the steps so that an SMS is neither lost nor sent twice across redelivery, an SMSC
outage, or a kill -9 of this process. The runtime runs it unpipelined:

1. take a batch of events; decide each against the person's row of the `sms-persons`
   table (phone book, settled ids, ids in flight, rate-limit times), keyed by the person
   token;
2. write the rows, now naming the SMS to send as *in flight*, and make them durable
   (`batch.flush()`: changelog acknowledged, store written);
3. per window of at most SMS_IN_FLIGHT_MAX (64) SMS: submit_sm every part and wait for
   every submit_sm_resp;
4. settle the window's SMS in their rows and publish their outcome records, durably;
   then the next window;
5. only when the handler has finished the batch does the runtime commit its offsets. A
   stop while the SMSC holds a batch leaves it uncommitted (read again after the
   restart).

No loss. An SMSC that is down, refuses the bind, drops the link, is silent for 10 s or
answers "throttled / queue full / system error" holds the batch: the parts it has not
accepted are sent again with a capped exponential back-off (0.2 s doubling to 10 s), and
nothing is settled or committed meanwhile. Other refusals (an invalid destination, say)
are permanent: the SMS is settled as `failed` and counted.

No duplicates. A redelivered event whose id is settled sends nothing. The residual window:
SMPP 3.4 has no idempotent submit. An id found *in flight* on redelivery was handed to
the SMSC by a process that died before the window's settlement reached the broker; it is
sent again, because losing a consumption SMS is worse than doubling one, flagged
`resent_uncertain` in its outcome record and counted. So a kill -9 can double at most one
window (64 SMS), and only if it lands between a window's submit and its flush (two broker
round trips). A part whose submit_sm_resp was lost with a dropped link is sent again too.
Measured with `medclear drill kill-loop --times 20` (20 swipes/s, the job killed 20
times), three runs: 3, 4 and 6 SMS doubled of ~4,000 (the run that counted flags: 6 of 6
flagged); the drill fails on them (DESIGN.md: no SMS twice) and says how many were
flagged. Closing the window needs an SMSC that deduplicates by a key of ours; SMPP 3.4
defines none. A graceful SMSC stop doubles nothing (tested, and in the smsc-outage drill):
the loopback SMSC unbinds its sessions, answers every submit_sm it recorded and refuses
(ESME_RSYSERR, retried after a back-off) what still comes. When it closed its sessions at
once, a submit_sm arriving meanwhile was recorded but never answered, and the drill
doubled 1 SMS of ~40 in every run. tests/integration/test_sms.py kills the job too:
nothing skipped, nothing committed past what is settled.

Outcomes go to `medclear.sms-outcomes` (key: the event id; JSON `sms_core.OutcomeRecord`):
`submitted` (SMSC message ids, parts, masked phone, event time, answer time), `failed`,
`no_phone`, `stale`, `rate_limited`, and `receipt` (stat, SMSC message id, and the event
id while the job remembers it). No phone number in clear and no ssn, so the ClickHouse
sink stores them. Delivery receipts are read during submits and by a poll every 1 s.

Metrics: `medclear_sms_sent_total{kind}`, `_failed_total{status}`, `_retries_total`,
`_suppressed_total{reason}`, `_resent_uncertain_total`, `_receipts_total{stat}`,
`medclear_sms_submit_seconds` (event at_ms → the last part's submit_sm_resp),
`medclear_smsc_bound`.

Settings: MEDCLEAR_SMS_ENABLED (false: the job idles, consuming nothing),
MEDCLEAR_SMSC_HOST, _PORT, _SYSTEM_ID, _PASSWORD (SMPP allows 8 characters),
_SOURCE_ADDR (12393), MEDCLEAR_SMS_TEMPLATES_FILE. `python -m medclear.bench.sms`
measures the job alone.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from clearing.redact import CONTACT
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import wait_for_topics
from medclear.infra.policy import load_institutions
from medclear.infra.settings import Settings, smsc_password
from medclear.infra.tokens import load_sealer
from monitoring import metrics
from stream_jobs import jobs, sms_core
from stream_jobs.errors import StreamJobError
from stream_jobs.events import decoded
from stream_jobs.sms_core import Context, Outcome, OutcomeRecord, PersonSms
from stream_jobs.sms_smpp import Receipt, SmppLink, SmscUnavailable, Submission
from stream_runtime.batch import Batch
from stream_runtime.process import serve_runtimes
from stream_runtime.runtime import Runtime, set_ready

log = structlog.get_logger(process="sms")
APP_ID = jobs.KAFKA["sms"].prefix
MEMBER_ID = "sms-0"
TABLE = "sms-persons"
BATCH_MAX = 1_000  # events taken at once
SMS_IN_FLIGHT_MAX = 64  # SMS submitted before their settlement is on the broker
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 10.0
RECEIPT_POLL_S = 1.0
SMSC_IDS_REMEMBERED_MAX = 200_000  # SMSC message id → event id, for receipts (memory only)
TEMPLATES_FILE = Path(__file__).parent / "templates" / "sms.toml"
LINK_CLOSE_TIMEOUT_S = 5.0  # unbind and close the SMPP link at a stop


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def load_context(settings: Settings) -> Context:
    path = settings.sms_templates_file or TEMPLATES_FILE
    templates = sms_core.parse_templates(path.read_text(encoding="utf-8"))
    institutions = load_institutions(settings.institutions_file)
    contact = load_sealer(settings, CONTACT)  # the only job that opens phones
    return Context(templates, contact, {i: inst.name for i, inst in institutions.items()})


class StopWithBatchUnfinished(StreamJobError):
    """The process stops while the SMSC holds a batch: it is left uncommitted."""


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

    async def submit(self, submissions: list[Submission], stopping: asyncio.Event) -> list[Receipt]:
        """Returns once the SMSC answered every part of every submission (accepted or
        refused for good); retries for as long as it takes, unless the process is asked
        to stop: then the batch is left unfinished (not committed: read again after the
        restart, its SMS in flight sent again, as after a kill -9)."""
        loop = asyncio.get_running_loop()
        delay_s = BACKOFF_FIRST_S
        while True:
            if stopping.is_set():
                raise StopWithBatchUnfinished("stopping while the SMSC holds a batch")
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
        self.executor.submit(self.link.close).result(timeout=LINK_CLOSE_TIMEOUT_S)
        self.executor.shutdown(wait=False)


class Job:
    """The runtime's handler, and the delivery receipts' poll."""

    def __init__(self, context: Context, sender: Sender) -> None:
        self.context = context
        self.sender = sender
        self.runtime: Runtime | None = None

    def _outcomes(self, batch: Batch, records: list[OutcomeRecord]) -> None:
        for record in records:
            batch.send(topics.SMS_OUTCOMES.name, record.to_json(), key=record.event_id.encode())

    async def handle(self, batch: Batch) -> None:
        seen_ms = now_ms()
        rows: dict[bytes, tuple[int, PersonSms]] = {}  # key → (partition, row)
        to_send: list[tuple[sms_core.Sms, bool]] = []
        queued: set[str] = set()
        suppressed: list[OutcomeRecord] = []
        for record, event in decoded(batch.records, topics.EVENTS.name, sms_core.EVENTS_READ):
            if not getattr(event, "person_ref", ""):  # not a published event of the worker
                continue
            key = event.person_ref.encode()
            if key not in rows:
                stored = batch.get(TABLE, record.partition, key)
                rows[key] = (
                    record.partition,
                    PersonSms.from_json(stored) if stored else PersonSms(),
                )
            partition, row = rows[key]
            decision = sms_core.decide(row, event, self.context, seen_ms)
            if decision.state != row:
                rows[key] = (partition, decision.state)
                batch.put(TABLE, partition, key, decision.state.to_json())
            if decision.sms is not None:
                if decision.sms.message_id in queued:  # the same event twice in one batch
                    metrics.SMS_SUPPRESSED.labels(Outcome.DUPLICATE.value).inc()
                    continue
                queued.add(decision.sms.message_id)
                to_send.append((decision.sms, decision.outcome == Outcome.RESEND_UNCERTAIN))
            elif decision.kind is not None:
                metrics.SMS_SUPPRESSED.labels(decision.outcome.value).inc()
                if decision.outcome in (Outcome.RATE_LIMITED, Outcome.STALE, Outcome.NO_PHONE):
                    suppressed.append(
                        OutcomeRecord(
                            event.event_id,
                            decision.outcome.value,
                            seen_ms,
                            decision.kind.value,
                            event.at_ms,
                        )
                    )
        self._outcomes(batch, suppressed)
        if not to_send:
            return
        await batch.flush()  # the in-flight marks are on the broker before any submit
        for start in range(0, len(to_send), SMS_IN_FLIGHT_MAX):
            window = to_send[start : start + SMS_IN_FLIGHT_MAX]
            submissions = [Submission.of(sms) for sms, _ in window]
            receipts = await self.sender.submit(submissions, batch.runtime.stopping)
            records: list[OutcomeRecord] = []
            for submission, (sms, uncertain) in zip(submissions, window, strict=True):
                key = sms.person_ref.encode()
                partition, row = rows[key]
                rows[key] = (partition, sms_core.settle(row, sms.message_id))
                batch.put(TABLE, partition, key, rows[key][1].to_json())
                records.append(outcome_of(submission, uncertain))
            self._outcomes(batch, records + self.receipt_records(receipts))
            await batch.flush()  # settled on the broker before the next window

    def receipt_records(self, receipts: list[Receipt]) -> list[OutcomeRecord]:
        records = []
        for receipt in receipts:
            metrics.SMS_RECEIPTS.labels(receipt.stat).inc()
            event_id = self.sender.event_of.get(receipt.smsc_message_id, "")
            records.append(
                OutcomeRecord(
                    event_id,
                    "receipt",
                    int(receipt.received_at * 1000),
                    smsc_message_ids=(receipt.smsc_message_id,),
                    status=receipt.stat,
                )
            )
        return records

    async def poll_receipts(self, stopping: asyncio.Event) -> None:
        """Every RECEIPT_POLL_S: delivery receipts the SMSC sent between submits."""
        while not stopping.is_set():
            await asyncio.sleep(RECEIPT_POLL_S)
            runtime = self.runtime
            if runtime is None or runtime.producer is None:
                continue
            records = self.receipt_records(await self.sender.poll())
            producer = runtime.producer
            sent = [
                await producer.send(topics.SMS_OUTCOMES.name, r.to_json(), key=r.event_id.encode())
                for r in records
            ]
            await asyncio.gather(*sent)


def create(settings: Settings, kafka: KafkaAccess, app_id: str = APP_ID) -> tuple[Runtime, Job]:
    job = Job(load_context(settings), Sender(settings))
    runtime = Runtime(
        job=app_id,
        member_id=MEMBER_ID,
        kafka=kafka,
        topic=topics.EVENTS.name,
        handler=job.handle,
        data_dir=settings.state_dir.resolve() / "data" / MEMBER_ID,
        tables=[TABLE],
        batch_max=BATCH_MAX,
    )
    job.runtime = runtime
    return runtime, job


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
    return OutcomeRecord(
        sms.message_id,
        outcome,
        answered_ms,
        sms.kind.value,
        sms.event_at_ms,
        sms.phone_masked,
        parts,
        submission.smsc_message_ids,
        uncertain,
        status,
    )


async def serve(settings: Settings, kafka: KafkaAccess, stopping: asyncio.Event) -> None:
    if not settings.sms_enabled:
        log.info("sms disabled (MEDCLEAR_SMS_ENABLED=false): idle, nothing consumed")
        set_ready(serve, True)
        await stopping.wait()
        return
    await wait_for_topics(kafka, [topics.SMS_OUTCOMES.name])  # `up` creates it
    runtime, job = create(settings, kafka)
    log.info(
        "sms job starting",
        smsc=f"{settings.smsc_host}:{settings.smsc_port}",
        in_flight_max=SMS_IN_FLIGHT_MAX,
    )
    try:
        await serve_runtimes([runtime], [job.poll_receipts], stopping)
    finally:
        job.sender.close()
