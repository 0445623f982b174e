"""The clearing worker: a faust agent that runs core.handle on every command.

Thin adapter. For each record of `medclear.commands` (keyed by social security number):
decode → read the person from the `persons` table → core.handle → send the events and
wait until the broker has them → write the person to the table (its changelog) → send
the reply to the gateway's reply topic named in the record's headers.

Why that order: faust flushes its producer before it commits an offset, so a command
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
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import faust
import grpc
import structlog
from aiokafka import AIOKafkaProducer

from clearing import codec, core
from clearing.codes import ResultCode
from clearing.model import (
    Authorize,
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
from clearing.redact import published
from medclear import topics
from medclear.faust_app import make_app
from medclear.settings import Settings, pki_dir
from medclear.tokens import load_card_tokens
from monitoring import metrics

log = structlog.get_logger(process="worker")

HEADER_REPLY_TO = "reply-to"
HEADER_CORRELATION = "correlation-id"
APP_ID = "medclear-clearing"
PERSONS_TABLE = "persons"


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


class PinChecker:
    """Asks the HSM whether a swipe's PIN block matches the card's verification value.
    Only the encrypted block and the PVV cross; the answer is a PinOutcome."""

    def __init__(self, hsm_address: str, pki_dir: Path | None) -> None:
        self._address = hsm_address
        self._pki_dir = pki_dir
        self._stub: Any = None

    async def outcome(self, command: Authorize, card: Card) -> int:
        from medclear.pki import Role
        from medclear.rpc import aio_channel, pb_enum
        from medclear.terminals import PIN_BLOCK_FORMAT, PVK_ID, tpk_id
        from medclear.v1 import hsm_pb2, hsm_pb2_grpc

        if not card.pvv:
            return PinOutcome.NOT_VERIFIED  # no PIN was ever set through the HSM
        if self._stub is None:
            channel = aio_channel(self._address, Role.SERVICE, self._pki_dir)
            self._stub = hsm_pb2_grpc.HsmServiceStub(channel)
        try:
            block = bytes.fromhex(command.pin_block)
        except ValueError:
            return PinOutcome.INVALID_BLOCK
        request = hsm_pb2.VerifyPinRequest(
            pin_key=hsm_pb2.KeyRef(key_id=tpk_id(command.terminal_id)),
            verification_key=hsm_pb2.KeyRef(key_id=PVK_ID),
            pin_block=block,
            format=pb_enum(PIN_BLOCK_FORMAT),
            pan=command.card_no,
            pin_verification_value=bytes.fromhex(card.pvv),
        )
        backoff_s = HSM_RETRY_BACKOFF_MIN_S
        while True:  # no decision without the PIN check: this partition waits for the HSM
            try:
                reply = await self._stub.VerifyPin(request, timeout=2)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    return PinOutcome.INVALID_BLOCK  # no PIN key for that terminal
                metrics.HSM_UNAVAILABLE.inc()
                log.warning("hsm unavailable; waiting", code=exc.code().name, retry_in_s=backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, HSM_RETRY_BACKOFF_MAX_S)
        return {ResultCode.OK: PinOutcome.CORRECT, ResultCode.PIN_WRONG: PinOutcome.WRONG}.get(
            ResultCode(reply.result), PinOutcome.INVALID_BLOCK
        )


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
    tokens = load_card_tokens(settings)  # no full card number leaves this process
    pins = (PinChecker(settings.hsm_address, pki_dir(settings)) if settings.terminal_security
            else None)  # fmt: skip

    async def send_reply(headers: Any, key: bytes, reply: Reply) -> None:
        reply_to = _header(headers, HEADER_REPLY_TO)
        correlation = _header(headers, HEADER_CORRELATION)
        if reply_to and correlation:
            producer = await outbox.producer()
            await producer.send(
                reply_to.decode(),
                key=key,
                value=codec.encode(reply),
                headers=[(HEADER_CORRELATION, correlation)],
            )

    @app.agent(commands)
    async def clear(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            started = time.perf_counter()
            key = event.key if isinstance(event.key, bytes) else b""
            headers = event.message.headers
            try:
                command = codec.decode(event.value)
            except codec.CodecError:
                metrics.UNDECODABLE.labels(topics.COMMANDS.name).inc()
                log.warning("undecodable command", offset=event.message.offset)
                await send_reply(headers, key, Reply("", ResultCode.MALFORMED_REQUEST))
                yield None
                continue
            if command.ssn.encode() != key:
                # Routed by another key: deciding it here would break one-writer-per-person.
                await send_reply(
                    headers,
                    key,
                    Reply(command.request_id, ResultCode.MALFORMED_REQUEST, at_ms=command.at_ms),
                )
                yield None
                continue
            metrics.INGRESS_LAG_SECONDS.observe(max(0.0, time.time() - command.at_ms / 1000))
            t0 = time.perf_counter()
            stored = persons.get(key)
            person: Person | None = codec.decode(stored) if stored is not None else None
            card = person.card(command.card_no) if person and isinstance(command, Authorize) \
                else None  # fmt: skip
            if (pins is not None and card is not None and person is not None
                    and isinstance(command, Authorize)
                    and person.reply_to(command.request_id) is None):  # fmt: skip
                outcome = (
                    await pins.outcome(command, card)
                    if command.pin_block
                    else (PinOutcome.INVALID_BLOCK)
                )
                command = replace(command, pin=outcome)
            new_person, decision = core.handle(person, command, policy)
            t1 = time.perf_counter()
            if decision.events:
                producer = await outbox.producer()
                pending = [
                    await producer.send(
                        topics.EVENTS.name, key=key, value=codec.encode(published(e, tokens))
                    )
                    for e in decision.events
                ]
                pending += [
                    await producer.send(
                        topics.CARD_INDEX.name,
                        key=tokens.card_ref(e.card_no).encode(),
                        value=e.ssn.encode(),
                    )
                    for e in decision.events
                    if isinstance(e, CardIssued)
                ]
                for fut in pending:
                    await fut  # the broker has it
            t2 = time.perf_counter()
            if new_person is not person and new_person is not None:
                persons[key] = codec.encode(new_person)
            t3 = time.perf_counter()
            await send_reply(headers, key, decision.reply)
            t4 = time.perf_counter()
            for step, seconds in (
                ("decide", t1 - t0),
                ("events", t2 - t1),
                ("state", t3 - t2),
                ("reply", t4 - t3),
            ):
                metrics.WORKER_STEP_SECONDS.labels(step).observe(seconds)
            metrics.DECISIONS.labels(type(command).__name__, decision.reply.result.name).inc()
            if isinstance(command, Authorize):
                institution = policy.institutions.get(command.institution_id)
                kind = institution.type.name.lower() if institution else "unknown"
                metrics.SWIPES.labels(decision.reply.result.name, kind).inc()
                metrics.INSTITUTION_SWIPES.labels(
                    command.institution_id if institution else "unknown",
                    decision.reply.result.name,
                ).inc()
            for e in decision.events:
                if isinstance(e, SwipeApproved):
                    metrics.INSTITUTION_PAID_FEN.labels(e.institution_id).inc(
                        e.paid_from_account_fen
                    )
                elif isinstance(e, SwipeReversed | Refunded):
                    metrics.INSTITUTION_RETURNED_FEN.labels(e.institution_id).inc(e.amount_fen)
            metrics.DECIDE_SECONDS.observe(time.perf_counter() - started)
            yield None

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
    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    log.info(
        "worker starting", index=index, bootstrap=bootstrap, partitions=settings.command_partitions
    )
    worker.execute_from_commandline()
