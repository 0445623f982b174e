"""One test (or more) per rule of ../shared/DOMAIN.md, named after the rule it checks.

Rules of the card lifecycle, temporary cards, pre-loss expiry, reversal, refund and
credits. The authorization precedence and the daily limit are in test_core.py.
"""

from __future__ import annotations

import datetime as dt

import pytest

from clearing import calendar, core
from clearing.codes import CardKind, CardState, InsuranceCategory, ResultCode
from clearing.limits import DAY_MS, TEMPORARY_CARD_VALIDITY_MS
from clearing.model import (
    Authorize,
    BalanceInquiry,
    CancelPerson,
    CardCommand,
    CreditAccount,
    ExpirePreLoss,
    Institution,
    IssueCard,
    LifetimeUnit,
    Person,
    Policy,
    PreLossLifetime,
    QueryPerson,
    Refund,
    RegisterPerson,
    ReplaceCard,
    Reverse,
    SetPharmacyLimit,
    SetPhone,
)
from tests.unit.conftest import (
    CARD,
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

BEIJING = dt.timezone(dt.timedelta(hours=8))


def at(text: str) -> int:
    """Epoch ms of a Beijing wall-clock time, e.g. '2026-09-30 10:00'."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=BEIJING).timestamp() * 1000)


def op(
    person: Person | None, name: str, card: str = CARD, when: int = T0_MS, policy: Policy = POLICY
) -> tuple[Person | None, ResultCode]:
    new, decision = core.handle(person, CardCommand(rid(), when, SSN, card, name), policy)
    return new, decision.reply.result


def card_state(person: Person | None, card: str = CARD) -> CardState:
    assert person is not None
    found = person.card(card)
    assert found is not None
    return found.state


# --------------------------------------------------------------- issued, not activated


def test_rule_social_card_must_be_activated_before_use() -> None:
    person = make_person(activate=False)
    assert card_state(person) == CardState.ISSUED
    _, code = run(person, swipe())
    assert code == ResultCode.CARD_NOT_ACTIVATED
    person, code = op(person, "activate")
    assert code == ResultCode.OK
    _, code = run(person, swipe())
    assert code == ResultCode.OK


def test_rule_temporary_card_needs_no_activation_and_is_valid_one_year() -> None:
    person, _ = run(None, RegisterPerson(rid(), T0_MS, SSN, "李四", InsuranceCategory.EMPLOYEE))
    person, code = run(person, IssueCard(rid(), T0_MS, SSN, "T00000001", CardKind.TEMPORARY))
    assert code == ResultCode.OK and card_state(person, "T00000001") == CardState.ACTIVE
    person, _ = run(person, CardCommand(rid(), T0_MS, SSN, "T00000001", "change_pin"))
    person, _ = run(person, CreditAccount(rid(), T0_MS, SSN, 100_00, "src-t"))
    _, code = run(person, swipe(card_no="T00000001", at_ms=T0_MS + DAY_MS))
    assert code == ResultCode.OK
    _, code = run(person, swipe(card_no="T00000001", at_ms=T0_MS + TEMPORARY_CARD_VALIDITY_MS))
    assert code == ResultCode.CARD_EXPIRED


def test_rule_no_temporary_card_while_a_social_card_is_valid(person: Person) -> None:
    _, code = run(person, IssueCard(rid(), T0_MS, SSN, "T00000002", CardKind.TEMPORARY))
    assert code == ResultCode.TEMPORARY_CARD_WHILE_SOCIAL_VALID


def test_rule_issuing_a_social_card_voids_the_temporary_card() -> None:
    person, _ = run(None, RegisterPerson(rid(), T0_MS, SSN, "李四", InsuranceCategory.EMPLOYEE))
    person, _ = run(person, IssueCard(rid(), T0_MS, SSN, "T00000003", CardKind.TEMPORARY))
    person, code = run(person, IssueCard(rid(), T0_MS, SSN, CARD, CardKind.SOCIAL_SECURITY))
    assert code == ResultCode.OK
    assert card_state(person, "T00000003") == CardState.SUPERSEDED
    _, code = run(person, swipe(card_no="T00000003"))
    assert code == ResultCode.CARD_SUPERSEDED


# --------------------------------------------------------------- PIN


def test_rule_initial_pin_cannot_pay_until_changed() -> None:
    person = make_person(change_pin=False)
    _, code = run(person, swipe())
    assert code == ResultCode.INITIAL_PIN_NOT_CHANGED


def test_rule_three_wrong_pins_lock_and_unlock_resets_to_initial_pin(person: Person) -> None:
    from clearing.model import PinOutcome

    for _ in range(3):
        person, _ = run(person, swipe(pin=PinOutcome.WRONG))  # type: ignore[assignment]
    assert card_state(person) == CardState.LOCKED
    person, code = op(person, "unlock")  # type: ignore[assignment]
    assert code == ResultCode.OK and card_state(person) == CardState.ACTIVE
    _, code = run(person, swipe(pin=PinOutcome.CORRECT))
    assert code == ResultCode.INITIAL_PIN_NOT_CHANGED


# --------------------------------------------------------------- loss


def test_rule_pre_loss_takes_effect_immediately(person: Person) -> None:
    reported, code = op(person, "report_pre_loss", when=T0_MS)
    assert code == ResultCode.OK
    _, code = run(reported, swipe(at_ms=T0_MS + 1))
    assert code == ResultCode.CARD_PRE_LOST


def test_rule_release_only_from_pre_loss_and_settlement_resumes(person: Person) -> None:
    _, code = op(person, "release")
    assert code == ResultCode.TRANSITION_NOT_ALLOWED
    reported, _ = op(person, "report_pre_loss")
    released, code = op(reported, "release")
    assert code == ResultCode.OK and card_state(released) == CardState.ACTIVE
    _, code = run(released, swipe())
    assert code == ResultCode.OK


def test_rule_formal_loss_cannot_be_revoked(person: Person) -> None:
    lost, code = op(person, "confirm_loss")
    assert code == ResultCode.OK
    same, code = op(lost, "release")
    assert code == ResultCode.RELEASE_AFTER_FORMAL_LOSS and same is lost
    _, code = op(lost, "activate")
    assert code == ResultCode.TRANSITION_NOT_ALLOWED


def test_rule_release_refused_after_replacement_applied_for(person: Person) -> None:
    reported, _ = op(person, "report_pre_loss")
    applied, code = op(reported, "apply_replacement")
    assert code == ResultCode.OK and card_state(applied) == CardState.REPLACED
    _, code = op(applied, "release")
    assert code == ResultCode.RELEASE_AFTER_REPLACEMENT


def test_rule_replacement_new_number_same_account_old_card_cancelled(person: Person) -> None:
    spent, _ = run(person, swipe(30_00))
    lost, _ = op(spent, "confirm_loss")
    applied, _ = op(lost, "apply_replacement")
    assert applied is not None
    new, code = run(applied, ReplaceCard(rid(), T0_MS, SSN, CARD, "B00000009"))
    assert code == ResultCode.OK and new is not None
    assert card_state(new, CARD) == CardState.CANCELLED
    assert card_state(new, "B00000009") == CardState.ISSUED
    assert new.balance_fen == applied.balance_fen  # the same account
    assert [s.request_id for s in new.swipes] == [s.request_id for s in spent.swipes]  # type: ignore[union-attr]
    new, _ = op(new, "activate", card="B00000009")
    new, _ = op(new, "change_pin", card="B00000009")
    _, code = run(new, swipe(card_no="B00000009"))
    assert code == ResultCode.OK
    _, code = run(new, swipe(card_no=CARD))
    assert code == ResultCode.CARD_CANCELLED


def test_rule_replacement_needs_an_application_first(person: Person) -> None:
    _, code = run(person, ReplaceCard(rid(), T0_MS, SSN, CARD, "B00000010"))
    assert code == ResultCode.TRANSITION_NOT_ALLOWED


def test_rule_change_card_for_damage_cancels_the_old_one(person: Person) -> None:
    changed, code = run(person, ReplaceCard(rid(), T0_MS, SSN, CARD, "B00000011", "change"))
    assert code == ResultCode.OK
    assert card_state(changed, CARD) == CardState.CANCELLED
    assert card_state(changed, "B00000011") == CardState.ISSUED


def test_rule_frozen_account_unfreezes_on_activation_of_the_new_card(person: Person) -> None:
    frozen, _ = op(person, "freeze")
    _, code = run(frozen, swipe())
    assert code == ResultCode.CARD_FROZEN
    changed, _ = run(frozen, ReplaceCard(rid(), T0_MS, SSN, CARD, "B00000012", "change"))
    assert card_state(changed, CARD) == CardState.CANCELLED
    active, _ = op(changed, "activate", card="B00000012")
    active, _ = op(active, "change_pin", card="B00000012")
    _, code = run(active, swipe(card_no="B00000012"))
    assert code == ResultCode.OK


def test_rule_freeze_and_unfreeze_at_the_window(person: Person) -> None:
    frozen, _ = op(person, "freeze")
    thawed, code = op(frozen, "unfreeze")
    assert code == ResultCode.OK
    _, code = run(thawed, swipe())
    assert code == ResultCode.OK


def test_rule_cancelled_is_terminal(person: Person) -> None:
    gone, code = run(person, CancelPerson(rid(), T0_MS, SSN, "death"))
    assert code == ResultCode.OK and gone is not None and gone.cancelled
    _, code = run(gone, swipe())
    assert code == ResultCode.CARD_CANCELLED
    for name in ("activate", "release", "unfreeze"):
        _, code = op(gone, name)
        assert code == ResultCode.CARD_CANCELLED
    _, code = run(gone, CreditAccount(rid(), T0_MS, SSN, 1_00, "late"))
    assert code == ResultCode.CARD_CANCELLED


# --------------------------------------------------------------- pre-loss expiry


REGIONS = Policy(
    institutions=POLICY.institutions,
    pre_loss_lifetimes={
        "h24": PreLossLifetime(24, LifetimeUnit.HOURS),
        "wd3": PreLossLifetime(3, LifetimeUnit.WORKING_DAYS),
        "d5": PreLossLifetime(5, LifetimeUnit.DAYS),
        "d10": PreLossLifetime(10, LifetimeUnit.DAYS),
    },
)


def person_in(region: str) -> Person:
    base = make_person()
    return Person(**{**{f: getattr(base, f) for f in base.__slots__}, "region": region})  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("region", "reported", "lapses"),
    [
        ("h24", "2026-11-20 10:00", "2026-11-21 10:00"),
        ("d5", "2026-11-20 10:00", "2026-11-25 10:00"),
        ("d10", "2026-11-20 10:00", "2026-11-30 10:00"),
        # Friday report, three working days: Mon, Tue, Wed → lapses at Thursday 00:00
        ("wd3", "2026-11-20 10:00", "2026-11-26 00:00"),
        # National Day: Oct 1-7 holidays, Oct 8-9 working, Sat Oct 10 an adjusted workday
        ("wd3", "2026-09-30 10:00", "2026-10-11 00:00"),
    ],
)
def test_rule_pre_loss_lapses_by_region_policy(region: str, reported: str, lapses: str) -> None:
    person = person_in(region)
    pre_lost, code = op(person, "report_pre_loss", when=at(reported), policy=REGIONS)
    assert code == ResultCode.OK and pre_lost is not None
    card = pre_lost.card(CARD)
    assert card is not None and card.pre_loss_deadline_ms == at(lapses)
    _, decision = core.handle(pre_lost, swipe(at_ms=at(lapses) - 1, institution=HOSPITAL), REGIONS)
    assert decision.reply.result == ResultCode.CARD_PRE_LOST
    # the timer's expiry command records the lapse; the card works again
    expired, code = run(pre_lost, ExpirePreLoss(rid(), at(lapses), SSN, CARD, at(lapses)))
    assert code == ResultCode.OK and card_state(expired) == CardState.ACTIVE
    _, decision = core.handle(expired, swipe(at_ms=at(lapses) + 1, institution=HOSPITAL), REGIONS)
    assert decision.reply.result == ResultCode.OK


def test_rule_a_lapsed_pre_loss_lets_swipes_through_before_the_timer_runs() -> None:
    person = person_in("h24")
    pre_lost, _ = op(person, "report_pre_loss", when=T0_MS, policy=REGIONS)
    _, decision = core.handle(pre_lost, swipe(at_ms=T0_MS + 25 * 3600_000), REGIONS)
    assert decision.reply.result == ResultCode.OK


@pytest.mark.parametrize("after", ["confirm_loss", "release"])
def test_rule_an_expiry_after_formal_loss_or_release_changes_nothing(after: str) -> None:
    person = person_in("h24")
    pre_lost, _ = op(person, "report_pre_loss", when=T0_MS, policy=REGIONS)
    assert pre_lost is not None
    deadline = pre_lost.card(CARD).pre_loss_deadline_ms  # type: ignore[union-attr]
    moved, _ = op(pre_lost, after, when=T0_MS + 1000, policy=REGIONS)
    same, decision = core.handle(
        moved, ExpirePreLoss(rid(), deadline, SSN, CARD, deadline), REGIONS
    )
    assert same is moved and decision.events == ()


def test_rule_an_expiry_for_an_earlier_pre_loss_changes_nothing() -> None:
    person = person_in("h24")
    first, _ = op(person, "report_pre_loss", when=T0_MS, policy=REGIONS)
    assert first is not None
    old_deadline = first.card(CARD).pre_loss_deadline_ms  # type: ignore[union-attr]
    released, _ = op(first, "release", when=T0_MS + 1, policy=REGIONS)
    second, _ = op(released, "report_pre_loss", when=T0_MS + 3600_000, policy=REGIONS)
    same, _decision = core.handle(
        second, ExpirePreLoss(rid(), old_deadline, SSN, CARD, old_deadline), REGIONS
    )
    assert same is second and card_state(same) == CardState.PRE_LOST


def test_rule_working_days_use_the_official_calendar_with_a_weekday_fallback() -> None:
    assert calendar.is_working_day(calendar.shanghai_day(at("2026-10-10 12:00")))  # 调休
    assert not calendar.is_working_day(calendar.shanghai_day(at("2026-10-01 12:00")))
    # 2027 is past the package's data: Monday-Friday
    assert calendar.is_working_day(calendar.shanghai_day(at("2027-03-01 12:00")))
    assert not calendar.is_working_day(calendar.shanghai_day(at("2027-03-06 12:00")))


# --------------------------------------------------------------- reversal and refund


def test_rule_reversal_undoes_a_swipe_once_and_is_idempotent(person: Person) -> None:
    spent, _ = run(person, swipe(25_00, request_id="T1:1"))
    reverse = Reverse("T1:2", T0_MS, SSN, "T1:1", CARD)
    undone, decision = core.handle(spent, reverse, POLICY)
    assert decision.reply.result == ResultCode.OK
    assert undone is not None and undone.balance_fen == person.balance_fen
    again, decision = core.handle(undone, reverse, POLICY)
    assert decision.reply.replayed and again is undone
    _, decision = core.handle(undone, Reverse("T1:3", T0_MS, SSN, "T1:1", CARD), POLICY)
    assert decision.reply.result == ResultCode.ALREADY_REVERSED


def test_rule_reversed_swipes_do_not_count_towards_the_daily_limit(person: Person) -> None:
    state, _ = run(person, swipe(request_id="T1:10"))
    state, _ = run(state, swipe(request_id="T1:11"))
    state, code = run(state, swipe(request_id="T1:12"))
    assert code == ResultCode.DAILY_PHARMACY_LIMIT_REACHED
    state, _ = run(state, Reverse("T1:13", T0_MS, SSN, "T1:11", CARD))
    _, code = run(state, swipe(request_id="T1:14"))
    assert code == ResultCode.OK


def test_rule_reversal_of_unknown_or_declined_swipe_is_answered(person: Person) -> None:
    _, code = run(person, Reverse(rid(), T0_MS, SSN, "T9:404", CARD))
    assert code == ResultCode.ORIGINAL_NOT_FOUND
    declined, code = run(person, swipe(10**6, request_id="T9:1"))
    assert code == ResultCode.INSUFFICIENT_BALANCE
    _, code = run(declined, Reverse(rid(), T0_MS, SSN, "T9:1", CARD))
    assert code == ResultCode.ORIGINAL_DECLINED


def test_rule_a_late_original_after_its_reversal_is_not_approved(person: Person) -> None:
    reversed_first, code = run(person, Reverse("T2:2", T0_MS, SSN, "T2:1", CARD))
    assert code == ResultCode.ORIGINAL_NOT_FOUND
    late, decision = core.handle(reversed_first, swipe(10_00, request_id="T2:1"), POLICY)
    assert decision.reply.result == ResultCode.ALREADY_REVERSED
    assert late is not None and late.balance_fen == person.balance_fen


def test_rule_refund_never_exceeds_what_was_paid(person: Person) -> None:
    spent, _ = run(person, swipe(40_00, request_id="T3:1"))
    part, code = run(spent, Refund(rid(), T0_MS, SSN, "T3:1", CARD, 15_00))
    assert code == ResultCode.OK and part is not None
    assert part.balance_fen == person.balance_fen - 25_00
    _, code = run(part, Refund(rid(), T0_MS, SSN, "T3:1", CARD, 25_01))
    assert code == ResultCode.REFUND_EXCEEDS_PAID
    rest, code = run(part, Refund(rid(), T0_MS, SSN, "T3:1", CARD, 25_00))
    assert code == ResultCode.OK and rest is not None
    assert rest.balance_fen == person.balance_fen
    _, code = run(rest, Refund(rid(), T0_MS, SSN, "T3:1", CARD, 1))
    assert code == ResultCode.REFUND_EXCEEDS_PAID
    _, code = run(rest, Reverse(rid(), T0_MS, SSN, "T3:1", CARD))
    assert code == ResultCode.OK  # nothing left to return, but the swipe is now reversed


def test_rule_refund_of_a_reversed_swipe_is_refused(person: Person) -> None:
    spent, _ = run(person, swipe(10_00, request_id="T4:1"))
    undone, _ = run(spent, Reverse(rid(), T0_MS, SSN, "T4:1", CARD))
    _, code = run(undone, Refund(rid(), T0_MS, SSN, "T4:1", CARD, 1_00))
    assert code == ResultCode.ALREADY_REVERSED


# --------------------------------------------------------------- window, POS, credits


def test_rule_pharmacy_limit_is_settable_per_card(person: Person) -> None:
    state, code = run(person, SetPharmacyLimit(rid(), T0_MS, SSN, CARD, 1))
    assert code == ResultCode.OK
    state, _ = run(state, swipe())
    _, code = run(state, swipe())
    assert code == ResultCode.DAILY_PHARMACY_LIMIT_REACHED
    _, code = run(person, SetPharmacyLimit(rid(), T0_MS, SSN, CARD, 99))
    assert code == ResultCode.MALFORMED_REQUEST


def test_rule_balance_enquiry_at_hospitals_and_pharmacies_counts_no_swipe(
    person: Person,
) -> None:
    for institution in (HOSPITAL, PHARMACY):
        new, decision = core.handle(
            person, BalanceInquiry(rid(), T0_MS, SSN, CARD, institution), POLICY
        )
        assert decision.reply.result == ResultCode.OK and new is person


def test_rule_monthly_allocation_credits_once_per_source(person: Person) -> None:
    once, _ = run(person, CreditAccount(rid(), T0_MS, SSN, 200_00, "2026-11/alloc/1"))
    twice, _ = run(once, CreditAccount(rid(), T0_MS, SSN, 200_00, "2026-11/alloc/1"))
    assert twice is once and once is not None
    assert once.balance_fen == person.balance_fen + 200_00


def test_rule_phone_for_sms_is_settable_and_validated(person: Person) -> None:
    new, code = run(person, SetPhone(rid(), T0_MS, SSN, "13912345678"))
    assert code == ResultCode.OK and new is not None and new.phone == "13912345678"
    _, code = run(person, SetPhone(rid(), T0_MS, SSN, "12345"))
    assert code == ResultCode.MALFORMED_REQUEST


def test_rule_lookup_returns_cards_and_records_and_changes_nothing(person: Person) -> None:
    spent, _ = run(person, swipe(5_00))
    same, decision = core.handle(spent, QueryPerson(rid(), T0_MS, SSN), POLICY)
    assert same is spent and decision.reply.snapshot is spent


def test_rule_records_cover_allocations_and_consumption(person: Person) -> None:
    credited, _ = run(person, CreditAccount(rid(), T0_MS + 1, SSN, 88_00, "2026-11/alloc/9"))
    spent, _ = run(credited, swipe(5_00, at_ms=T0_MS + 2))
    assert spent is not None
    assert [(r.source_id, r.amount_fen) for r in spent.credits][-1] == ("2026-11/alloc/9", 88_00)
    assert [s.paid_from_account_fen for s in spent.swipes] == [5_00]


def test_rule_institution_unknown_swipe_is_refused_before_anything_else() -> None:
    policy = Policy(
        institutions={
            "X1": Institution("X1", "x", POLICY.institutions[PHARMACY].type, designated=False)
        }
    )
    _, decision = core.handle(make_person(), Authorize(rid(), T0_MS, SSN, CARD, "X1", 1_00), policy)
    assert decision.reply.result == ResultCode.INSTITUTION_NOT_DESIGNATED
