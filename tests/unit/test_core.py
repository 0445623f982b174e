"""The clearing core, rule by rule (walking-skeleton scope: the rules issue 2 names)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from clearing import core
from clearing.codes import CardState, InsuranceCategory, ResultCode
from clearing.limits import DAY_MS, REQUEST_IDS_REMEMBERED_MAX
from clearing.model import (
    BalanceInquiry,
    CardCommand,
    CreditAccount,
    Person,
    PinOutcome,
    SwipeApproved,
    SwipeDeclined,
)
from tests.unit.conftest import (
    CARD,
    CLOSED,
    HOSPITAL,
    PHARMACY,
    POLICY,
    SSN,
    T0_MS,
    make_person,
    rid,
    run,
    swipe,
)


def test_approved_swipe_debits_the_account(person: Person) -> None:
    new, decision = core.handle(person, swipe(12_50), POLICY)
    assert decision.reply.result == ResultCode.OK
    assert new is not None and new.balance_fen == person.balance_fen - 12_50
    assert decision.reply.balance_fen == new.balance_fen
    assert decision.reply.version == new.version == person.version + 1
    (event,) = decision.events
    assert isinstance(event, SwipeApproved) and event.paid_from_account_fen == 12_50


def test_repeat_of_a_request_id_is_answered_with_the_original_and_not_debited(
    person: Person,
) -> None:
    command = swipe(30_00)
    once, first = core.handle(person, command, POLICY)
    twice, second = core.handle(once, command, POLICY)
    assert twice is once and second.events == ()
    assert second.reply.replayed and not first.reply.replayed
    assert replace(second.reply, replayed=False) == first.reply


def test_repeat_of_a_decline_stays_a_decline_after_the_account_is_credited() -> None:
    person = make_person(balance_fen=5_00)
    command = swipe(10_00)
    person2, code = run(person, command)
    assert code == ResultCode.INSUFFICIENT_BALANCE
    person3, _ = run(person2, CreditAccount(rid(), T0_MS, SSN, 100_00, "src-more"))
    _, repeat = core.handle(person3, command, POLICY)
    assert repeat.reply.result == ResultCode.INSUFFICIENT_BALANCE and repeat.reply.replayed


def test_unknown_person_and_unknown_card_are_card_unknown(person: Person) -> None:
    _, decision = core.handle(None, swipe(), POLICY)
    assert decision.reply.result == ResultCode.CARD_UNKNOWN
    new, code = run(person, swipe(card_no="B99999999"))
    assert code == ResultCode.CARD_UNKNOWN and new is not None
    assert new.balance_fen == person.balance_fen


def test_card_not_activated_is_refused() -> None:
    person = make_person(activate=False)
    _, code = run(person, swipe())
    assert code == ResultCode.CARD_NOT_ACTIVATED


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        (["report_pre_loss"], ResultCode.CARD_PRE_LOST),
        (["confirm_loss"], ResultCode.CARD_LOST),
        (["report_pre_loss", "confirm_loss"], ResultCode.CARD_LOST),
        (["freeze"], ResultCode.CARD_FROZEN),
        (["report_pre_loss", "release"], ResultCode.OK),
        (["freeze", "unfreeze"], ResultCode.OK),
    ],
)
def test_card_states_decide_the_swipe(person: Person, ops: list[str], expected: ResultCode) -> None:
    state: Person | None = person
    for op in ops:
        state, code = run(state, CardCommand(rid(), T0_MS, SSN, CARD, op))
        assert code == ResultCode.OK
    after, code = run(state, swipe())
    assert code == expected
    assert after is not None
    debited = expected == ResultCode.OK
    assert after.balance_fen == person.balance_fen - (10_00 if debited else 0)


def test_release_after_formal_loss_is_refused(person: Person) -> None:
    lost, _ = run(person, CardCommand(rid(), T0_MS, SSN, CARD, "confirm_loss"))
    after, code = run(lost, CardCommand(rid(), T0_MS, SSN, CARD, "release"))
    assert code == ResultCode.RELEASE_AFTER_FORMAL_LOSS
    assert after is lost


def test_three_wrong_pins_lock_the_card_and_say_how_many_tries_remain(person: Person) -> None:
    state: Person | None = person
    remaining = []
    for _ in range(3):
        state, decision = core.handle(state, swipe(pin=PinOutcome.WRONG), POLICY)
        remaining.append((decision.reply.result, decision.reply.pin_tries_remaining))
    assert remaining == [
        (ResultCode.PIN_WRONG, 2),
        (ResultCode.PIN_WRONG, 1),
        (ResultCode.PIN_TRIES_EXCEEDED, 0),
    ]
    assert state is not None and state.card(CARD).state == CardState.LOCKED  # type: ignore[union-attr]
    _, code = run(state, swipe(pin=PinOutcome.CORRECT))
    assert code == ResultCode.CARD_LOCKED
    unlocked, code = run(state, CardCommand(rid(), T0_MS, SSN, CARD, "unlock"))
    assert code == ResultCode.OK
    _, code = run(unlocked, swipe(pin=PinOutcome.CORRECT))
    assert code == ResultCode.INITIAL_PIN_NOT_CHANGED  # unlock resets to the initial PIN


def test_a_correct_pin_resets_the_consecutive_count(person: Person) -> None:
    state, _ = run(person, swipe(pin=PinOutcome.WRONG))
    state, _ = run(state, swipe(pin=PinOutcome.WRONG))
    state, code = run(state, swipe(pin=PinOutcome.CORRECT))
    assert code == ResultCode.OK
    _, decision = core.handle(state, swipe(pin=PinOutcome.WRONG, institution=HOSPITAL), POLICY)
    assert decision.reply.pin_tries_remaining == 2


def test_initial_pin_must_be_changed_first() -> None:
    person = make_person(change_pin=False)
    _, code = run(person, swipe())
    assert code == ResultCode.INITIAL_PIN_NOT_CHANGED


def test_insufficient_balance_and_partial_payment() -> None:
    person = make_person(balance_fen=7_00)
    same, code = run(person, swipe(10_00))
    assert code == ResultCode.INSUFFICIENT_BALANCE and same is not None
    assert same.balance_fen == 7_00
    after, decision = core.handle(person, swipe(10_00, allow_partial=True), POLICY)
    reply = decision.reply
    assert reply.result == ResultCode.PARTIALLY_APPROVED
    assert (reply.paid_from_account_fen, reply.paid_in_cash_fen, reply.balance_fen) == (
        7_00,
        3_00,
        0,
    )
    assert after is not None and after.balance_fen == 0
    _, code = run(after, swipe(1_00, allow_partial=True, institution=HOSPITAL))
    assert code == ResultCode.INSUFFICIENT_BALANCE  # nothing left to pay with


def test_daily_pharmacy_limit_follows_the_shanghai_calendar_day(person: Person) -> None:
    # 2026-11-19 23:59 Beijing = 15:59 UTC; one minute later is a new Beijing day.
    day = core.shanghai_day(T0_MS)
    midnight_ms = (day + 1) * DAY_MS - 8 * 3600 * 1000
    before = midnight_ms - 60_000
    state, _ = run(person, swipe(at_ms=before))
    state, _ = run(state, swipe(at_ms=before))
    state, code = run(state, swipe(at_ms=before))
    assert code == ResultCode.DAILY_PHARMACY_LIMIT_REACHED
    _, code = run(state, swipe(at_ms=before, institution=HOSPITAL))
    assert code == ResultCode.OK  # the limit is for pharmacies only
    _, code = run(state, swipe(at_ms=midnight_ms))
    assert code == ResultCode.OK


def test_declined_swipes_do_not_count_towards_the_limit() -> None:
    person = make_person(balance_fen=15_00)
    state, code = run(person, swipe(100_00))
    assert code == ResultCode.INSUFFICIENT_BALANCE
    state, code = run(state, swipe(5_00))
    assert code == ResultCode.OK
    _, decision = core.handle(state, swipe(5_00), POLICY)
    assert decision.reply.result == ResultCode.OK
    assert decision.reply.pharmacy_swipes_today == 2


def test_green_and_red_cards_have_no_personal_account() -> None:
    for category in (InsuranceCategory.RESIDENT, InsuranceCategory.SPECIAL):
        person = make_person(balance_fen=0, category=category)
        for institution in (PHARMACY, HOSPITAL):
            _, code = run(person, swipe(institution=institution))
            assert code == ResultCode.COLOUR_NOT_ALLOWED
        _, code = run(person, CreditAccount(rid(), T0_MS, SSN, 1_00, "src-green"))
        assert code == ResultCode.COLOUR_NOT_ALLOWED


def test_institution_unknown_and_not_designated_come_before_the_card(person: Person) -> None:
    _, code = run(None, swipe(institution="310101X00000"))
    assert code == ResultCode.INSTITUTION_UNKNOWN
    _, code = run(person, swipe(institution=CLOSED))
    assert code == ResultCode.INSTITUTION_NOT_DESIGNATED


@pytest.mark.parametrize(
    "bad",
    [
        {"amount_fen": 0},
        {"amount_fen": -5},
        {"amount_fen": 10**12},
        {"card_no": "short"},
        {"request_id": "has space"},
        {"institution": ""},
    ],
)
def test_malformed_swipes_change_nothing(person: Person, bad: dict[str, object]) -> None:
    kw: dict[str, object] = {"amount_fen": 10_00}
    kw.update(bad)
    new, decision = core.handle(person, swipe(**kw), POLICY)  # type: ignore[arg-type]
    assert decision.reply.result == ResultCode.MALFORMED_REQUEST
    assert decision.events == () and new is person


def test_bad_ssn_is_malformed(person: Person) -> None:
    command = replace(swipe(), ssn="110105194912310021")  # wrong check character
    new, decision = core.handle(person, command, POLICY)
    assert decision.reply.result == ResultCode.MALFORMED_REQUEST and new is person


def test_credit_is_idempotent_by_source_id(person: Person) -> None:
    once, code = run(person, CreditAccount(rid(), T0_MS, SSN, 50_00, "alloc-2026-11"))
    twice, code2 = run(once, CreditAccount(rid(), T0_MS, SSN, 50_00, "alloc-2026-11"))
    assert (code, code2) == (ResultCode.OK, ResultCode.OK)
    assert once is not None and twice is once
    assert once.balance_fen == person.balance_fen + 50_00


def test_balance_inquiry_changes_nothing(person: Person) -> None:
    new, decision = core.handle(person, BalanceInquiry(rid(), T0_MS, SSN, CARD, HOSPITAL), POLICY)
    assert decision.reply.result == ResultCode.OK
    assert decision.reply.balance_fen == person.balance_fen and new is person


def test_unknown_card_swipe_is_logged_but_keeps_no_state() -> None:
    new, decision = core.handle(None, swipe(), POLICY)
    assert new is None
    assert [type(e) for e in decision.events] == [SwipeDeclined]


def test_reply_memory_is_bounded(person: Person) -> None:
    state: Person | None = person
    for _ in range(REQUEST_IDS_REMEMBERED_MAX + 10):
        state, _ = run(state, swipe(1, institution=HOSPITAL))
    assert state is not None and len(state.replies) == REQUEST_IDS_REMEMBERED_MAX


def test_event_ids_derive_from_the_request_id(person: Person) -> None:
    _, a = core.handle(person, swipe(request_id="T1:77"), POLICY)
    _, b = core.handle(person, swipe(request_id="T1:77"), POLICY)
    assert [e.event_id for e in a.events] == [e.event_id for e in b.events] == [f"T1:77@{T0_MS}#0"]
    _, later = core.handle(person, swipe(request_id="T1:77", at_ms=T0_MS + 1), POLICY)
    assert [e.event_id for e in later.events] == [f"T1:77@{T0_MS + 1}#0"]  # a wrapped trace
