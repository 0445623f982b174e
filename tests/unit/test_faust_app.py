"""The changes medclear.faust_app makes to faust's bookkeeping of fetched records.

Without them, records faust had fetched after a restart were dropped from the agents'
queues when recovery completed and faust committed across the hole they left (the sms
job's kill -9 test lost SMS that way; docs/ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.transport.consumer import Consumer
from faust.types import TP
from mode.utils.queues import FlowControlQueue

from medclear.faust_app import fetching_a_copy, make_app, rewinding
from medclear.settings import Settings
from monitoring import metrics

TOPIC = "medclear.events"
PART = TP(TOPIC, 0)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> faust.App:
    settings = Settings(state_dir=tmp_path_factory.mktemp("faust-app"))
    return make_app("medclear-test", "test-0", settings, "127.0.0.1:9", 3)


def test_resuming_the_flow_keeps_the_records_already_queued(app: faust.App) -> None:
    async def scenario() -> tuple[int, int]:
        queue: FlowControlQueue[int] = FlowControlQueue(
            flow_control=app.flow_control, clear_on_resume=True
        )
        for record in range(3):
            queue.put_nowait(record)
        app.flow_control.suspend()
        app.flow_control.resume()  # recovery completed: its seek came before this
        kept = queue.qsize()
        app.flow_control.clear()  # partitions revoked: cleared before the next seek
        return kept, queue.qsize()

    kept, after_revoke = asyncio.run(scenario())
    assert kept == 3
    assert after_revoke == 0
    assert app.flow_control.is_active()


def bookkeeping(committed: int | None, acked: list[int]) -> Any:
    """The attributes of a faust consumer that its commit bookkeeping reads."""
    return SimpleNamespace(
        _acked=defaultdict(list, {PART: list(acked)}),
        _acked_index=defaultdict(set, {PART: set(acked)}),
        _committed_offset=defaultdict(lambda: None, {PART: committed}),
        _gap=defaultdict(lambda: None),
    )


@pytest.mark.usefixtures("app")
@pytest.mark.parametrize(
    ("committed", "acked", "expected"),
    [
        (100, [100, 101, 102], 103),  # in order: commit after the last
        (100, [100, 101, 103], 102),  # a hole later on: commit up to it
        (100, [101, 102], None),  # offset 100 not acknowledged (faust let this pass)
        (100, [103, 104], None),  # a hole of three at the head
        (None, [0, 1], 2),  # nothing committed yet
    ],
)
def test_the_commit_never_passes_an_unacknowledged_offset(
    committed: int | None, acked: list[int], expected: int | None
) -> None:
    assert Consumer._new_offset(bookkeeping(committed, acked), PART) == expected


@pytest.mark.usefixtures("app")
def test_an_offset_hole_is_counted_not_booked_as_acknowledged() -> None:
    consumer = bookkeeping(100, [100])
    before = metrics.STREAM_OFFSET_GAPS.labels(TOPIC)._value.get()
    asyncio.run(Consumer._add_gap(consumer, PART, 101, 105))
    assert metrics.STREAM_OFFSET_GAPS.labels(TOPIC)._value.get() - before == 4
    consumer._acked[PART].append(105)
    assert Consumer._new_offset(consumer, PART) == 101  # not past the hole


def delivered(read_offset: dict[Any, int | None], offsets: list[int]) -> list[int]:
    """The offsets faust's fetch loop hands to the agents, fetched through the patched
    getmany: it drops a record below the partition's read offset and then reads on from
    the record it delivered (faust.transport.consumer.Consumer._drain_messages)."""

    async def fetched(_self: Any, _timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        for offset in offsets:
            yield PART, SimpleNamespace(offset=offset)

    consumer = SimpleNamespace(_read_offset=defaultdict(lambda: None, read_offset))

    async def drain() -> list[int]:
        out = []
        async for tp, message in rewinding(fetched)(consumer, 1.0):
            last = consumer._read_offset[tp]
            if last is None or message.offset >= last:
                out.append(message.offset)
                consumer._read_offset[tp] = message.offset
        return out

    return asyncio.run(drain())


def test_records_below_a_stale_read_offset_are_delivered_not_dropped() -> None:
    # the broker-restart drill: after the rebalance the sms job was sought back to its
    # committed offset 7 with a stale read offset of 26, and re-read 7..26
    before = metrics.STREAM_REWINDS.labels(TOPIC)._value.get()
    assert delivered({PART: 26}, list(range(7, 28))) == list(range(7, 28))
    assert metrics.STREAM_REWINDS.labels(TOPIC)._value.get() - before == 1


def test_reading_on_in_order_forgets_nothing() -> None:
    before = metrics.STREAM_REWINDS.labels(TOPIC)._value.get()
    assert delivered({PART: 26}, [26, 27, 28]) == [26, 27, 28]
    assert delivered({}, [0, 1, 2]) == [0, 1, 2]
    assert metrics.STREAM_REWINDS.labels(TOPIC)._value.get() == before


@pytest.mark.usefixtures("app")
def test_faust_fetches_through_the_rewinding_getmany() -> None:
    assert getattr(Consumer.getmany, "medclear", False)


def test_a_fetch_asks_for_the_partitions_active_when_it_was_made() -> None:
    # a rebalance pauses every partition while the fetch waits in the consumer thread:
    # aiokafka would read the emptied set as "all partitions" (the broker-restart drill's
    # stuck recovery)
    live = {PART, TP(TOPIC, 1)}
    asked: list[set[Any]] = []

    async def fetch(_self: Any, active: Any, _timeout: float) -> Any:
        live.clear()
        await asyncio.sleep(0)
        asked.append(set(active))
        return {}

    asyncio.run(fetching_a_copy(fetch)(None, live, 1.0))
    assert asked == [{PART, TP(TOPIC, 1)}]


def test_nothing_is_fetched_for_an_empty_active_set() -> None:
    called: list[Any] = []

    async def fetch(_self: Any, active: Any, _timeout: float) -> Any:
        called.append(active)
        return {PART: ["a record"]}

    assert asyncio.run(fetching_a_copy(fetch)(None, set(), 1.0)) == {}
    assert asyncio.run(fetching_a_copy(fetch)(None, None, 1.0)) == {PART: ["a record"]}
    assert called == [None]  # a client-only app (None) still fetches everything


@pytest.mark.usefixtures("app")
def test_faust_fetches_with_a_copy_of_the_active_set() -> None:
    from faust.transport.consumer import ThreadDelegateConsumer

    assert getattr(ThreadDelegateConsumer._getmany, "medclear", False)


class Broker:
    """Stands in for aiokafka behind faust's producer buffer: a record handed over waits
    until the broker is `up`, and its acknowledgement waits until `ack` is called."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.handed: list[Any] = []

    async def publish_message(self, fut: Any, wait: bool = False) -> None:
        await self.up.wait()  # aiokafka's send() waiting for metadata: the broker is away
        self.handed.append(fut)

    def ack(self) -> None:
        for fut in self.handed:
            if not fut.done():
                fut.set_result("acknowledged")

    def refuse(self) -> None:
        for fut in self.handed:
            if not fut.done():
                fut.set_exception(ConnectionError("broker gone for longer than the timeout"))


