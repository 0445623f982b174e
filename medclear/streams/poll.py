"""Fetching in batches, with the idle back-off noida-db needs, on aiokafka's public API
(pause, resume, end offsets).

noida-db 0.2.3 answers an empty fetch at once (fetch.max.wait.ms ignored), and aiokafka's
fetcher sends the next fetch as soon as one comes back, so an idle consumer asks the
broker ~1,500 times a second (tests/integration/test_broker_conformance.py: test i pins
the defect as a strict xfail, test j checks this back-off). After a poll that brought
nothing, the assigned partitions are *paused* (the fetcher sends nothing for a paused
partition) and the poller sleeps; the sleep doubles with each further empty poll up to a
cap and is back to the first as soon as records come. While paused, a poll asks the
broker only for the partitions' end offsets (one ListOffsets request per sleep) and
resumes them when one has records past the consumer's position: an idle consumer sends
one small request per back-off, not a burst of fetches.

The waits (medclear/streams/process.py, `idle_backoff`):
- the decision path (the worker): 2 ms doubling to 100 ms, and no sleep and no pause at
  all for 25 ms after the last records (`IdleBackoff.spin_s`), so a counter's next swipe
  is taken within a fetch round trip;
- the stream jobs after the decision: 50 ms doubling to 500 ms;
- a broker that holds empty fetches (Apache Kafka): MEDCLEAR_KAFKA_IDLE_FETCH_BACKOFF_MS=0,
  no pause at all.
The gateway's reply consumer (medclear/infra/bus.py) keeps its partition paused and
sleeps while no request is in flight, and polls with a short back-off of its own while
one is.

Records fetched for a partition that is paused are dropped by aiokafka without moving its
position, so the next fetch after the resume reads them again: nothing is skipped. So a
poll after a resume waits until the broker has answered a fetch of every partition
(`last_poll_timestamp`, public) before it counts as empty: pausing again before the
answer came would drop it, and a broker slower than the wait would never be read.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

FETCH_WAIT_MS = 1  # one getmany's wait for records
HELD_FETCH_WAIT_MS = 100  # no back-off (a broker that holds empty fetches): getmany's wait
ANSWER_WAIT_MS_MAX = 200  # a poll waits this long at most for the broker's first answer
BACKOFF_DOUBLINGS_MAX = 16


@dataclass
class IdleBackoff:
    """How long to sleep after the n-th empty poll in a row: first_s · 2^(n-1), capped.

    For `spin_s` after the last records there is no sleep and no pause at all: the fetcher
    keeps asking, so records that follow quickly (the next swipe of a counter) are taken
    within a fetch round trip (~0.8 ms on noida-db) instead of after a resume (~2 ms).
    Traffic pays that CPU; an idle process does not."""

    first_s: float
    cap_s: float
    spin_s: float = 0.0
    empties: int = 0
    last_records_at: float = 0.0  # time.monotonic() of the last poll that brought records

    def spinning(self) -> bool:
        return time.monotonic() - self.last_records_at < self.spin_s

    def next_wait_s(self) -> float:
        wait: float = self.first_s * 2 ** min(self.empties, BACKOFF_DOUBLINGS_MAX)
        self.empties += 1
        return min(self.cap_s, wait)

    def reset(self) -> None:
        self.empties = 0
        self.last_records_at = time.monotonic()


class Poller:
    """`fetch()` the next batch of at most `batch_max` records ({} when there is none),
    `idle()` after an empty one."""

    def __init__(self, consumer: AIOKafkaConsumer, batch_max: int, backoff: IdleBackoff) -> None:
        self.consumer = consumer
        self.batch_max = batch_max
        self.backoff = backoff
        self._paused: set[TopicPartition] = set()

    async def fetch(self) -> dict[TopicPartition, list[Any]]:
        """Records if the broker had some, else {} once it answered a fetch of every
        assigned partition (or ANSWER_WAIT_MS_MAX passed). While paused, {} at once unless
        the broker's end offsets show records to read."""
        if self.backoff.first_s <= 0:  # the broker holds an empty fetch: just wait for it
            held: dict[TopicPartition, list[Any]] = await self.consumer.getmany(
                timeout_ms=HELD_FETCH_WAIT_MS, max_records=self.batch_max
            )
            if held:
                self.backoff.reset()
            return held
        self._paused &= self.consumer.paused()  # resumed by someone else: fetching again
        if self._paused:
            if not await self._anything_new():
                return {}
            self._resume()
        asked_ms = int(time.time() * 1000)
        while True:
            fetched: dict[TopicPartition, list[Any]] = await self.consumer.getmany(
                timeout_ms=FETCH_WAIT_MS, max_records=self.batch_max
            )
            if fetched:
                self.backoff.reset()
                return fetched
            waited_ms = time.time() * 1000 - asked_ms
            if self._answered_since(asked_ms) or waited_ms > ANSWER_WAIT_MS_MAX:
                return {}

    async def idle(self, ready: bool = True) -> None:
        """The back-off after an empty poll, the partitions paused meanwhile (the fetcher
        then asks the broker nothing). Not ready (partitions being restored): a short
        sleep, nothing paused."""
        if not ready:
            await asyncio.sleep(self.backoff.first_s or 0.001)
            return
        if self.backoff.spinning():
            return  # records came moments ago: more are likely, keep fetching
        wait_s = self.backoff.next_wait_s()
        if wait_s <= 0:
            return
        if not self._paused:
            self._paused = set(self.consumer.assignment())
            self.consumer.pause(*self._paused)
        await asyncio.sleep(wait_s)

    def _resume(self) -> None:
        assigned = self.consumer.assignment()
        self.consumer.resume(*[tp for tp in self._paused if tp in assigned])
        self._paused.clear()

    async def _anything_new(self) -> bool:
        """Records past the position of a paused partition, or a partition assigned since
        the pause (one ListOffsets request for them all)."""
        assigned = self.consumer.assignment()
        paused = [tp for tp in self._paused if tp in assigned]
        if len(paused) < len(assigned):
            return True
        if not paused:
            return False
        try:
            ends = await self.consumer.end_offsets(paused)
            for tp in paused:
                if ends[tp] > await self.consumer.position(tp):
                    return True
        except (KafkaError, AssertionError):  # a rebalance meanwhile: fetch and see
            return True
        return False

    def _answered_since(self, since_ms: int) -> bool:
        """The broker answered a fetch of every assigned partition after `since_ms`."""
        for tp in self.consumer.assignment():
            try:
                stamp = self.consumer.last_poll_timestamp(tp)
            except AssertionError:  # revoked meanwhile
                continue
            if stamp is None or stamp < since_ms:
                return False
        return True
