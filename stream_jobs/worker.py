"""The clearing worker: every person's aggregate, on medclear's stream runtime.

It reads `medclear.commands` (keyed by social security number, so one partition, hence
one worker, owns a person) in batches of at most BATCH_MAX, and for each batch:

1. asks the HSM about every PIN block of its swipes and balance enquiries, at once;
2. decides the commands in order (`clearing.batch.step`, pure: core.handle per command);
3. hands the runtime what the decisions ask for: the events (published: no card number,
   ssn, name or phone in clear, keyed by the person token) and card-index records as
   outputs, the changed persons as state of the `persons` table, and each reply, sealed,
   for the reply topic its command named.

The runtime then completes the batch in the order events acknowledged → state
(changelog, store) → replies → commit, and decides the next batch meanwhile
(IN_FLIGHT_MAX). After a crash at any point a command is either read again and decided
again on the state before it (the same decision: the core is deterministic and the time
is in the command; the same event ids, which every consumer dedupes), or its state is
stored and a repeat is answered from the reply the person remembers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog

from clearing import codec
from clearing.batch import BatchStep, CheckedPin, malformed, needs_pin, pin_card, step
from clearing.codes import InstitutionType, ResultCode
from clearing.model import (
    Authorize,
    BalanceInquiry,
    CardIssued,
    Command,
    Event,
    Person,
    Policy,
    Refunded,
    Reply,
    SwipeApproved,
    SwipeReversed,
)
from clearing.redact import Redaction, card_index_record, published
from medclear.infra import replies, topics
from medclear.infra.hsm_client import HsmClient
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import FETCH_WAIT_MS
from medclear.infra.pin_check import PinCheck
from medclear.infra.settings import Settings, pki_dir
from medclear.infra.tokens import load_redaction
from medclear.infra.topics import HEADER_EVENT_TYPE
from monitoring import metrics
from stream_jobs import jobs
from stream_runtime.batch import Batch
from stream_runtime.process import run_in_foreground
from stream_runtime.runtime import Runtime

log = structlog.get_logger(process="worker")

APP_ID = jobs.WORKER_KAFKA.prefix
PERSONS_TABLE = "persons"
BATCH_MAX = 256  # commands decided together at most
IN_FLIGHT_MAX = 2  # the next batch is decided while this one's acknowledgements are pending
STEP_NAMES = {"decide": "decide", "outputs": "events", "state": "state", "replies": "reply"}
PERSONS_DECODED_MAX = 10_000  # decoded persons kept, keyed by their stored bytes


class Worker:
    """The runtime's handler: a batch of command records → outputs, state, replies."""

    def __init__(self, policy: Policy, redaction: Redaction, pins: PinCheck | None) -> None:
        self.policy = policy
        self.redaction = redaction
        self.pins = pins
        # The person decoded from exactly these stored bytes: a person swiping again finds
        # it here rather than decoding its record once more (bounded, least recent out).
        self._decoded: OrderedDict[bytes, tuple[bytes, Person]] = OrderedDict()

    def _person(self, key: bytes, raw: bytes | None) -> Person | None:
        if raw is None:
            return None
        known = self._decoded.get(key)
        if known is not None and known[0] == raw:
            self._decoded.move_to_end(key)
            return known[1]
        person: Person = codec.decode(raw)
        self._remember(key, raw, person)
        return person

    def _remember(self, key: bytes, raw: bytes, person: Person) -> None:
        self._decoded[key] = (raw, person)
        self._decoded.move_to_end(key)
        while len(self._decoded) > PERSONS_DECODED_MAX:
            self._decoded.popitem(last=False)

    def _reply(self, batch: Batch, record: Any, reply: Reply) -> None:
        """To the asking gateway's reply topic (medclear/infra/replies.py), with no key (no
        ssn) of its own."""
        answer = replies.reply_record(record, reply, self.redaction.person)
        if answer is not None:
            topic, value, headers = answer
            batch.reply(topic, value, headers=headers)

    async def _answers(
        self,
        persons: dict[bytes, Person | None],
        commands: list[tuple[bytes, Command]],
        first: int,
        stopping: asyncio.Event,
    ) -> dict[int, CheckedPin]:
        """The HSM's answers for commands[first:] against `persons`, concurrently: against
        the card's PVV when it has one, else the block's form (an unknown card, or one with
        the initial PIN, still gets PIN_BLOCK_INVALID first: precedence)."""
        if self.pins is None:
            return {}
        pins = self.pins
        asks: dict[int, Any] = {}
        pvvs: dict[int, str] = {}
        for index in range(first, len(commands)):
            key, command = commands[index]
            person = persons.get(key)
            if isinstance(command, Authorize | BalanceInquiry) and needs_pin(person, command):
                card = pin_card(person, command)
                pvvs[index] = card.pvv if card is not None else ""
                asks[index] = pins.of_hex(
                    command.terminal_id, command.pin_block, command.card_no, pvvs[index], stopping
                )
        outcomes = await asyncio.gather(*asks.values())
        return {i: CheckedPin(o, pvvs[i]) for i, o in zip(asks, outcomes, strict=True)}

    async def handle(self, batch: Batch) -> None:
        started = time.perf_counter()
        metrics.WORKER_BATCH_SIZE.observe(len(batch.records))
        commands: list[tuple[bytes, Command]] = []
        origin: list[Any] = []  # the record of each command
        persons: dict[bytes, Person | None] = {}
        partition_of: dict[bytes, int] = {}
        for record in batch.records:
            key = record.key or b""
            try:
                command = codec.decode(record.value)
            except codec.CodecError:
                metrics.UNDECODABLE.labels(topics.COMMANDS.name).inc()
                log.warning("undecodable command", offset=record.offset)
                self._reply(batch, record, malformed())
                continue
            if command.ssn.encode() != key:  # routed by another key: one writer per person
                self._reply(batch, record, malformed(command.request_id, command.at_ms))
                continue
            metrics.INGRESS_LAG_SECONDS.observe(max(0.0, time.time() - command.at_ms / 1000))
            if key not in persons:
                persons[key] = self._person(key, batch.get(PERSONS_TABLE, record.partition, key))
                partition_of[key] = record.partition
            commands.append((key, command))
            origin.append(record)
        first, decided = 0, []
        while first < len(commands):
            answers = await self._answers(persons, commands, first, batch.runtime.stopping)
            result: BatchStep = step(persons, commands, answers, self.policy, first)
            decided += result.decided
            persons.update(result.persons)
            for key, person in result.persons.items():
                value = codec.encode(person) if person is not None else None
                batch.put(PERSONS_TABLE, partition_of[key], key, value)
                if value is not None and person is not None:
                    self._remember(key, value, person)
            first = result.recheck_from if result.recheck_from is not None else len(commands)
        for d in decided:
            for event in d.events:
                self._publish(batch, event)
            self._reply(batch, origin[d.index], d.reply)
        self._count(decided, time.perf_counter() - started)

    def _publish(self, batch: Batch, event: Event) -> None:
        out = published(event, self.redaction)  # keyed by the person token: no ssn
        batch.send(
            topics.EVENTS.name,
            codec.encode(out),
            key=out.person_ref.encode(),
            headers=((HEADER_EVENT_TYPE, type(out).__name__.encode()),),
        )
        if isinstance(event, CardIssued):
            ref, owner = card_index_record(event.card_no, event.ssn, self.redaction)
            batch.send(topics.CARD_INDEX.name, owner, key=ref)

    def _count(self, decided: list[Any], seconds: float) -> None:
        for d in decided:
            metrics.DECISIONS.labels(type(d.command).__name__, d.reply.result.name).inc()
            metrics.DECIDE_SECONDS.observe(seconds)
            if isinstance(d.command, Authorize):
                institution = self.policy.institutions.get(d.command.institution_id)
                label = institution.type.name.lower() if institution else "unknown"
                metrics.SWIPES.labels(d.reply.result.name, label).inc()
                metrics.INSTITUTION_SWIPES.labels(
                    d.command.institution_id if institution else "unknown",
                    "approved" if d.reply.result.approved else "declined",
                ).inc()
            for e in d.events:
                if isinstance(e, SwipeApproved):
                    metrics.INSTITUTION_PAID_FEN.labels(e.institution_id).inc(
                        e.paid_from_account_fen
                    )
                elif isinstance(e, SwipeReversed | Refunded):
                    metrics.INSTITUTION_RETURNED_FEN.labels(e.institution_id).inc(e.amount_fen)


