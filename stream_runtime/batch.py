"""A batch of input records, the stage its completion has reached, and what the runtime
needs of a producer and a store (so that a test can give it its own).

A batch goes through the stages in this order, and only in this order: `advance` asserts
that the stage it leaves is the one before the stage it enters.

    READ → DECIDED → OUTPUTS_ACKED → STATE_WRITTEN → REPLIES_ACKED → COMMITTABLE

- DECIDED: the handler ran; its outputs, state changes and replies are known, and its
  outputs are with the producer.
- OUTPUTS_ACKED: the broker acknowledged every output.
- STATE_WRITTEN: the changelog acknowledged every state change, then the store holds
  them with the changelog offset after them (one write batch).
- REPLIES_ACKED: the broker acknowledged every reply (sent only once the state is
  written: a reply is never ahead of the state it reports).
- COMMITTABLE: its input offsets may be committed.

So after a crash between any two stages, a restart either reads the input again and
decides it again on the state before it, or finds the state that has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from aiokafka import TopicPartition

from medclear.errors import MedclearError

Headers = Sequence[tuple[str, bytes]]


class Stage(IntEnum):
    READ = 0
    DECIDED = 1
    OUTPUTS_ACKED = 2
    STATE_WRITTEN = 3
    REPLIES_ACKED = 4
    COMMITTABLE = 5


class StageError(MedclearError, AssertionError):
    """A batch asked to skip a stage or to go back: a defect of the runtime."""


class StreamFailed(MedclearError):
    """A batch could not be completed (the broker gave up an acknowledgement, the store
    failed). Nothing after it may be committed: the process exits and a restart reads
    from the last commit (stream_runtime/process.py decides the exit)."""


class Producer(Protocol):
    """What the runtime asks of a producer (aiokafka's AIOKafkaProducer)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any: ...


class Store(Protocol):
    """What the runtime asks of a table partition's store (store.PartitionStore)."""

    next_offset: int

    def get(self, key: bytes) -> bytes | None: ...

    def items(self) -> Iterator[tuple[bytes, bytes]]: ...

    def apply(self, changes: Mapping[bytes, bytes | None], next_offset: int) -> None: ...

    def close(self) -> None: ...


class Owner(Protocol):
    """What a batch asks of the runtime it belongs to (stream_runtime.runtime.Runtime)."""

    stopping: asyncio.Event  # set when the process is asked to stop

    def reached(self, batch: Batch) -> None: ...

    def read(self, table: str, partition: int, key: bytes) -> bytes | None: ...

    def overlay(self, table: str, partition: int) -> dict[bytes, Slot]: ...

    async def flush(self, batch: Batch) -> None: ...


@dataclass(frozen=True)
class Produce:
    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()
    partition: int | None = None


@dataclass
class Batch:
    """One batch of input records, what handling them asks for, and its stage."""

    runtime: Owner
    number: int
    records: list[Any]
    stage: Stage = Stage.READ
    outputs: list[Produce] = field(default_factory=list)
    replies: list[Produce] = field(default_factory=list)
    changes: dict[tuple[str, int], dict[bytes, bytes | None]] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset per tp
    sent: list[asyncio.Future[Any]] = field(default_factory=list)  # outputs not yet acked
    reply_acks: list[asyncio.Future[Any]] = field(default_factory=list)

    def advance(self, to: Stage) -> None:
        """Enter stage `to`, which must be the one after the current stage."""
        if self.stage != to - 1:
            raise StageError(f"batch {self.number}: {self.stage.name} → {to.name}")
        self.stage = to
        self.runtime.reached(self)

    def get(self, table: str, partition: int, key: bytes) -> bytes | None:
        """The value as of this batch: its own writes, then earlier batches' not yet
        stored, then the store."""
        return self.runtime.read(table, partition, key)

    def put(self, table: str, partition: int, key: bytes, value: bytes | None) -> None:
        self.changes.setdefault((table, partition), {})[key] = value
        self.runtime.overlay(table, partition)[key] = Slot(value, self.number)

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> None:
        """An output: on the broker before this batch's state is written."""
        self.outputs.append(Produce(topic, value, key, headers, partition))

    def reply(
        self, topic: str, value: bytes | None, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        """A reply: sent once this batch's state is written."""
        self.replies.append(Produce(topic, value, key, headers))

    async def flush(self) -> None:
        """Make everything this batch asked for so far durable now, in order (outputs,
        state, replies); only for a runtime that does not pipeline. The batch's stage
        stays where it is: its completion goes through every stage once."""
        await self.runtime.flush(self)


@dataclass
class Slot:
    """A state write not yet in the store: readable by later batches meanwhile."""

    value: bytes | None
    batch: int


Handler = Callable[[Batch], Awaitable[None]]
StepObserver = Callable[[str, float], None]
StageHook = Callable[[Batch], None]  # called at every stage a batch enters (tests crash it)
