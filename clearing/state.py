"""What each event does to a person: apply(person, event) → person, and `remember`, which
keeps a reply for repeats of its request id. Pure; `clearing.core.handle` applies a
decision's events with these, and nothing else changes a person (the changelog holds the
whole person each decision left).
"""

from __future__ import annotations

from dataclasses import replace

from clearing.codes import CardState, ResultCode
from clearing.decisions import InvariantError
from clearing.limits import (
    CREDIT_SOURCES_REMEMBERED_MAX,
    REQUEST_ID_MEMORY_MS,
    REQUEST_IDS_REMEMBERED_MAX,
    SWIPES_REMEMBERED_MAX,
)
from clearing.model import (
    AccountCredited,
    Card,
    CardIssued,
    CardStateChanged,
    CreditRecord,
    Event,
    Person,
    PersonCancelled,
    PersonRegistered,
    PharmacyLimitSet,
    PhoneSet,
    PinChanged,
    PinTriesReset,
    Refunded,
    Reply,
    ReversalUnmatched,
    SwipeApproved,
    SwipeDeclined,
    SwipeRecord,
    SwipeReversed,
)


def _with_card(person: Person, card_no: str, **changes: object) -> Person:
    cards = tuple(
        replace(card, **changes) if card.card_no == card_no else card  # type: ignore[arg-type]
        for card in person.cards
    )
    return replace(person, cards=cards)


def _with_swipe(person: Person, request_id: str, **changes: object) -> Person:
    swipes = tuple(
        replace(s, **changes) if s.request_id == request_id else s  # type: ignore[arg-type]
        for s in person.swipes
    )
    return replace(person, swipes=swipes)


def apply(person: Person | None, event: Event) -> Person | None:
    """The one way state changes. Every event applied to a person bumps its version."""
    if isinstance(event, PersonRegistered):
        if person is not None:
            raise InvariantError("PersonRegistered for an existing person")
        return Person(
            ssn=event.ssn,
            name=event.name,
            category=event.category,
            phone=event.phone,
            region=event.region,
            created_at_ms=event.at_ms,
            version=1,
        )
    if person is None:
        if isinstance(event, SwipeDeclined):  # a swipe of an unknown card: logged, no state
            return None
        raise InvariantError(f"{type(event).__name__} for an unknown person")
    if event.ssn != person.ssn:
        raise InvariantError("event applied to another person")
    person = replace(person, version=person.version + 1)
    match event:
        case PhoneSet():
            return replace(person, phone=event.phone)
        case PersonCancelled():
            return replace(person, cancelled=True)
    changed = _apply_card_event(person, event)
    if changed is None:
        changed = _apply_money_event(person, event)
    if changed is None:
        raise InvariantError(f"unknown event {type(event).__name__}")
    return changed


def _apply_card_event(person: Person, event: Event) -> Person | None:
    """A card's life and its PIN; None for an event of another kind."""
    match event:
        case CardIssued():
            card = Card(
                event.card_no,
                event.kind,
                event.colour,
                event.state,
                event.at_ms,
                initial_pin=not event.pin_set,
                pvv=event.pvv,
                expires_at_ms=event.expires_at_ms,
            )
            return replace(person, cards=(*person.cards, card))
        case CardStateChanged():
            changes: dict[str, object] = {"state": event.new_state}
            if event.op == "report_pre_loss":
                changes.update(
                    pre_loss_deadline_ms=event.deadline_ms, state_before_pre_loss=event.old_state
                )
            elif event.old_state == CardState.PRE_LOST:
                changes.update(pre_loss_deadline_ms=0)
            if event.op == "unlock":  # back to the initial PIN, to be changed at a window
                changes.update(initial_pin=True, pin_failures=0, pvv="")
            return _with_card(person, event.card_no, **changes)
        case PinChanged():
            return _with_card(
                person, event.card_no, initial_pin=False, pin_failures=0, pvv=event.pvv
            )
        case SwipeDeclined():
            declined_card = person.card(event.card_no)
            if event.pin_wrong and declined_card is not None:
                failures = declined_card.pin_failures + 1
                return _with_card(person, event.card_no, pin_failures=failures)
            if event.pin_verified and declined_card is not None:
                return _with_card(person, event.card_no, pin_failures=0)
            return person
        case PinTriesReset():
            return _with_card(person, event.card_no, pin_failures=0)
        case PharmacyLimitSet():
            return _with_card(person, event.card_no, pharmacy_swipes_per_day=event.swipes_per_day)
    return None


def _apply_money_event(person: Person, event: Event) -> Person | None:
    """The account: credits, swipes, reversals, refunds; None for an event of another kind."""
    match event:
        case AccountCredited():
            credit = CreditRecord(event.source_id, event.amount_fen, event.at_ms)
            credits = (*person.credits, credit)[-CREDIT_SOURCES_REMEMBERED_MAX:]
            return replace(person, balance_fen=event.balance_after_fen, credits=credits)
        case SwipeApproved():
            if event.balance_after_fen < 0 or (
                person.balance_fen - event.paid_from_account_fen != event.balance_after_fen
            ):
                raise InvariantError("swipe would break the balance")
            record = SwipeRecord(
                event.request_id,
                event.card_no,
                event.institution_id,
                event.institution_type,
                event.paid_from_account_fen,
                event.day,
                event.at_ms,
                amount_fen=event.amount_fen,
            )
            swipes = (*person.swipes, record)[-SWIPES_REMEMBERED_MAX:]
            person = replace(person, balance_fen=event.balance_after_fen, swipes=swipes)
            return _with_card(person, event.card_no, pin_failures=0)
        case SwipeReversed():
            person = _with_swipe(person, event.original_request_id, reversed=True)
            return replace(person, balance_fen=event.balance_after_fen)
        case ReversalUnmatched():
            tombstone = Reply(
                event.original_request_id,
                ResultCode.ALREADY_REVERSED,
                version=person.version,
                at_ms=event.at_ms,
                card_no=event.card_no,
            )
            return remember(person, tombstone)
        case Refunded():
            refunded = person.swipe(event.original_request_id)
            if refunded is None:
                raise InvariantError("refund of a swipe the person does not have")
            person = _with_swipe(
                person,
                event.original_request_id,
                refunded_fen=refunded.refunded_fen + event.amount_fen,
            )
            return replace(person, balance_fen=event.balance_after_fen)
    return None


def remember(person: Person, reply: Reply) -> Person:
    """Keep a reply for repeats of its request id, within the count and time bounds."""
    horizon = reply.at_ms - REQUEST_ID_MEMORY_MS
    kept = tuple(r for r in person.replies if r.at_ms >= horizon)
    return replace(person, replies=(*kept, reply)[-REQUEST_IDS_REMEMBERED_MAX:])
