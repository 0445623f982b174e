"""Abnormal-transaction rules over published events: each rule fires once per window,
not for normal use, and a redelivered event raises nothing new."""

from __future__ import annotations

import itertools

from clearing import codec
from clearing.abnormal import (
    TERMINAL_BURST_SWIPES_MAX,
    WRONG_PIN_WINDOW_MS,
    AlertKind,
    BlockWatch,
    Detector,
)
from clearing.codes import CardState, InstitutionType, ResultCode
from clearing.model import CardStateChanged, SwipeApproved, SwipeDeclined
from tests.unit.conftest import HOSPITAL, PHARMACY, SSN, T0_MS

_n = itertools.count()
CARD_REF = "ct_aaaaaaaaaaaaaaaaaaaaaaaa"
BEIJING = "110105P00001"  # another city than Shanghai's 3101…


def approved(
    at_ms: int, institution: str = PHARMACY, terminal: str = "T1", card: str = CARD_REF
) -> SwipeApproved:
    rid = f"{terminal}:{next(_n)}"
    return SwipeApproved(
        f"{rid}#0",
        at_ms,
        SSN,
        rid,
        "",
        institution,
        InstitutionType.PHARMACY,
        1_00,
        1_00,
        0,
        5_00,
        0,
        terminal_id=terminal,
        card_ref=card,
        card_masked="*****0001",
    )


def declined(
    at_ms: int, result: ResultCode, terminal: str = "T1", pin_wrong: bool = False
) -> SwipeDeclined:
    rid = f"{terminal}:{next(_n)}"
    return SwipeDeclined(
        f"{rid}#0",
        at_ms,
        SSN,
        rid,
        "",
        PHARMACY,
        1_00,
        result,
        pin_wrong,
        terminal_id=terminal,
        card_ref=CARD_REF,
        card_masked="*****0001",
    )


def kinds(detector: Detector, *events: object) -> list[AlertKind]:
    return [a.kind for e in events for a in detector.observe(e)]  # type: ignore[arg-type]


def test_normal_use_raises_nothing() -> None:
    d = Detector()
    events = [approved(T0_MS + i * 60_000, PHARMACY if i % 2 else HOSPITAL) for i in range(20)]
    events.append(declined(T0_MS, ResultCode.INSUFFICIENT_BALANCE))
    events.append(declined(T0_MS, ResultCode.PIN_WRONG, pin_wrong=True))
    assert kinds(d, *events) == []


def test_a_swipe_on_a_lost_card_is_flagged_for_the_cardholder_and_a_repeat_is_not() -> None:
    d = Detector()
    event = declined(T0_MS, ResultCode.CARD_LOST)
    alerts = d.observe(event)
    assert [a.kind for a in alerts] == [AlertKind.BLOCKED_CARD_USED]
    assert (
        alerts[0].cardholder_facing and alerts[0].alert_id == f"{event.event_id}/blocked_card_used"
    )
    assert d.observe(event) == []  # redelivered


def test_wrong_pins_at_two_terminals_within_the_window_once() -> None:
    d = Detector()
    first = declined(T0_MS, ResultCode.PIN_WRONG, "T1", pin_wrong=True)
    second = declined(T0_MS + 60_000, ResultCode.PIN_WRONG, "T2", pin_wrong=True)
    third = declined(T0_MS + 120_000, ResultCode.PIN_WRONG, "T3", pin_wrong=True)
    assert kinds(d, first, second, third) == [AlertKind.WRONG_PINS_ACROSS_TERMINALS]
    late = declined(T0_MS + 3 * WRONG_PIN_WINDOW_MS, ResultCode.PIN_WRONG, "T4", pin_wrong=True)
    assert kinds(d, late) == []  # alone in a new window


def test_paying_in_two_cities_within_minutes() -> None:
    d = Detector()
    assert kinds(d, approved(T0_MS, PHARMACY), approved(T0_MS + 5 * 60_000, BEIJING)) == [
        AlertKind.DISTANT_INSTITUTIONS
    ]
    other = Detector()
    assert kinds(other, approved(T0_MS, PHARMACY), approved(T0_MS + 3_600_000, BEIJING)) == []


def test_a_terminal_burst_is_flagged_once_and_not_for_the_cardholder() -> None:
    d = Detector()
    events = [
        approved(T0_MS + i * 100, terminal="T9", card=f"ct_{i:024d}")
        for i in range(TERMINAL_BURST_SWIPES_MAX + 10)
    ]
    alerts = [a for e in events for a in d.observe(e)]
    assert [a.kind for a in alerts] == [AlertKind.TERMINAL_BURST]
    assert not alerts[0].cardholder_facing


def test_alerts_round_trip_through_the_codec() -> None:
    alert = Detector().observe(declined(T0_MS, ResultCode.CARD_FROZEN))[0]
    again = codec.decode(codec.encode(alert))
    assert again == alert and isinstance(again.kind, AlertKind)


def test_block_to_first_refusal_is_measured_once_per_block() -> None:
    watch = BlockWatch()

    def change(at_ms: int, old: CardState, new: CardState) -> CardStateChanged:
        return CardStateChanged(f"c{at_ms}#0", at_ms, SSN, "", "op", old, new, card_ref=CARD_REF)

    assert watch.observe(change(T0_MS, CardState.ACTIVE, CardState.PRE_LOST)) is None
    assert watch.observe(change(T0_MS + 500, CardState.PRE_LOST, CardState.LOST)) is None
    assert watch.observe(declined(T0_MS + 2_000, ResultCode.CARD_LOST)) == 2_000
    assert watch.observe(declined(T0_MS + 3_000, ResultCode.CARD_LOST)) is None  # not first
    assert watch.observe(declined(T0_MS + 3_000, ResultCode.PIN_WRONG)) is None
