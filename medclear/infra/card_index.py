"""The card index: which person a card number belongs to, for requests that carry only a
card number (a swipe, a loss report by card).

Each gateway and registry process follows `medclear.card-index` (compacted; key: the card
token, value: the owner's social security number sealed under the person data key; the
topic holds no card number and no ssn in clear, clearing/redact.py) from its beginning
before it serves, and keeps following it.

Bounded: at most CARD_INDEX_ENTRIES_MAX cards. A full index takes no new card; a card it
does not hold is then not known to be unknown, so `resolve` raises CardIndexFull (the
servers answer UNAVAILABLE: `owner_of`, never CARD_UNKNOWN for a card that may exist), the gauge
`medclear_card_index_full` is 1 and the process logs it. Raise the bound, or run the
index beside a store of its own, before a deployment's cards approach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from clearing.codes import ResultCode
from clearing.redact import CardTokens, Sealer, SealError, card_index_owner
from medclear.errors import MedclearError
from medclear.infra import topics
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import new_reader
from monitoring import metrics

log = structlog.get_logger(module="card_index")

CARD_INDEX_ENTRIES_MAX = 2_000_000  # ~250 bytes each in this process: ~500 MB at the bound
INDEX_SYNC_TIMEOUT_S = 2.0  # how long a miss waits for the index to catch up
INDEX_START_TIMEOUT_S = 60.0  # at start, the whole card index is read before serving
INDEX_SYNC_POLL_S = 0.005
INDEX_RECORDS_PER_POLL_MAX = 5_000
INDEX_POLL_WAIT_MS = 1_000
# The card index's held fetch: new cards are rare, but stopping the process waits for it
INDEX_FETCH_WAIT_MS = 1_000


class CardIndexFull(MedclearError):
    """The index is full and does not hold this card: whether it exists is not known."""


class CardIndex:
    def __init__(
        self,
        kafka: KafkaAccess,
        tokens: CardTokens,
        person: Sealer,
        entries_max: int = CARD_INDEX_ENTRIES_MAX,
    ) -> None:
        self.kafka = kafka
        self.tokens = tokens
        self.person = person  # opens the records' sealed ssn
        self.entries_max = entries_max
        self.full = False
        self._owners: dict[str, str] = {}  # card token → ssn
        self._tps: list[TopicPartition] = []
        self._reader: AIOKafkaConsumer | None = None
        self._offsets: AIOKafkaConsumer | None = None  # asks the end offsets
        self._task: asyncio.Task[None] | None = None

    async def start(self, partitions: list[TopicPartition]) -> None:
        """Read the whole index (the topic's `partitions`), then keep following it."""
        self._tps = partitions
        self._reader = new_reader(self.kafka, INDEX_FETCH_WAIT_MS)
        await self._reader.start()
        self._offsets = new_reader(self.kafka)
        await self._offsets.start()
        self._reader.assign(self._tps)
        await self._reader.seek_to_beginning(*self._tps)
        self._task = asyncio.create_task(self._follow(), name="card-index")
        await self.sync(timeout_s=INDEX_START_TIMEOUT_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(
            *(client.stop() for client in (self._reader, self._offsets) if client is not None)
        )

    async def resolve(self, card_no: str) -> str | None:
        """The person a card belongs to (None: no one's); on a miss, first let the index
        catch up. CardIndexFull when a full index misses."""
        ref = self.tokens.card_ref(card_no)
        ssn = self._owners.get(ref)
        if ssn is None and not self.full:
            await self.sync(INDEX_SYNC_TIMEOUT_S)
            ssn = self._owners.get(ref)
        if ssn is None and self.full:
            raise CardIndexFull(f"the card index holds {len(self._owners):,} cards, its bound")
        return ssn

    async def owner_of(self, card_no: str) -> tuple[str, ResultCode]:
        """`resolve` as the fronts answer it: (ssn, OK), ("", CARD_UNKNOWN) for no one's
        card, or ("", UNAVAILABLE) when a full index does not hold it (logged here)."""
        try:
            ssn = await self.resolve(card_no)
        except CardIndexFull as exc:
            log.error("card not indexed", error=str(exc))
            return "", ResultCode.UNAVAILABLE
        return (ssn, ResultCode.OK) if ssn else ("", ResultCode.CARD_UNKNOWN)

    def owner_now(self, card_no: str) -> str | None:
        """The person the index holds for a card now, without waiting for it to catch up
        (so a card issued a moment ago elsewhere may not be in it yet)."""
        return self._owners.get(self.tokens.card_ref(card_no))

    async def sync(self, timeout_s: float) -> None:
        """Wait until the index holds everything on the broker now (bounded wait)."""
        # asked on a consumer that fetches nothing: the index reader's own connection is
        # busy with the fetch the broker holds until a card is issued
        assert self._reader is not None and self._offsets is not None
        ends = await self._offsets.end_offsets(self._tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            positions = [await self._reader.position(tp) for tp in ends]
            if all(pos >= end for pos, end in zip(positions, ends.values(), strict=True)):
                return
            await asyncio.sleep(INDEX_SYNC_POLL_S)
        log.warning("card index did not catch up", timeout_s=timeout_s)

    async def _follow(self) -> None:
        reader = self._reader
        assert reader is not None
        while True:  # the broker holds the fetch until a card is indexed
            fetched = await reader.getmany(
                timeout_ms=INDEX_POLL_WAIT_MS, max_records=INDEX_RECORDS_PER_POLL_MAX
            )
            for records in fetched.values():
                for record in records:
                    if record.key and record.value:
                        self.add(record.key, record.value)

    def add(self, key: bytes, value: bytes) -> None:
        """One record of the topic: a card token and its owner, sealed."""
        try:
            owner = card_index_owner(value, self.person)
        except SealError as exc:  # not sealed under this key: no card of ours
            metrics.UNDECODABLE.labels(topics.CARD_INDEX.name).inc()
            log.warning("card index record not opened", error=str(exc))
            return
        ref = key.decode()
        if ref not in self._owners and len(self._owners) >= self.entries_max:
            if not self.full:
                log.error(
                    "the card index is full: new cards are not indexed",
                    entries_max=self.entries_max,
                )
            self.full = True
            metrics.CARD_INDEX_FULL.set(1)
            return
        self._owners[ref] = owner
