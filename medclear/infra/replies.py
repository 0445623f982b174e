"""The request/reply protocol of the command path, both ends of it.

Asking (the gateway, the card registry: `Requester.ask`): each process owns a
one-partition reply topic `medclear.replies.<instance>`. A command record carries the
reply topic and a fresh correlation id in its headers and is keyed by the person's social
security number, so it lands on the partition of the worker that owns the person
(docs/ARCHITECTURE.md, decision 1). One task reads the reply topic and resolves the
waiting call; with no call in flight it fetches nothing.

Answering (the clearing worker): `reply_record` is the record that answers a command: to
the topic the command named, sealed under the person data key (a reply may carry a
person's whole record), with the command's correlation id and no key of its own; `opened`
is the asker's side of it.

Nobody reads a reply twice (a restarted process starts at the topic's end), so a reply
topic keeps its records for an hour only (medclear.infra.topics.config).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from clearing import codec
from clearing.codes import ResultCode
from clearing.model import Command, Reply
from clearing.redact import Sealer, SealError
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import (
    FETCH_WAIT_MS,
    POLL_WAIT_MS,
    ensure_topics,
    new_producer,
    new_reader,
)
from medclear.infra.topics import HEADER_CORRELATION, HEADER_REPLY_TO, header
from monitoring import metrics

log = structlog.get_logger(module="replies")

PENDING_MAX = 10_000  # requests in flight per process; beyond it requests are refused
REPLIES_PER_POLL_MAX = 1_000
IDLE_REPLY_WAKE_S = 1.0  # with no request in flight, the reply loop looks anyway this often


Headers = list[tuple[str, bytes]]


def reply_record(record: Any, reply: Reply, person: Sealer) -> tuple[str, bytes, Headers] | None:
    """The record that answers a command record: (its reply topic, the reply sealed under
    the person data key, the correlation header); None when the command named no reply
    topic."""
    reply_to = header(record.headers, HEADER_REPLY_TO)
    correlation = header(record.headers, HEADER_CORRELATION)
    if not (reply_to and correlation):
        return None
    sealed = person.seal_bytes(codec.encode(reply), correlation.hex())
    return reply_to.decode(), sealed, [(HEADER_CORRELATION, correlation)]


def opened(value: bytes, person: Sealer) -> Reply:
    """The reply in a reply record (CodecError or SealError if it is none of ours)."""
    reply: Reply = codec.decode(person.open_bytes(value))
    return reply


class Requester:
    """The asking end: `ask` sends a command and waits for its reply."""

    def __init__(self, kafka: KafkaAccess, instance_id: str, person: Sealer) -> None:
        self.kafka = kafka
        self.person = person
        self.reply_topic = topics.reply_topic(instance_id)
        self._asked = asyncio.Event()  # a request was sent: replies are due
        self._pending: dict[bytes, asyncio.Future[Reply]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._replies: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await ensure_topics(self.kafka, {self.reply_topic: 1})
        self._producer = new_producer(self.kafka)
        await self._producer.start()
        self._replies = new_reader(self.kafka, FETCH_WAIT_MS)
        await self._replies.start()
        reply_tp = TopicPartition(self.reply_topic, 0)
        self._replies.assign([reply_tp])
        await self._replies.seek_to_end(reply_tp)
        self._task = asyncio.create_task(self._reply_loop(), name="replies")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # at once: a consumer's stop waits for the fetch the broker is holding for it
        await asyncio.gather(
            *(client.stop() for client in (self._producer, self._replies) if client is not None)
        )
        for future in self._pending.values():
            future.cancel()

    async def ask(self, command: Command, timeout_s: float) -> Reply:
        """The worker's reply to `command`; TIMEOUT when the deadline passed first (the
        outcome is then unknown: the command may still be decided), UNAVAILABLE when the
        broker did not take the command."""
        try:
            reply = await self._request(command, timeout_s)
        except Exception as exc:  # the broker refused or is gone, or the reply is not ours
            log.warning("no reply", error=str(exc), error_type=type(exc).__name__)
            return Reply(command.request_id, ResultCode.UNAVAILABLE)
        return reply if reply is not None else Reply(command.request_id, ResultCode.TIMEOUT)

    async def _request(self, command: Command, timeout_s: float) -> Reply | None:
        if self._producer is None or len(self._pending) >= PENDING_MAX:
            raise RuntimeError("not started" if self._producer is None else "too many in flight")
        correlation = uuid.uuid4().hex.encode()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        self._asked.set()  # wakes the reply loop
        try:
            await self._producer.send_and_wait(
                topics.COMMANDS.name,
                key=command.ssn.encode(),
                value=codec.encode(command),
                headers=[
                    (HEADER_REPLY_TO, self.reply_topic.encode()),
                    (HEADER_CORRELATION, correlation),
                ],
            )
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None
        finally:
            self._pending.pop(correlation, None)

    async def _reply_loop(self) -> None:
        """Replies arrive only for requests in flight: with none, the reply partition is
        paused and the loop sleeps until a request is sent (no fetch at all while idle);
        with some, the broker holds the fetch until a reply comes."""
        replies = self._replies
        assert replies is not None
        while True:
            if not self._pending:
                await self._sleep_until_asked()
                continue
            fetched = await replies.getmany(
                timeout_ms=POLL_WAIT_MS, max_records=REPLIES_PER_POLL_MAX
            )
            for records in fetched.values():
                for record in records:
                    self._resolve(record)

    async def _sleep_until_asked(self) -> None:
        assert self._replies is not None
        paused = [tp for tp in self._replies.assignment() if tp not in self._replies.paused()]
        self._replies.pause(*paused)
        self._asked.clear()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._asked.wait(), IDLE_REPLY_WAKE_S)
        finally:
            self._replies.resume(*paused)

    def _resolve(self, record: Any) -> None:
        correlation = header(record.headers, HEADER_CORRELATION)
        future = self._pending.get(correlation) if correlation else None
        if future is None or future.done():
            return  # a reply for a request that timed out, or of an earlier process
        try:
            future.set_result(opened(record.value, self.person))
        except (codec.CodecError, SealError) as exc:
            metrics.UNDECODABLE.labels(self.reply_topic).inc()
            future.set_exception(exc)
