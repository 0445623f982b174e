"""What a POS terminal asks of an account: a swipe (Authorize) and a balance enquiry.

Each is decided by one ordered list of small checks. A check looks at the swipe and
either passes or refuses with its result code; the first refusal is the answer. Each
entry of a list names the lowest code its check can answer, and the lists are in the
result codes' numeric order, so "the lowest number wins" (clearing/codes.py) is true by
construction: `in_code_order` asserts it when this module is imported, and
tests/unit/test_precedence.py tries every pair of refusals and any set of them
(hypothesis).

Before either list runs, `core.decide` has answered a malformed request id or social
security number, and a repeat of a remembered request id (the original reply).

    swipe:   malformed (10) → PIN block (12) → institution unknown / not designated
             (20, 21) → card unknown (30) → card state (31–38) → colour (39) → initial
             PIN (50) → wrong PIN (51; the 3rd locks: 52) → daily pharmacy limit (60)
             → balance (61) → approved
    enquiry: the same list without the payment checks (colour, pharmacy limit,
             balance) → the balance

The daily pharmacy limit counts per card (a replacement card starts its own count):
reversed and declined swipes do not count; refunded ones do (the swipe happened).

A malformed PIN block is a malformed request, decided once: it is refused before
anything of the account is looked at. A right PIN restarts the count of consecutive
wrong ones.

What the gateway decides before the worker (form, request MAC, chip cryptogram) is the
first half of the same order: clearing/ingress.py, which asserts the two halves together.
A card the card index does not know is decided by these same lists on no person
(`ingress.decide_unrouted`, with the PIN block's form), so an unknown institution (20)
still wins over the unknown card (30). A PIN check the HSM did not answer
(PinOutcome.UNAVAILABLE) stops the list at the PIN block: UNAVAILABLE, nothing recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from clearing import validate
from clearing.calendar import shanghai_day
from clearing.codes import (
    DECLINE_OF_CARD_STATE,
    CardColour,
    CardState,
    InstitutionType,
    ResultCode,
)
from clearing.decisions import (
    Told,
    effective_state,
    event_id,
    state_change,
    unchanged,
    with_events,
)
from clearing.limits import PIN_TRIES_MAX
from clearing.model import (
    Authorize,
    BalanceInquiry,
    Card,
    Decision,
    Event,
    Institution,
    Person,
    PinOutcome,
    PinTriesReset,
    Policy,
    SwipeApproved,
    SwipeDeclined,
)

PIN_OUTCOMES = frozenset(PinOutcome)
# Refusals of a swipe that record nothing (no SwipeDeclined): a malformed command, and one
# whose PIN check the HSM did not answer (a repeat of it is decided afresh).
DECIDES_NOTHING = frozenset({ResultCode.MALFORMED_REQUEST, ResultCode.UNAVAILABLE})


@dataclass(frozen=True, slots=True)
class Presented:
    """A card presented at a terminal, with what the checks need to know about it."""

    command: Authorize | BalanceInquiry
    person: Person | None
    card: Card | None
    institution: Institution | None
    policy: Policy

    @property
    def state(self) -> CardState:
        """The card's state now (a cancelled person's cards are all cancelled)."""
        assert self.person is not None and self.card is not None
        if self.person.cancelled:
            return CardState.CANCELLED
        return effective_state(self.card, self.command.at_ms)


@dataclass(frozen=True, slots=True)
class Refusal:
    code: ResultCode
    told: Told = field(default_factory=lambda: Told())
    pin_wrong: bool = False  # counts a wrong PIN on the card
    lock: bool = False  # ... and it was the last try


Check = Callable[[Presented], Refusal | None]


def pharmacy_swipes_on(person: Person, card_no: str, day: int) -> int:
    """Approved, unreversed pharmacy swipes of a card on a Shanghai calendar day."""
    return sum(
        1
        for s in person.swipes
        if s.card_no == card_no
        and s.day == day
        and not s.reversed
        and s.institution_type == InstitutionType.PHARMACY
    )


def terminal_of(c: Authorize | BalanceInquiry) -> str:
    """The terminal of a request: given, or the part of the request id before the trace."""
    return c.terminal_id or c.request_id.rpartition(":")[0]


# ---------------------------------------------------------------------------- the checks


def _malformed(p: Presented) -> Refusal | None:
    c = p.command
    well_formed = (
        validate.is_card_no(c.card_no)
        and validate.is_id(c.institution_id)
        and c.pin in PIN_OUTCOMES
        and (not isinstance(c, Authorize) or validate.is_amount_fen(c.amount_fen))
    )
    return None if well_formed else Refusal(ResultCode.MALFORMED_REQUEST)


def _pin_block(p: Presented) -> Refusal | None:
    if p.command.pin == PinOutcome.INVALID_BLOCK:
        return Refusal(ResultCode.PIN_BLOCK_INVALID)
    if p.command.pin == PinOutcome.UNAVAILABLE:  # the block's form is not known: stop here
        return Refusal(ResultCode.UNAVAILABLE)
    return None


def _institution_known(p: Presented) -> Refusal | None:
    return Refusal(ResultCode.INSTITUTION_UNKNOWN) if p.institution is None else None


def _institution_designated(p: Presented) -> Refusal | None:
    if p.institution is not None and not p.institution.designated:
        return Refusal(ResultCode.INSTITUTION_NOT_DESIGNATED)
    return None


def _card_known(p: Presented) -> Refusal | None:
    return Refusal(ResultCode.CARD_UNKNOWN) if p.person is None or p.card is None else None


def _card_state(p: Presented) -> Refusal | None:
    state = p.state
    if state != CardState.ACTIVE:
        return Refusal(DECLINE_OF_CARD_STATE[state], {"card_state": state})
    return None


def _colour(p: Presented) -> Refusal | None:
    assert p.card is not None
    if p.card.colour != CardColour.BLUE:  # green and red cards have no personal account
        return Refusal(ResultCode.COLOUR_NOT_ALLOWED, {"card_state": p.state})
    return None


def _initial_pin(p: Presented) -> Refusal | None:
    assert p.card is not None
    if p.card.initial_pin:  # shared by every card: it proves nothing and pays nothing
        return Refusal(ResultCode.INITIAL_PIN_NOT_CHANGED, {"card_state": p.state})
    return None


def _pin(p: Presented) -> Refusal | None:
    assert p.card is not None
    pin = p.command.pin
    if pin == PinOutcome.WRONG or (
        pin == PinOutcome.NOT_VERIFIED and p.policy.pin_verification_required
    ):
        remaining = max(0, PIN_TRIES_MAX - p.card.pin_failures - 1)
        if remaining == 0:
            return Refusal(
                ResultCode.PIN_TRIES_EXCEEDED,
                {"card_state": CardState.LOCKED, "pin_tries_remaining": 0},
                pin_wrong=True,
                lock=True,
            )
        return Refusal(
            ResultCode.PIN_WRONG,
            {"card_state": p.state, "pin_tries_remaining": remaining},
            pin_wrong=True,
        )
    return None


def _limit_told(p: Presented) -> Told:
    """What a swipe past its PIN check is told: the card, and its pharmacy swipes today."""
    assert p.person is not None and p.card is not None
    today = pharmacy_swipes_on(p.person, p.card.card_no, shanghai_day(p.command.at_ms))
    return Told(
        card_state=p.state,
        pin_tries_remaining=PIN_TRIES_MAX,
        pharmacy_swipes_today=today,
        pharmacy_swipes_per_day=p.card.pharmacy_swipes_per_day,
    )


def _pharmacy_limit(p: Presented) -> Refusal | None:
    assert p.institution is not None and p.card is not None
    told = _limit_told(p)
    at_pharmacy = p.institution.type == InstitutionType.PHARMACY
    if at_pharmacy and told["pharmacy_swipes_today"] >= p.card.pharmacy_swipes_per_day:
        return Refusal(ResultCode.DAILY_PHARMACY_LIMIT_REACHED, told)
    return None


def _balance(p: Presented) -> Refusal | None:
    assert p.person is not None and isinstance(p.command, Authorize)
    c = p.command
    if p.person.balance_fen < c.amount_fen and (not c.allow_partial or p.person.balance_fen == 0):
        return Refusal(ResultCode.INSUFFICIENT_BALANCE, _limit_told(p))
    return None


def in_code_order(codes: tuple[ResultCode, ...], what: str) -> tuple[ResultCode, ...]:
    """`codes`, after asserting that they are in result-code order."""
    if list(codes) != sorted(codes):
        raise AssertionError(f"{what} out of result-code order: {[c.name for c in codes]}")
    return codes


# Each entry names the lowest code its check can answer (the card-state check answers
# 31-38, the PIN check 51-52; the PIN block's check answers UNAVAILABLE when the HSM did
# not say what the block is, and nothing after it is decided). A balance enquiry runs
# the same list without the checks of a payment.
SWIPE_LIST: tuple[tuple[ResultCode, Check], ...] = (
    (ResultCode.MALFORMED_REQUEST, _malformed),
    (ResultCode.PIN_BLOCK_INVALID, _pin_block),
    (ResultCode.INSTITUTION_UNKNOWN, _institution_known),
    (ResultCode.INSTITUTION_NOT_DESIGNATED, _institution_designated),
    (ResultCode.CARD_UNKNOWN, _card_known),
    (ResultCode.CARD_NOT_ACTIVATED, _card_state),
    (ResultCode.COLOUR_NOT_ALLOWED, _colour),
    (ResultCode.INITIAL_PIN_NOT_CHANGED, _initial_pin),
    (ResultCode.PIN_WRONG, _pin),
    (ResultCode.DAILY_PHARMACY_LIMIT_REACHED, _pharmacy_limit),
    (ResultCode.INSUFFICIENT_BALANCE, _balance),
)
SWIPE_ORDER = in_code_order(tuple(code for code, _check in SWIPE_LIST), "the swipe's checks")
SWIPE_CHECKS = tuple(check for _code, check in SWIPE_LIST)
PAYMENT_ONLY: tuple[Check, ...] = (_colour, _pharmacy_limit, _balance)
ENQUIRY_CHECKS = tuple(check for check in SWIPE_CHECKS if check not in PAYMENT_ONLY)


def first_refusal(checks: tuple[Check, ...], presented: Presented) -> Refusal | None:
    for check in checks:
        refusal = check(presented)
        if refusal is not None:
            return refusal
    return None


def _presented(person: Person | None, c: Authorize | BalanceInquiry, policy: Policy) -> Presented:
    return Presented(
        c,
        person,
        person.card(c.card_no) if person else None,
        policy.institutions.get(c.institution_id),
        policy,
    )


# ---------------------------------------------------------------------------- deciders


def decide_authorize(person: Person | None, c: Authorize, policy: Policy) -> Decision:
    p = _presented(person, c, policy)
    refusal = first_refusal(SWIPE_CHECKS, p)
    if refusal is not None and refusal.code in DECIDES_NOTHING:
        return unchanged(
            person, c.request_id, refusal.code, c.at_ms, amount_fen=c.amount_fen, balance_fen=0
        )
    if refusal is not None:
        return _declined(p, refusal)
    assert person is not None and p.card is not None and p.institution is not None
    told = _limit_told(p)
    paid, result = c.amount_fen, ResultCode.OK
    if person.balance_fen < c.amount_fen:  # the terminal allows a partial payment
        paid, result = person.balance_fen, ResultCode.PARTIALLY_APPROVED
    balance_after = person.balance_fen - paid
    day = shanghai_day(c.at_ms)
    event = SwipeApproved(
        event_id(c, 0),
        c.at_ms,
        c.ssn,
        c.request_id,
        c.card_no,
        c.institution_id,
        p.institution.type,
        c.amount_fen,
        paid,
        c.amount_fen - paid,
        balance_after,
        day,
        terminal_id=terminal_of(c),
    )
    if p.institution.type == InstitutionType.PHARMACY:
        told["pharmacy_swipes_today"] += 1
    told.update(
        Told(
            amount_fen=c.amount_fen,
            paid_from_account_fen=paid,
            paid_in_cash_fen=c.amount_fen - paid,
            balance_fen=balance_after,
            card_no=c.card_no,
        )
    )
    return with_events(person, c, [event], result, **told)


def _declined(p: Presented, refusal: Refusal) -> Decision:
    """A refused swipe, or a balance enquiry refused for a wrong PIN: logged as a
    SwipeDeclined event (the 3rd wrong PIN also locks the card)."""
    c = p.command
    amount_fen = c.amount_fen if isinstance(c, Authorize) else 0
    events: list[Event] = [
        SwipeDeclined(
            event_id(c, 0),
            c.at_ms,
            c.ssn,
            c.request_id,
            c.card_no,
            c.institution_id,
            amount_fen,
            refusal.code,
            refusal.pin_wrong,
            terminal_id=terminal_of(c),
            pin_verified=c.pin == PinOutcome.CORRECT
            and refusal.code > ResultCode.PIN_TRIES_EXCEEDED,
            inquiry=isinstance(c, BalanceInquiry),
        )
    ]
    if refusal.lock and p.card is not None:
        events.append(state_change(c, p.card, 1, "lock", CardState.LOCKED, "PIN tries exceeded"))
    told = refusal.told.copy()
    told["amount_fen"], told["card_no"] = amount_fen, c.card_no
    if refusal.code <= ResultCode.PIN_TRIES_EXCEEDED:  # the balance is told past the PIN only
        told["balance_fen"] = 0
    return with_events(p.person, c, events, refusal.code, **told)


def decide_balance(person: Person | None, c: BalanceInquiry, policy: Policy) -> Decision:
    """At any designated institution; counts no swipe. Only a right PIN is told the
    balance; a wrong one is logged and counted towards the lock, as at a swipe. Other
    refusals change nothing and make no event."""
    p = _presented(person, c, policy)
    refusal = first_refusal(ENQUIRY_CHECKS, p)
    if refusal is not None and refusal.pin_wrong:
        return _declined(p, refusal)
    if refusal is not None:
        told = refusal.told.copy()
        told["balance_fen"] = 0
        if p.card is not None and refusal.code != ResultCode.MALFORMED_REQUEST:
            told["card_no"] = p.card.card_no
        return unchanged(person, c.request_id, refusal.code, c.at_ms, **told)
    assert person is not None and p.card is not None
    told = Told(card_no=p.card.card_no, card_state=p.state, pin_tries_remaining=PIN_TRIES_MAX)
    if c.pin == PinOutcome.CORRECT and p.card.pin_failures:
        reset = PinTriesReset(event_id(c, 0), c.at_ms, c.ssn, p.card.card_no)
        return with_events(person, c, [reset], ResultCode.OK, **told)
    told["pin_tries_remaining"] = p.card.pin_tries_remaining
    return unchanged(person, c.request_id, ResultCode.OK, c.at_ms, **told)
