"""PIN rules beyond the swipe: the balance enquiry asks for the PIN, a temporary card is
made with its PIN, and only consecutive wrong PINs lock a card."""

from __future__ import annotations

from dataclasses import replace

from clearing import core
from clearing.codes import CardKind, CardState, InsuranceCategory, ResultCode
from clearing.model import (
    BalanceInquiry,
    CardIssued,
    CreditAccount,
    IssueCard,
    Person,
    PinOutcome,
    PinTriesReset,
    Policy,
    RegisterPerson,
    SwipeDeclined,
)
from tests.unit.conftest import CARD, HOSPITAL, PHARMACY, POLICY, SSN, T0_MS, rid, run, swipe

SECURED = replace(POLICY, pin_verification_required=True)  # terminal security on
PVV = "0123456789abcdef"
TEMP = "T00000001"


def enquiry(pin: int = PinOutcome.CORRECT, request_id: str | None = None) -> BalanceInquiry:
    return BalanceInquiry(request_id or rid(), T0_MS, SSN, CARD, HOSPITAL, pin=pin)


def test_a_balance_is_told_only_for_a_right_pin(person: Person) -> None:
    _, right = core.handle(person, enquiry(), SECURED)
    assert right.reply.result == ResultCode.OK and right.reply.balance_fen == 100_00
    assert right.events == ()
    for pin in (PinOutcome.WRONG, PinOutcome.NOT_VERIFIED):  # no PIN at all: not told either
        _, wrong = core.handle(person, enquiry(pin), SECURED)
        assert wrong.reply.result == ResultCode.PIN_WRONG and wrong.reply.balance_fen == 0
        _, swiped = core.handle(person, swipe(pin=pin), SECURED)
        assert swiped.reply.result == ResultCode.PIN_WRONG and swiped.reply.balance_fen == 0
    _, invalid = core.handle(person, enquiry(PinOutcome.INVALID_BLOCK), SECURED)
    assert invalid.reply.result == ResultCode.PIN_BLOCK_INVALID and invalid.events == ()


def test_wrong_pins_at_balance_enquiries_count_towards_the_lock(person: Person) -> None:
    state: Person | None = person
    codes = []
    for _ in range(3):
        state, decision = core.handle(state, enquiry(PinOutcome.WRONG), SECURED)
        codes.append(decision.reply.result)
        declined = decision.events[0]
        assert isinstance(declined, SwipeDeclined) and declined.inquiry and declined.pin_wrong
        assert declined.amount_fen == 0
    assert codes == [ResultCode.PIN_WRONG, ResultCode.PIN_WRONG, ResultCode.PIN_TRIES_EXCEEDED]
    assert state is not None and state.card(CARD).state == CardState.LOCKED  # type: ignore[union-attr]
    _, after = core.handle(state, enquiry(), SECURED)
    assert after.reply.result == ResultCode.CARD_LOCKED
    _, paying = core.handle(state, swipe(pin=PinOutcome.CORRECT), SECURED)
    assert paying.reply.result == ResultCode.CARD_LOCKED


def test_a_repeated_wrong_enquiry_counts_once(person: Person) -> None:
    once, _first = core.handle(person, enquiry(PinOutcome.WRONG, "T1:77"), SECURED)
    twice, again = core.handle(once, enquiry(PinOutcome.WRONG, "T1:77"), SECURED)
    assert again.reply.replayed and again.events == () and twice is once
    assert once is not None and once.card(CARD).pin_failures == 1  # type: ignore[union-attr]


def test_a_card_with_the_initial_pin_tells_no_balance() -> None:
    from tests.unit.conftest import make_person

    fresh = make_person(change_pin=False)
    _, decision = core.handle(fresh, enquiry(), SECURED)
    assert decision.reply.result == ResultCode.INITIAL_PIN_NOT_CHANGED


