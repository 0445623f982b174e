"""The clearing worker: a faust agent that runs core.handle on every command.

Thin adapter. For each record of `medclear.commands` (keyed by social security number):
decode → read the person from the `persons` table → core.handle → send the events and
wait until the broker has them → write the person to the table (its changelog) → send
the reply to the gateway's reply topic named in the record's headers.

Why that order: faust flushes the producer before it commits an offset, so a command
whose offset is committed has its events and state on the broker. Events are durable
before the state that remembers them: after a crash the command is redelivered, decided
again on the old state (same decision: the core is deterministic and the time is in the
command) and its events are sent again with the same ids, which every sink dedupes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import faust
import structlog

from clearing import codec, core
from clearing.codes import ResultCode
from clearing.model import CardIssued, Person, Policy, Reply
from medclear import topics
from medclear.settings import Settings
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


def create_app(settings: Settings, policy: Policy, bootstrap: str, index: int = 0) -> faust.App:
    app = faust.App(
        APP_ID,
        # Static group membership: a restarted worker takes its partitions back at once.
        # noida-db never evicts a member killed with -9, so a dynamic member would wait
        # forever (see docs/ARCHITECTURE.md, broker notes).
        consumer_group_instance_id=f"worker-{index}",
        datadir=str(settings.state_dir.resolve() / "data" / f"worker-{index}"),
        broker=f"kafka://{bootstrap}",
        store="memory://",
        topic_partitions=settings.command_partitions,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
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
    events = app.topic(topics.EVENTS.name, key_type=bytes, value_type=bytes, internal=False)
    card_index = app.topic(topics.CARD_INDEX.name, key_type=bytes, value_type=bytes, internal=False)
    persons = app.Table(
        PERSONS_TABLE,
        default=None,
        partitions=settings.command_partitions,
        key_type=bytes,
        value_type=bytes,
    )
    reply_topics: dict[str, faust.TopicT] = {}

    def reply_topic(name: str) -> faust.TopicT:
        topic = reply_topics.get(name)
        if topic is None:
            topic = reply_topics[name] = app.topic(
                name, key_type=bytes, value_type=bytes, internal=False
            )
        return topic

    async def send_reply(headers: Any, key: bytes, reply: Reply) -> None:
        reply_to = _header(headers, HEADER_REPLY_TO)
        correlation = _header(headers, HEADER_CORRELATION)
        if reply_to and correlation:
            await reply_topic(reply_to.decode()).send(
                key=key, value=codec.encode(reply), headers=[(HEADER_CORRELATION, correlation)]
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
            stored = persons.get(key)
            person: Person | None = codec.decode(stored) if stored is not None else None
            new_person, decision = core.handle(person, command, policy)
            if decision.events:
                pending = [
                    await events.send(key=key, value=codec.encode(e)) for e in decision.events
                ]
                pending += [
                    await card_index.send(key=e.card_no.encode(), value=e.ssn.encode())
                    for e in decision.events
                    if isinstance(e, CardIssued)
                ]
                for fut in pending:
                    await fut  # the broker has it
            if new_person is not person and new_person is not None:
                persons[key] = codec.encode(new_person)
            await send_reply(headers, key, decision.reply)
            metrics.DECISIONS.labels(type(command).__name__, decision.reply.result.name).inc()
            metrics.DECIDE_SECONDS.observe(time.perf_counter() - started)
            yield None

    @app.timer(0.5)  # type: ignore[untyped-decorator]
    async def readiness() -> None:
        assigned = bool(app.consumer.assignment())
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined]
        metrics.READY.set(1 if assigned and recovered and not app.rebalancing else 0)

    return app


def run(settings: Settings, policy: Policy, bootstrap: str, index: int, metrics_port: int) -> None:
    """Run one worker in the foreground until SIGTERM."""
    metrics.serve(metrics_port, settings.host)
    app = create_app(settings, policy, bootstrap, index)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    log.info(
        "worker starting", index=index, bootstrap=bootstrap, partitions=settings.command_partitions
    )
    worker.execute_from_commandline()
