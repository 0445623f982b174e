"""The clearing worker: a faust agent that runs core.handle on every command.

Thin adapter. It takes the records of `medclear.commands` (keyed by social security
number) in micro-batches (what arrived within 2 ms, at most 256) and for each batch:
decode → check the swipes' PINs through the HSM, concurrently → for each command in
order, read the person (from the table, or as an earlier command of the batch left it)
and core.handle it → send all the events and wait until the broker has them → write the
changed persons to the table (its changelog) → send each reply to the gateway's reply
topic named in the record's headers. faust acknowledges the batch's offsets after that.

Why that order (per batch as it was per command): faust flushes its producer before it
commits an offset, so a command
whose offset is committed has its state on the broker, and its events were acknowledged
before the state was even written. After a crash the command is either redelivered and
decided again on the old state (same decision: the core is deterministic and the time is
in the command; same event ids, which every sink dedupes) or answered from the reply the
stored state remembers.

Events, card-index records and replies go through a plain aiokafka producer owned by the
worker: waiting for an acknowledgement through faust's producer cost 3.5 ms a command,
through aiokafka 0.3 ms (docs/PERFORMANCE.md). The changelog stays faust's.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import faust
import structlog
from aiokafka import AIOKafkaProducer
from faust.streams import _current_event as faust_current_event

from clearing import codec, core
from clearing.codes import ResultCode
from clearing.model import (
    Authorize,
    BalanceInquiry,
    Card,
    CardIssued,
    Person,
    PinOutcome,
    Policy,
    Refunded,
    Reply,
    SwipeApproved,
    SwipeReversed,
)
from clearing.redact import card_index_record, published
from medclear import topics
from medclear.faust_app import make_app, run_worker
from medclear.hsm_client import HsmClient
from medclear.settings import Settings, pki_dir
from medclear.tokens import load_redaction
from medclear.topics import HEADER_CORRELATION, HEADER_REPLY_TO
from monitoring import metrics

log = structlog.get_logger(process="worker")

APP_ID = "medclear-clearing"
PERSONS_TABLE = "persons"
BATCH_MAX = 256  # commands decided together at most
BATCH_WAIT_S = 0.002  # how long a batch waits to fill: the latency it may add when idle


def _header(headers: Any, name: str) -> bytes | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    for key, value in items:
        if key == name:
            return bytes(value) if value is not None else None
    return None


class Outbox:
    """The worker's own producer for events, card-index records and replies."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None

    async def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all", linger_ms=0)
            await producer.start()
            self._producer = producer
        return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


HSM_RETRY_BACKOFF_MIN_S = 0.1
HSM_RETRY_BACKOFF_MAX_S = 5.0
PIN_OUTCOME_OF = {
    ResultCode.OK: PinOutcome.CORRECT,
    ResultCode.PIN_WRONG: PinOutcome.WRONG,
}  # anything else the HSM answers about a block (invalid, no PIN key) is an invalid block

PinRequest = Authorize | BalanceInquiry


class PinChecker:
    """Asks the HSM about a swipe's or a balance enquiry's PIN block: against the card's
    verification value when the card has one, else for the block's form only (an unknown
    card, or one with the initial PIN, still gets PIN_BLOCK_INVALID first: precedence).
    Only the encrypted block and the PVV cross; the answer is a PinOutcome."""

    def __init__(self, hsm: HsmClient) -> None:
        self._hsm = hsm

    async def outcome(self, command: PinRequest, card: Card | None) -> int:
        if not command.pin_block:
            return PinOutcome.INVALID_BLOCK
        try:
            block = bytes.fromhex(command.pin_block)
        except ValueError:
            return PinOutcome.INVALID_BLOCK
        backoff_s = HSM_RETRY_BACKOFF_MIN_S
        while True:  # no decision without the PIN check: this partition waits for the HSM
            if card is not None and card.pvv:
                code = await self._hsm.verify_pin(command.terminal_id, block, command.card_no,
                                                  bytes.fromhex(card.pvv))  # fmt: skip
            else:
                code = await self._hsm.check_pin_block(command.terminal_id, block,
                                                       command.card_no)  # fmt: skip
                if code == ResultCode.OK:
                    return PinOutcome.NOT_VERIFIED  # well formed; there is no PIN to match
            if code != ResultCode.UNAVAILABLE:
                return PIN_OUTCOME_OF.get(code, PinOutcome.INVALID_BLOCK)
            metrics.HSM_UNAVAILABLE.inc()
            log.warning("hsm unavailable; waiting", retry_in_s=backoff_s)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, HSM_RETRY_BACKOFF_MAX_S)


