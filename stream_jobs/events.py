"""The events of a batch, decoded: what every job that reads medclear.events starts with.

The worker names each event's class in a header (HEADER_EVENT_TYPE). A job that reads only
some classes passes them as `reads`, and an event of another class is skipped before it
is decoded: most events of an enrolment (PinChanged, AccountCredited, …) concern no job
but the ClickHouse sink, and decoding was the jobs' largest cost while seeding. An event
without the header (written before it existed) is decoded and left to the job, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from clearing import codec
from medclear.infra.topics import HEADER_EVENT_TYPE, header
from monitoring import metrics


def decoded(
    records: Iterable[Any], topic: str, reads: tuple[type[Any], ...] | None = None
) -> Iterator[tuple[Any, Any]]:
    """Each record with its decoded record, but for a record whose header names a class
    outside `reads` (None: every class). One that does not decode is counted
    (`medclear_undecodable_records_total{topic}`) and skipped: a job never stops on it."""
    wanted = None if reads is None else {cls.__name__.encode() for cls in reads}
    for record in records:
        if wanted is not None:
            named = header(record.headers, HEADER_EVENT_TYPE)
            if named is not None and named not in wanted:
                continue
        try:
            yield record, codec.decode(record.value or b"")
        except codec.CodecError:
            metrics.UNDECODABLE.labels(topic).inc()