class Echo(Worker):
    """The null pipeline (MEDCLEAR_WORKER_MODE=echo, benchmarks only): the same topics,
    batching and reply path, but no state, no HSM, no core, no events: every command is
    answered OK at once."""

    async def handle(self, batch: Batch) -> None:
        for record in batch.records:
            try:
                command = codec.decode(record.value)
                reply = Reply(command.request_id, ResultCode.OK, at_ms=command.at_ms)
            except codec.CodecError:
                reply = malformed()
            self._reply(batch, record, reply)


def observe_step(step_name: str, seconds: float) -> None:
    if step_name in STEP_NAMES:
        metrics.WORKER_STEP_SECONDS.labels(STEP_NAMES[step_name]).observe(seconds)


def create(settings: Settings, policy: Policy, kafka: KafkaAccess, index: int = 0) -> Runtime:
    redaction = load_redaction(settings)  # no card number, ssn, name or phone leaves in clear
    pins = (
        PinCheck(HsmClient(settings.hsm_address, pki_dir(settings)))
        if settings.terminal_security
        else None
    )
    echo = settings.worker_mode == "echo"
    if echo:
        log.warning("echo mode: commands are answered OK without being decided (benchmark)")
    handler = (Echo if echo else Worker)(policy, redaction, pins)
    return Runtime(
        job=APP_ID,
        member_id=f"worker-{index}",
        kafka=kafka,
        topic=topics.COMMANDS.name,
        handler=handler.handle,
        data_dir=data_dir(settings, index),
        tables=[] if echo else [PERSONS_TABLE],
        batch_max=BATCH_MAX,
        in_flight_max=IN_FLIGHT_MAX,
        observe_step=observe_step,
        fetch_wait_ms=FETCH_WAIT_MS,
    )


def data_dir(settings: Settings, index: int) -> Path:
    """Where worker `index` keeps its stores (one RocksDB per table partition)."""
    return settings.state_dir.resolve() / "data" / f"worker-{index}"


def zero_swipe_series(policy: Policy) -> None:
    """Every swipe series at 0 from the start (result codes × institution types, the
    designated institutions × outcome: bounded), so the first decline of a kind is an
    increase Prometheus sees, not a series that appears already at 1."""
    types = [t.name.lower() for t in InstitutionType if t] + ["unknown"]
    for code in ResultCode:
        for kind in types:
            metrics.SWIPES.labels(code.name, kind)
    for institution_id in [*policy.institutions, "unknown"]:
        for outcome in ("approved", "declined"):
            metrics.INSTITUTION_SWIPES.labels(institution_id, outcome)


def run(settings: Settings, policy: Policy, kafka: KafkaAccess, index: int) -> None:
    """Run one worker in the foreground until SIGTERM."""
    log.info(
        "worker starting",
        index=index,
        bootstrap=kafka.bootstrap,
        principal=kafka.principal,
        partitions=settings.command_partitions,
    )
    zero_swipe_series(policy)
    run_in_foreground([create(settings, policy, kafka, index)])