def test_only_consecutive_wrong_pins_lock(person: Person) -> None:
    state: Person | None = person
    state, _ = core.handle(state, swipe(pin=PinOutcome.WRONG), SECURED)
    state, _ = core.handle(state, swipe(pin=PinOutcome.WRONG), SECURED)
    # a right PIN, though the swipe is declined for the amount: the count starts again
    state, declined = core.handle(state, swipe(500_00, pin=PinOutcome.CORRECT), SECURED)
    assert declined.reply.result == ResultCode.INSUFFICIENT_BALANCE
    state, _ = core.handle(state, swipe(pin=PinOutcome.WRONG), SECURED)
    state, _ = core.handle(state, swipe(pin=PinOutcome.WRONG), SECURED)
    assert state is not None and state.card(CARD).state == CardState.ACTIVE  # type: ignore[union-attr]
    # and a right PIN at a balance enquiry does the same
    state, told = core.handle(state, enquiry(), SECURED)
    assert told.reply.result == ResultCode.OK and isinstance(told.events[0], PinTriesReset)
    assert state is not None and state.card(CARD).pin_failures == 0  # type: ignore[union-attr]
    assert told.reply.pin_tries_remaining == 3


def test_a_right_pin_on_a_blocked_card_does_not_clear_wrong_tries(person: Person) -> None:
    state, _ = core.handle(person, swipe(pin=PinOutcome.WRONG), SECURED)
    assert state is not None
    frozen = replace(state, cards=tuple(replace(c, state=CardState.FROZEN) for c in state.cards))
    after, decision = core.handle(frozen, swipe(pin=PinOutcome.CORRECT), SECURED)
    assert decision.reply.result == ResultCode.CARD_FROZEN
    assert after is not None and after.card(CARD).pin_failures == 1  # type: ignore[union-attr]


def _resident_with_temporary_card(
    pvv: str, policy: Policy = SECURED
) -> tuple[Person | None, ResultCode]:
    person, _ = run(None, RegisterPerson(rid(), T0_MS, SSN, "李四", InsuranceCategory.EMPLOYEE))
    person, _ = run(person, CreditAccount(rid(), T0_MS, SSN, 50_00, "src-temp"))
    new, decision = core.handle(
        person, IssueCard(rid(), T0_MS, SSN, TEMP, CardKind.TEMPORARY, pvv=pvv), policy
    )
    return new, decision.reply.result


def test_a_temporary_card_pays_right_after_it_is_made() -> None:
    person, code = _resident_with_temporary_card(PVV)
    assert code == ResultCode.OK and person is not None
    card = person.card(TEMP)
    assert card is not None and card.state == CardState.ACTIVE
    assert not card.initial_pin and card.pvv == PVV
    _, paid = core.handle(
        person, swipe(card_no=TEMP, institution=PHARMACY, pin=PinOutcome.CORRECT), SECURED
    )
    assert paid.reply.result == ResultCode.OK


def test_a_temporary_card_without_its_pin_is_not_made() -> None:
    _, code = _resident_with_temporary_card("")
    assert code == ResultCode.MALFORMED_REQUEST  # the PIN is set when it is made
    _, code = _resident_with_temporary_card("not hex at all!!")
    assert code == ResultCode.MALFORMED_REQUEST
    # without terminal security no PIN reaches the core; the card still needs no change
    person, code = _resident_with_temporary_card("", POLICY)
    assert code == ResultCode.OK and person is not None
    assert not person.card(TEMP).initial_pin  # type: ignore[union-attr]
    _, paid = core.handle(person, swipe(card_no=TEMP), POLICY)
    assert paid.reply.result == ResultCode.OK


def test_a_social_card_is_made_with_the_initial_pin() -> None:
    person, _ = run(None, RegisterPerson(rid(), T0_MS, SSN, "王五", InsuranceCategory.EMPLOYEE))
    _, decision = core.handle(person, IssueCard(rid(), T0_MS, SSN, CARD, pvv=PVV), SECURED)
    assert decision.reply.result == ResultCode.MALFORMED_REQUEST
    _, decision = core.handle(person, IssueCard(rid(), T0_MS, SSN, CARD), SECURED)
    issued = decision.events[0]
    assert isinstance(issued, CardIssued) and not issued.pin_set
