"""When a swipe or a balance enquiry breaks several rules at once, the lowest result code
is the answer (clearing/codes.py). Each fault below breaks exactly one rule of a swipe
that would otherwise be approved; every pair of faults, and any set of them (hypothesis),
must be answered with the lowest of their codes."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing import core, pos
from clearing.codes import CardColour, CardKind, CardState, ResultCode
from clearing.model import Authorize, BalanceInquiry, Card, Person, PinOutcome
from tests.unit.conftest import CARD, CLOSED, HOSPITAL, PHARMACY, POLICY, SSN, T0_MS, make_person

Request = Authorize | BalanceInquiry
Fault = Callable[[Person, Request], tuple[Person, Request]]


def _card(person: Person, **changes: object) -> Person:
    cards = tuple(replace(c, **changes) if c.card_no == CARD else c for c in person.cards)  # type: ignore[arg-type]
    return replace(person, cards=cards)


def _state(state: CardState) -> Fault:
    return lambda p, r: (_card(p, state=state), r)


# Faults that exclude each other share a group (a card has one state, a swipe one PIN).
GROUPS: dict[str, dict[ResultCode, Fault]] = {
    "form": {
        ResultCode.MALFORMED_REQUEST: lambda p, r: (p, replace(r, card_no="not-a-card")),
    },
    "pin": {
        ResultCode.PIN_BLOCK_INVALID: lambda p, r: (p, replace(r, pin=PinOutcome.INVALID_BLOCK)),
        ResultCode.PIN_WRONG: lambda p, r: (p, replace(r, pin=PinOutcome.WRONG)),
        ResultCode.PIN_TRIES_EXCEEDED: lambda p, r: (
            _card(p, pin_failures=2),
            replace(r, pin=PinOutcome.WRONG),
        ),
    },
    "institution": {
        ResultCode.INSTITUTION_UNKNOWN: lambda p, r: (p, replace(r, institution_id="NOWHERE1")),
        ResultCode.INSTITUTION_NOT_DESIGNATED: lambda p, r: (p, replace(r, institution_id=CLOSED)),
    },
    "card": {
        ResultCode.CARD_UNKNOWN: lambda p, r: (p, replace(r, card_no="Z99999999")),
        ResultCode.CARD_NOT_ACTIVATED: _state(CardState.ISSUED),
        ResultCode.CARD_PRE_LOST: lambda p, r: (
            _card(p, state=CardState.PRE_LOST, pre_loss_deadline_ms=T0_MS + 3_600_000),
            r,
        ),
        ResultCode.CARD_LOST: _state(CardState.LOST),
        ResultCode.CARD_LOCKED: _state(CardState.LOCKED),
        ResultCode.CARD_FROZEN: _state(CardState.FROZEN),
        ResultCode.CARD_CANCELLED: lambda p, r: (replace(p, cancelled=True), r),
        ResultCode.CARD_EXPIRED: lambda p, r: (
            _card(p, kind=CardKind.TEMPORARY, expires_at_ms=T0_MS - 1),
            r,
        ),
        ResultCode.CARD_SUPERSEDED: _state(CardState.SUPERSEDED),
    },
    "colour": {ResultCode.COLOUR_NOT_ALLOWED: lambda p, r: (_card(p, colour=CardColour.GREEN), r)},
    "initial PIN": {
        ResultCode.INITIAL_PIN_NOT_CHANGED: lambda p, r: (_card(p, initial_pin=True), r),
    },
    "pharmacy limit": {  # at a pharmacy, a card allowed no pharmacy swipe today
        ResultCode.DAILY_PHARMACY_LIMIT_REACHED: lambda p, r: (
            _card(p, pharmacy_swipes_per_day=0),
            replace(r, institution_id=PHARMACY),
        ),
    },
    "balance": {
        ResultCode.INSUFFICIENT_BALANCE: lambda p, r: (p, replace(r, amount_fen=500_00)),  # type: ignore[arg-type]
    },
}
SWIPE_ONLY = {"colour", "pharmacy limit", "balance"}  # a balance enquiry pays nothing


def faults_of(kind: type[Request]) -> list[tuple[str, ResultCode]]:
    return [
        (group, code)
        for group, faults in GROUPS.items()
        if kind is Authorize or group not in SWIPE_ONLY
        for code in faults
    ]


def decide(kind: type[Request], chosen: list[tuple[str, ResultCode]]) -> ResultCode:
    """The answer to a request of `kind` with these faults, applied highest code first so
    that a lower one wins where two touch the same field (as its rule does)."""
    person = make_person(balance_fen=100_00)
    request: Request = (
        Authorize("T1:1", T0_MS, SSN, CARD, HOSPITAL, 10_00, pin=PinOutcome.CORRECT)
        if kind is Authorize
        else BalanceInquiry("T1:1", T0_MS, SSN, CARD, HOSPITAL, pin=PinOutcome.CORRECT)
    )
    for group, code in sorted(chosen, key=lambda gc: gc[1], reverse=True):
        person, request = GROUPS[group][code](person, request)
    return core.decide(person, request, POLICY).reply.result


@pytest.mark.parametrize("kind", [Authorize, BalanceInquiry])
def test_each_fault_alone_is_answered_with_its_own_code(kind: type[Request]) -> None:
    assert decide(kind, []) == ResultCode.OK
    for group, code in faults_of(kind):
        assert decide(kind, [(group, code)]) == code, code.name


@pytest.mark.parametrize("kind", [Authorize, BalanceInquiry])
def test_every_pair_of_faults_is_answered_with_the_lower_code(kind: type[Request]) -> None:
    pairs = [
        (a, b)
        for a, b in itertools.combinations(faults_of(kind), 2)
        if a[0] != b[0]  # two faults of one group cannot hold at once
    ]
    assert len(pairs) >= 50
    wrong = [
        (a[1].name, b[1].name, got.name)
        for a, b in pairs
        if (got := decide(kind, [a, b])) != min(a[1], b[1])
    ]
    assert wrong == []


@st.composite
def fault_sets(draw: st.DrawFn, kind: type[Request]) -> list[tuple[str, ResultCode]]:
    chosen = []
    for group, faults in GROUPS.items():
        if kind is BalanceInquiry and group in SWIPE_ONLY:
            continue
        code = draw(st.sampled_from([None, *faults]))
        if code is not None:
            chosen.append((group, code))
    return chosen


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([Authorize, BalanceInquiry]).flatmap(
        lambda kind: st.tuples(st.just(kind), fault_sets(kind))
    )
)
def test_any_set_of_faults_is_answered_with_the_lowest_code(
    case: tuple[type[Request], list[tuple[str, ResultCode]]],
) -> None:
    kind, chosen = case
    expected = min((code for _group, code in chosen), default=ResultCode.OK)
    assert decide(kind, chosen) == expected


def test_the_check_lists_are_in_result_code_order() -> None:
    for checks in (pos.SWIPE_CHECKS, pos.ENQUIRY_CHECKS):
        assert checks[0] is pos.SWIPE_CHECKS[0]  # malformed first, then the PIN block
    assert len(pos.SWIPE_ORDER) == len(pos.SWIPE_CHECKS)
    with pytest.raises(AssertionError, match="out of result-code order"):
        pos.in_code_order((ResultCode.CARD_UNKNOWN, ResultCode.PIN_BLOCK_INVALID), "backwards")


def test_a_card_unused_by_the_faults_keeps_its_defaults() -> None:
    person = make_person()
    card = person.card(CARD)
    assert isinstance(card, Card) and card.state == CardState.ACTIVE and not card.initial_pin
