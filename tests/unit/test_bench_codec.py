"""`medclear bench codec`: its city is decided by the core and every record round-trips."""

from __future__ import annotations

import pytest

from clearing import codec
from medclear.bench import codec as bench
from tests.unit.conftest import POLICY


def test_the_bench_city_has_every_kind_of_record_and_each_round_trips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench, "ROUNDS_MIN_S", 0.0)
    records = bench.city_records(40, 2, seed=3, policy=POLICY)
    kinds = {type(r).__name__ for r in records}
    assert {"EnrolPerson", "Authorize", "Reply", "Person", "PersonRegistered"} <= kinds
    assert kinds & {"SwipeApproved", "SwipeDeclined"}
    assert records == bench.city_records(40, 2, seed=3, policy=POLICY)  # deterministic
    for record in records:
        assert codec.decode(codec.encode(record)) == record
    figures = bench.figures(records)
    assert figures["all"]["records"] == len(records)
    assert all(f["encode_us"] > 0 and f["decode_us"] > 0 for f in figures.values())
