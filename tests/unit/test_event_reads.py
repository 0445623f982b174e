"""The jobs skip, by the event-type header, the events their pure core does not read
(stream_jobs/events.py). Each read set is checked here against the core it stands for: an
event outside it must leave that core's state as it was and produce nothing."""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from typing import Any

import pytest

from clearing import abnormal, codec, core, model, settlement
from clearing.codes import ResultCode
from clearing.model import CancelPerson, Event, Person, SetPhone
from medclear.infra.topics import HEADER_EVENT_TYPE
from stream_jobs import sms_core
from stream_jobs.events import decoded
from tests.unit.conftest import POLICY, SSN, T0_MS, make_person, rid, simulated_records
from tests.unit.test_redact import _lifecycle
from tests.unit.test_sms_core import CONTEXT, PERSON, T0

EVENT_TYPES = typing.get_args(Event)


@pytest.fixture(scope="module")
def events() -> list[Event]:
    """Every event of a small simulated city over a few days, then of one person's whole
    history (refund, limit, loss, replacement, new phone, cancellation)."""
    seen: list[Event] = [
        r for r in simulated_records(seed=5, persons=80, days=3) if isinstance(r, EVENT_TYPES)
    ]
    seen.extend(_lifecycle())
    person: Person | None = make_person()
    for command in (
        SetPhone(rid(), T0_MS, SSN, "13900000001"),
        CancelPerson(rid(), T0_MS, SSN, "deceased"),
    ):
        person, decision = core.handle(person, command, POLICY)
        assert decision.reply.result == ResultCode.OK
        seen.extend(decision.events)
    assert set(EVENT_TYPES) - {type(e) for e in seen} <= {model.PinTriesReset}
    return seen


def outside(reads: tuple[type[Any], ...], events: list[Event]) -> list[Event]:
    assert set(reads) <= set(EVENT_TYPES)
    skipped = [e for e in events if not isinstance(e, reads)]
    assert skipped, "the sample has no event outside the read set"
    return skipped


def test_settlement_reads_only_what_moves_money(events: list[Event]) -> None:
    for event in outside(settlement.ENTRY_EVENTS, events):
        assert settlement.entry_of(event) is None
    assert any(settlement.entry_of(e) for e in events if isinstance(e, settlement.ENTRY_EVENTS))


def test_abnormal_detection_ignores_what_it_does_not_read(events: list[Event]) -> None:
    detector, blocks = abnormal.Detector(), abnormal.BlockWatch()
    for event in events:  # a history first, so the state is not empty
        if isinstance(event, abnormal.EVENTS_READ):
            detector.observe(event)
            blocks.observe(event)
    before = (copy.deepcopy(detector), copy.deepcopy(blocks))
    for event in outside(abnormal.EVENTS_READ, events):
        assert detector.observe(event) == []
        assert blocks.observe(event) is None
    assert (detector, blocks) == before


def test_sms_decides_nothing_for_what_it_does_not_read(events: list[Event]) -> None:
    for event in outside(sms_core.EVENTS_READ, events):
        for state in (None, PERSON):
            decision = sms_core.decide(state, event, CONTEXT, T0)
            assert decision.state == (state or sms_core.PersonSms())
            assert decision.sms is None and decision.kind is None


@dataclass
class Record:
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def test_decoded_skips_by_header_and_decodes_records_without_one(events: list[Event]) -> None:
    def record(event: Event, named: bool) -> Record:
        name = type(event).__name__.encode()
        return Record(codec.encode(event), ((HEADER_EVENT_TYPE, name),) if named else ())

    sample = events[:200]
    named = [record(e, True) for e in sample]
    unnamed = [record(e, False) for e in sample]
    garbage = Record(b"not json", ((HEADER_EVENT_TYPE, b"CardStateChanged"),))
    reads = (model.CardStateChanged,)
    got = [event for _r, event in decoded([*named, garbage], "t", reads)]
    assert got == [e for e in sample if isinstance(e, model.CardStateChanged)] and got
    # without the header (events written before it), every record is decoded
    assert [event for _r, event in decoded(unnamed, "t", reads)] == sample
    assert [event for _r, event in decoded(named, "t")] == sample
