"""The changes medclear.faust_app makes to faust's bookkeeping of fetched records.

Without them, records faust had fetched after a restart were dropped from the agents'
queues when recovery completed and faust committed across the hole they left (the sms
job's kill -9 test lost SMS that way; docs/ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.transport.consumer import Consumer
from faust.types import TP
from mode.utils.queues import FlowControlQueue

from medclear.faust_app import make_app
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