def buffered(app: faust.App, broker: Broker, lost: list[str]) -> tuple[Any, Callable[[int], None]]:
    """faust's own ProducerBuffer (as patched by make_app), and a function queueing n
    table writes in it for `broker`."""
    from faust.transport.producer import ProducerBuffer
    from faust.types.tuples import FutureMessage, PendingMessage

    from medclear.faust_app import _Deliveries

    buffer = ProducerBuffer()
    buffer.app = app
    buffer.__dict__["medclear_deliveries"] = _Deliveries(on_lost=lost.append)

    def put(n: int) -> None:
        for i in range(n):
            message = PendingMessage(channel=broker, key=f"k{i}".encode(), value=b"v",  # type: ignore[arg-type]
                                     partition=None, timestamp=None, headers=None,
                                     key_serializer=None, value_serializer=None,
                                     callback=None)  # fmt: skip
            buffer.put(FutureMessage(message))

    return buffer, put


async def finished_within(seconds: float, awaitable: Any) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(awaitable), seconds)
    except TimeoutError:
        return False
    return True


def test_a_flush_waits_for_table_writes_queued_while_the_broker_is_away(app: faust.App) -> None:
    # faust's own flush returned after 0.1 s without progress, with the records still
    # queued: the broker-restart drill's doubled SMS (a settlement read back without them)
    async def scenario() -> list[bool]:
        broker, lost = Broker(), []
        buffer, put = buffered(app, broker, lost)
        await buffer.start()
        put(3)
        flushing = asyncio.ensure_future(buffer.flush())
        steps = [await finished_within(0.5, flushing)]  # broker away: still waiting
        broker.up.set()
        steps.append(await finished_within(0.5, flushing))  # handed over, not acknowledged
        broker.ack()
        steps.append(await finished_within(0.5, flushing))
        steps.append(lost == [] and len(broker.handed) == 3)
        await buffer.stop()
        return steps

    assert asyncio.run(scenario()) == [False, False, True, True]


def test_a_table_write_the_broker_never_took_is_reported_and_fails_the_flush(
    app: faust.App,
) -> None:
    from medclear.faust_app import ChangelogWriteLost

    async def scenario() -> tuple[list[str], str]:
        broker, lost = Broker(), []
        buffer, put = buffered(app, broker, lost)
        await buffer.start()
        broker.up.set()
        put(2)
        flushing = asyncio.ensure_future(buffer.flush())
        await asyncio.sleep(0.05)
        broker.refuse()
        with pytest.raises(ChangelogWriteLost) as raised:
            await flushing
        with pytest.raises(ChangelogWriteLost):  # and every later flush, also a stop's
            await buffer.stop()
        return lost, str(raised.value)

    lost, message = asyncio.run(scenario())
    assert len(lost) == 2
    assert "2 table write(s) not acknowledged" in message


def test_an_empty_buffer_flushes_at_once(app: faust.App) -> None:
    async def scenario() -> bool:
        buffer, _put = buffered(app, Broker(), [])
        await buffer.start()
        done = await finished_within(0.05, buffer.flush())
        await buffer.stop()
        return done

    assert asyncio.run(scenario())


@pytest.mark.usefixtures("app")
def test_faust_flushes_its_producer_buffer_until_delivered() -> None:
    from faust.transport.producer import ProducerBuffer

    assert getattr(ProducerBuffer.flush, "medclear", False)
    assert getattr(ProducerBuffer._send_pending, "medclear", False)
