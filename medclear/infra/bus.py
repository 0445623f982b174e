"""The gRPC side of the command path: send a command to its person's partition and wait
for the worker's reply.

Reply mechanism (docs/ARCHITECTURE.md, decision 1): each gateway/registry process owns a
one-partition reply topic `medclear.replies.<instance>`. A command record carries the
reply topic and a fresh correlation id in its headers; the worker sends the reply there
with the same correlation id; a single consumer task resolves the waiting future. No
consumer group, no faust `ask()`: measured faster and it does not stall under load.

Nobody reads a reply twice (a restarted process starts at the topic's end), so a reply
topic keeps its records for an hour only (medclear.infra.topics.config).

The same process follows `medclear.card-index` (card token → the social security number,
sealed under the person data key; the topic holds no card number and no ssn in clear,
see clearing/redact.py) so that requests which only carry a card number reach the right
partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from clearing import codec
from clearing.model import Command, Reply
from clearing.redact import CardTokens, Sealer, SealError, card_index_owner
from medclear.errors import MedclearError
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import (
    FETCH_WAIT_MS,
    POLL_WAIT_MS,
    ensure_topics,
    new_producer,
    new_reader,
    wait_for_topics,
)
from medclear.infra.topics import HEADER_CORRELATION, HEADER_REPLY_TO, header
from monitoring import metrics

log = structlog.get_logger()

INDEX_SYNC_TIMEOUT_S = 2.0  # how long a card-index miss waits for the index to catch up
PENDING_MAX = 10_000  # requests in flight per process; beyond it requests are refused
REPLIES_PER_POLL_MAX = 1_000
INDEX_RECORDS_PER_POLL_MAX = 5_000
IDLE_REPLY_WAKE_S = 1.0  # with no request in flight, the reply loop looks anyway this often
INDEX_START_TIMEOUT_S = 60.0  # at start, the whole card index is read before serving
INDEX_SYNC_POLL_S = 0.005
INDEX_POLL_WAIT_MS = 1_000
# The card index's held fetch: new cards are rare, but stopping the process waits for it
INDEX_FETCH_WAIT_MS = 1_000


class BusUnavailable(MedclearError):
    """The broker cannot take the command now."""


class CommandBus:
    def __init__(
        self,
        kafka: KafkaAccess,
        instance_id: str,
        tokens: CardTokens,
        person: Sealer,
    ) -> None:
        self.kafka = kafka
        self.tokens = tokens
        self.person = person  # opens the card index's sealed ssn and the sealed replies
        self._asked = asyncio.Event()  # a request was sent: replies are due
        self.reply_topic = topics.reply_topic(instance_id)
        self._pending: dict[bytes, asyncio.Future[Reply]] = {}
        self._card_index: dict[str, str] = {}  # card token → ssn
        self._index_tps: list[TopicPartition] = []
        self._producer: AIOKafkaProducer | None = None
        self._replies: AIOKafkaConsumer | None = None
        self._index: AIOKafkaConsumer | None = None
        self._offsets: AIOKafkaConsumer | None = None  # the card index's end offsets
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # started beside its broker (`up` starts the processes while it boots): wait for it
        found = await wait_for_topics(self.kafka, [topics.COMMANDS.name, topics.CARD_INDEX.name])
        await ensure_topics(self.kafka, {self.reply_topic: 1})
        self._producer = new_producer(self.kafka)
        await self._producer.start()
        self._replies = new_reader(self.kafka, FETCH_WAIT_MS)
        await self._replies.start()
        reply_tp = TopicPartition(self.reply_topic, 0)
        self._replies.assign([reply_tp])
        await self._replies.seek_to_end(reply_tp)
        self._index = new_reader(self.kafka, INDEX_FETCH_WAIT_MS)
        await self._index.start()
        self._offsets = new_reader(self.kafka)
        await self._offsets.start()
        self._index_tps = found[topics.CARD_INDEX.name]
        self._index.assign(self._index_tps)
        await self._index.seek_to_beginning(*self._index_tps)
        self._tasks = [
            asyncio.create_task(self._reply_loop(), name="replies"),
            asyncio.create_task(self._index_loop(), name="card-index"),
        ]
        await self.sync_index(timeout_s=INDEX_START_TIMEOUT_S)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # at once: a consumer's stop waits for the fetch the broker is holding for it
        await asyncio.gather(
            *(
                client.stop()
                for client in (self._producer, self._replies, self._index, self._offsets)
                if client is not None
            )
        )
        for fut in self._pending.values():
            fut.cancel()

    # ------------------------------------------------------------------ commands
    async def request(self, command: Command, timeout_s: float) -> Reply | None:
        """Send a command and wait for its reply; None when the deadline passed first
        (the outcome is then unknown to the caller: the command may still be decided)."""
        if self._producer is None:
            raise BusUnavailable("bus not started")
        if len(self._pending) >= PENDING_MAX:
            raise BusUnavailable("too many requests in flight")
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
        except Exception as exc:  # the broker refused or is gone
            raise BusUnavailable(str(exc)) from exc
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
            fetched = await replies.getmany(timeout_ms=POLL_WAIT_MS,
                                            max_records=REPLIES_PER_POLL_MAX)  # fmt: skip
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
            future.set_result(codec.decode(self.person.open_bytes(record.value)))
        except (codec.CodecError, SealError) as exc:
            metrics.UNDECODABLE.labels(self.reply_topic).inc()
            future.set_exception(exc)

    # ------------------------------------------------------------------ card index
    async def resolve_ssn(self, card_no: str) -> str | None:
        """The person a card belongs to; on a miss, first let the index catch up."""
        ref = self.tokens.card_ref(card_no)
        ssn = self._card_index.get(ref)
        if ssn is None:
            await self.sync_index(INDEX_SYNC_TIMEOUT_S)
            ssn = self._card_index.get(ref)
        return ssn

    def card_owner(self, card_no: str) -> str | None:
        """The person the index holds for a card now, without waiting for it to catch up
        (so a card issued a moment ago elsewhere may not be in it yet)."""
        return self._card_index.get(self.tokens.card_ref(card_no))

    async def sync_index(self, timeout_s: float) -> None:
        """Wait until the index holds everything on the broker now (bounded wait)."""
        assert self._index is not None
        # asked on a consumer that fetches nothing: the index consumer's own connection is
        # busy with the fetch the broker holds until a card is issued
        assert self._offsets is not None
        ends = await self._offsets.end_offsets(self._index_tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            positions = [await self._position(tp) for tp in ends]
            if all(pos >= end for pos, end in zip(positions, ends.values(), strict=True)):
                return
            await asyncio.sleep(INDEX_SYNC_POLL_S)
        log.warning("card index did not catch up", timeout_s=timeout_s)

    async def _position(self, tp: TopicPartition) -> int:
        assert self._index is not None
        return int(await self._index.position(tp))

    async def _index_loop(self) -> None:
        index = self._index
        assert index is not None
        while True:  # the broker holds the fetch until a card is indexed
            fetched = await index.getmany(timeout_ms=INDEX_POLL_WAIT_MS,
                                          max_records=INDEX_RECORDS_PER_POLL_MAX)  # fmt: skip
            for records in fetched.values():
                for record in records:
                    if record.key and record.value:
                        self._index_record(record.key, record.value)

    def _index_record(self, key: bytes, value: bytes) -> None:
        try:
            self._card_index[key.decode()] = card_index_owner(value, self.person)
        except SealError as exc:  # not sealed under this key: no card of ours
            metrics.UNDECODABLE.labels(topics.CARD_INDEX.name).inc()
            log.warning("card index record not opened", error=str(exc))