def create_app(settings: Settings, policy: Policy, bootstrap: str, index: int = 0) -> faust.App:
    app = make_app(
        APP_ID,
        f"worker-{index}",
        settings,
        bootstrap,
        settings.command_partitions,
        broker_commit_every=100,
        broker_commit_interval=0.5,
        stream_wait_empty=False,
        table_cleanup_interval=3600.0,
    )
    commands = app.topic(
        topics.COMMANDS.name,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.command_partitions,
        internal=False,
    )
    persons = app.Table(
        PERSONS_TABLE,
        default=None,
        partitions=settings.command_partitions,
        key_type=bytes,
        value_type=bytes,
    )
    outbox = Outbox(bootstrap)
    echo = settings.worker_mode == "echo"
    if echo:
        log.warning("echo mode: commands are answered OK without being decided (benchmark)")
    redaction = load_redaction(settings)  # no card number, ssn, name or phone leaves in clear
    pins = (PinChecker(HsmClient(settings.hsm_address, pki_dir(settings)))
            if settings.terminal_security else None)  # fmt: skip

    async def send_reply(headers: Any, key: bytes, reply: Reply) -> None:
        """To the asking gateway's reply topic, sealed under the person key (a reply may
        carry a person's whole record: a lookup), with no key (no ssn) of its own."""
        reply_to = _header(headers, HEADER_REPLY_TO)
        correlation = _header(headers, HEADER_CORRELATION)
        if reply_to and correlation:
            producer = await outbox.producer()
            sealed = redaction.person.seal_bytes(codec.encode(reply), correlation.hex())
            await producer.send(
                reply_to.decode(),
                value=sealed,
                headers=[(HEADER_CORRELATION, correlation)],
            )

    def needs_pin_check(person: Person | None, command: object) -> bool:
        """A swipe or balance enquiry whose PIN block the HSM must look at (not a repeat:
        that is answered from the remembered reply)."""
        if pins is None or not isinstance(command, Authorize | BalanceInquiry):
            return False
        return person is None or person.reply_to(command.request_id) is None

    def card_of(person: Person | None, command: PinRequest) -> Card | None:
        return person.card(command.card_no) if person is not None else None

    @app.agent(commands)
    async def clear(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        # Micro-batches: up to BATCH_MAX commands, or what arrived within BATCH_WAIT_S.
        # One wait for the broker's acknowledgement of all the batch's events replaces
        # one wait per command; faust acknowledges the batch's offsets after it is done.
        batches = stream.take_events(BATCH_MAX, within=BATCH_WAIT_S)  # type: ignore[attr-defined]
        async for batch in batches:
            await (echo_batch(batch) if echo else decide_batch(batch))
            yield None

    async def echo_batch(batch: list[Any]) -> None:
        """The null pipeline (MEDCLEAR_WORKER_MODE=echo, benchmarks only): the same
        topics, batching and reply path, but no state, no HSM, no core, no events: every
        command is answered OK at once."""
        for event in batch:
            key = event.key if isinstance(event.key, bytes) else b""
            try:
                command = codec.decode(event.value)
                reply = Reply(command.request_id, ResultCode.OK, at_ms=command.at_ms)
            except codec.CodecError:
                reply = Reply("", ResultCode.MALFORMED_REQUEST)
            await send_reply(event.message.headers, key, reply)

    async def decide_batch(batch: list[Any]) -> None:
        started = time.perf_counter()
        metrics.WORKER_BATCH_SIZE.observe(len(batch))
        stored: dict[bytes, Person | None] = {}  # persons as of this batch, newest first
        dirty: set[bytes] = set()
        replies: list[tuple[Any, bytes, Reply]] = []
        outgoing: list[tuple[bytes, Any]] = []
        decided: list[tuple[str, Reply, object]] = []

        def person_of(key: bytes) -> Person | None:
            if key not in stored:
                raw = persons.get(key)
                stored[key] = codec.decode(raw) if raw is not None else None
            return stored[key]

        accepted: list[tuple[Any, bytes, Any]] = []
        source: dict[bytes, Any] = {}  # key → its command's record (for the changelog partition)
        for event in batch:
            key = event.key if isinstance(event.key, bytes) else b""
            headers = event.message.headers
            try:
                command = codec.decode(event.value)
            except codec.CodecError:
                metrics.UNDECODABLE.labels(topics.COMMANDS.name).inc()
                log.warning("undecodable command", offset=event.message.offset)
                replies.append((headers, key, Reply("", ResultCode.MALFORMED_REQUEST)))
                continue
            if command.ssn.encode() != key:
                # Routed by another key: deciding it here would break one-writer-per-person.
                replies.append((headers, key, Reply(command.request_id,
                               ResultCode.MALFORMED_REQUEST, at_ms=command.at_ms)))  # fmt: skip
                continue
            metrics.INGRESS_LAG_SECONDS.observe(max(0.0, time.time() - command.at_ms / 1000))
            accepted.append((headers, key, command))
            source[key] = event

        # The HSM checks of the batch's PIN blocks, all at once, against the state before it.
        checks: dict[int, tuple[Card | None, asyncio.Task[int]]] = {}
        for i, (_headers, key, command) in enumerate(accepted):
            person = person_of(key)
            if needs_pin_check(person, command):
                assert pins is not None
                card = card_of(person, command)
                checks[i] = (card, asyncio.ensure_future(pins.outcome(command, card)))
        if checks:
            await asyncio.gather(*(task for _card, task in checks.values()))

        t0 = time.perf_counter()
        for i, (headers, key, command) in enumerate(accepted):
            person = person_of(key)
            if needs_pin_check(person, command):
                assert pins is not None
                card = card_of(person, command)
                checked = checks.get(i)
                pvv = card.pvv if card is not None else None
                if checked is not None and (checked[0].pvv if checked[0] else None) == pvv:
                    outcome = checked[1].result()
                else:  # the PIN changed earlier in this batch: check against the new one
                    outcome = await pins.outcome(command, card)
                command = replace(command, pin=outcome)
            new_person, decision = core.handle(person, command, policy)
            if new_person is not person:
                stored[key] = new_person
                dirty.add(key)
            for e in decision.events:
                outgoing.append((key, e))
            replies.append((headers, key, decision.reply))
            decided.append((type(command).__name__, decision.reply, command))
        t1 = time.perf_counter()
        if outgoing:
            producer = await outbox.producer()
            pending = []
            for _key, e in outgoing:
                out = published(e, redaction)  # keyed by the person's token: no ssn
                pending.append(await producer.send(topics.EVENTS.name,
                                                   key=out.person_ref.encode(),
                                                   value=codec.encode(out)))  # fmt: skip
                if isinstance(e, CardIssued):
                    ref, owner = card_index_record(e.card_no, e.ssn, redaction)
                    pending.append(await producer.send(topics.CARD_INDEX.name, key=ref,
                                                       value=owner))  # fmt: skip
            await asyncio.gather(*pending)  # the broker has every event of the batch
        t2 = time.perf_counter()
        for key in dirty:
            person = stored[key]
            if person is not None:
                # faust writes a table key to the changelog partition of "the record being
                # processed"; in a batch that is this key's own command record.
                token = faust_current_event.set(weakref.ref(source[key]))
                try:
                    persons[key] = codec.encode(person)
                finally:
                    faust_current_event.reset(token)
        t3 = time.perf_counter()
        for headers, key, reply in replies:
            await send_reply(headers, key, reply)
        t4 = time.perf_counter()
        for step, seconds in (
            ("decide", t1 - t0),
            ("events", t2 - t1),
            ("state", t3 - t2),
            ("reply", t4 - t3),
        ):
            metrics.WORKER_STEP_SECONDS.labels(step).observe(seconds)
        elapsed = time.perf_counter() - started
        for kind, reply, command in decided:
            metrics.DECISIONS.labels(kind, reply.result.name).inc()
            metrics.DECIDE_SECONDS.observe(elapsed)
            if isinstance(command, Authorize):
                institution = policy.institutions.get(command.institution_id)
                label = institution.type.name.lower() if institution else "unknown"
                metrics.SWIPES.labels(reply.result.name, label).inc()
                metrics.INSTITUTION_SWIPES.labels(
                    command.institution_id if institution else "unknown", reply.result.name
                ).inc()
        for _key, e in outgoing:
            if isinstance(e, SwipeApproved):
                metrics.INSTITUTION_PAID_FEN.labels(e.institution_id).inc(e.paid_from_account_fen)
            elif isinstance(e, SwipeReversed | Refunded):
                metrics.INSTITUTION_RETURNED_FEN.labels(e.institution_id).inc(e.amount_fen)

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def readiness() -> None:
        assigned = bool(app.consumer.assignment())
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        metrics.READY.set(1 if assigned and recovered and not app.rebalancing else 0)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def close_outbox(app: faust.App, **_: Any) -> None:
        await outbox.stop()

    return app


def run(settings: Settings, policy: Policy, bootstrap: str, index: int) -> None:
    """Run one worker in the foreground until SIGTERM."""
    app = create_app(settings, policy, bootstrap, index)
    log.info(
        "worker starting", index=index, bootstrap=bootstrap, partitions=settings.command_partitions
    )
    run_worker(app)
