"""The events of a batch, decoded: what every job that reads medclear.events starts with."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from clearing import codec
from monitoring import metrics


def decoded(records: Iterable[Any], topic: str) -> Iterator[tuple[Any, Any]]:
    """Each record with its decoded record; one that does not decode is counted
    (`medclear_undecodable_records_total{topic}`) and skipped: a job never stops on it."""
    for record in records:
        try:
            yield record, codec.decode(record.value or b"")
        except codec.CodecError:
            metrics.UNDECODABLE.labels(topic).inc()
