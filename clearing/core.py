"""The clearing core: decide(person, command, policy) and apply(person, event).

Pure: no I/O, no clock, no randomness; time comes from the command. The stream worker,
the unit tests and the simulator all run these same functions. `handle` is the one
entry point adapters call: decide, apply every event, remember the reply.
"""

from __future__ import annotations

from dataclasses import replace

from clearing import validate
from clearing.codes import (
    COLOUR_OF_CATEGORY,
    DECLINE_OF_CARD_STATE,
    CardColour,
    CardKind,
    CardState,
    InstitutionType,
    ResultCode,
)
from clearing.limits import (
    BALANCE_FEN_MAX,
    CARDS_PER_PERSON_MAX,
    CREDIT_SOURCES_REMEMBERED_MAX,
    DAY_MS,
    PIN_TRIES_MAX,
    REQUEST_ID_MEMORY_MS,
    REQUEST_IDS_REMEMBERED_MAX,
    SHANGHAI_UTC_OFFSET_MS,
    SWIPES_REMEMBERED_MAX,
)
from clearing.model import (
    AccountCredited,
    Authorize,
    BalanceInquiry,
    Card,
    CardCommand,
    CardIssued,
    CardStateChanged,
    Command,
    CreditAccount,
    Decision,
    Event,
    IssueCard,
    Person,
    PersonRegistered,
    PinChanged,
    PinOutcome,
    Policy,
    RegisterPerson,
    Reply,
    SwipeApproved,
    SwipeDeclined,
    SwipeRecord,
)


class InvariantError(AssertionError):
    """A broken invariant of the core: a programmer error, never a user's."""


def shanghai_day(at_ms: int) -> int:
    """The Asia/Shanghai calendar day of an instant, as days since 1970-01-01."""
    return (at_ms + SHANGHAI_UTC_OFFSET_MS) // DAY_MS


# Card operations of the service window: op -> (states it may start from, state it ends in).
# Refusals that have their own code are in CARD_REFUSALS.
CARD_TRANSITIONS: dict[str, tuple[frozenset[CardState], CardState]] = {
    "activate": (frozenset({CardState.ISSUED}), CardState.ACTIVE),
    "report_pre_loss": (
        frozenset({CardState.ISSUED, CardState.ACTIVE, CardState.LOCKED}),
        CardState.PRE_LOST,
    ),
    "confirm_loss": (
        frozenset({CardState.ISSUED, CardState.ACTIVE, CardState.LOCKED, CardState.PRE_LOST}),
        CardState.LOST,
    ),
    "release": (frozenset({CardState.PRE_LOST}), CardState.ACTIVE),
    "freeze": (frozenset({CardState.ISSUED, CardState.ACTIVE, CardState.LOCKED}), CardState.FROZEN),
    "unfreeze": (frozenset({CardState.FROZEN}), CardState.ACTIVE),
    "unlock": (frozenset({CardState.LOCKED}), CardState.ACTIVE),
}
CARD_REFUSALS: dict[tuple[str, CardState], ResultCode] = {
    ("release", CardState.LOST): ResultCode.RELEASE_AFTER_FORMAL_LOSS,
    ("release", CardState.REPLACED): ResultCode.RELEASE_AFTER_REPLACEMENT,
}
PIN_CHANGE_STATES = frozenset({CardState.ISSUED, CardState.ACTIVE})


def _event_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def _reply(
    person: Person | None,
    request_id: str,
    result: ResultCode,
    at_ms: int,
    events: int,
    **fields: object,
) -> Reply:
    version = (person.version if person else 0) + events
    balance = person.balance_fen if person else 0
    base = Reply(
        request_id=request_id, result=result, version=version, balance_fen=balance, at_ms=at_ms
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def _refuse(
    person: Person | None, request_id: str, result: ResultCode, at_ms: int, **fields: object
) -> Decision:
    """A refusal that changes nothing and makes no event."""
    return Decision((), _reply(person, request_id, result, at_ms, 0, **fields))


def _accept(person: Person | None, command: Command, event: Event, **fields: object) -> Decision:
    """A command that succeeds with one event."""
    return Decision(
        (event,), _reply(person, command.request_id, ResultCode.OK, command.at_ms, 1, **fields)
    )


# ---------------------------------------------------------------------------- decide


def decide(person: Person | None, command: Command, policy: Policy) -> Decision:
    if not validate.is_id(command.request_id) or command.at_ms <= 0:
        return _refuse(person, command.request_id, ResultCode.MALFORMED_REQUEST, command.at_ms)
    if not validate.is_ssn(command.ssn):
        return _refuse(person, command.request_id, ResultCode.MALFORMED_REQUEST, command.at_ms)
    if person is not None and not isinstance(command, BalanceInquiry):
        original = person.reply_to(command.request_id)
        if original is not None:
            return Decision((), replace(original, replayed=True))
    match command:
        case Authorize():
            return _decide_authorize(person, command, policy)
        case BalanceInquiry():
            return _decide_balance(person, command, policy)
        case RegisterPerson():
            return _decide_register(person, command)
        case IssueCard():
            return _decide_issue(person, command)
        case CardCommand():
            return _decide_card(person, command)
        case CreditAccount():
            return _decide_credit(person, command)
    raise InvariantError(f"unknown command {type(command).__name__}")


def _decide_register(person: Person | None, c: RegisterPerson) -> Decision:
    if (
        not validate.is_name(c.name)
        or c.category not in COLOUR_OF_CATEGORY
        or not validate.is_phone(c.phone)
        or len(c.region) > 32
    ):
        return _refuse(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if person is not None:
        return _refuse(person, c.request_id, ResultCode.PERSON_EXISTS, c.at_ms)
    event = PersonRegistered(
        _event_id(c.request_id, 0), c.at_ms, c.ssn, c.name, c.category, c.phone, c.region
    )
    return _accept(None, c, event)


def _decide_issue(person: Person | None, c: IssueCard) -> Decision:
    if not validate.is_card_no(c.card_no) or c.kind not in (
        CardKind.SOCIAL_SECURITY,
        CardKind.TEMPORARY,
    ):
        return _refuse(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if person is None:
        return _refuse(person, c.request_id, ResultCode.PERSON_UNKNOWN, c.at_ms)
    if person.card(c.card_no) is not None or len(person.cards) >= CARDS_PER_PERSON_MAX:
        return _refuse(person, c.request_id, ResultCode.CARD_EXISTS, c.at_ms)
    # Issuance rules beyond "the person exists and the number is new" (one valid card at
    # a time, temporary vs social) belong to the clearing-core issue.
    state = CardState.ACTIVE if c.kind == CardKind.TEMPORARY else CardState.ISSUED
    colour = COLOUR_OF_CATEGORY[person.category]
    event = CardIssued(_event_id(c.request_id, 0), c.at_ms, c.ssn, c.card_no, c.kind, colour, state)
    return _accept(person, c, event, card_no=c.card_no, card_state=state)


def _decide_card(person: Person | None, c: CardCommand) -> Decision:
    if not validate.is_card_no(c.card_no) or len(c.reason) > 200:
        return _refuse(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if c.op != "change_pin" and c.op not in CARD_TRANSITIONS:
        return _refuse(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    card = person.card(c.card_no) if person else None
    if person is None or card is None:
        return _refuse(person, c.request_id, ResultCode.CARD_UNKNOWN, c.at_ms)
    if c.op == "change_pin":
        if card.state not in PIN_CHANGE_STATES:
            return _refuse(
                person,
                c.request_id,
                ResultCode.TRANSITION_NOT_ALLOWED,
                c.at_ms,
                card_no=card.card_no,
                card_state=card.state,
            )
        event: Event = PinChanged(_event_id(c.request_id, 0), c.at_ms, c.ssn, c.card_no)
        return _accept(person, c, event, card_no=card.card_no, card_state=card.state)
    allowed_from, to_state = CARD_TRANSITIONS[c.op]
    if card.state not in allowed_from:
        code = CARD_REFUSALS.get((c.op, card.state), ResultCode.TRANSITION_NOT_ALLOWED)
        return _refuse(
            person, c.request_id, code, c.at_ms, card_no=card.card_no, card_state=card.state
        )
    event = CardStateChanged(
        _event_id(c.request_id, 0), c.at_ms, c.ssn, c.card_no, c.op, card.state, to_state, c.reason
    )
    return _accept(person, c, event, card_no=card.card_no, card_state=to_state)


def _decide_credit(person: Person | None, c: CreditAccount) -> Decision:
    if not validate.is_amount_fen(c.amount_fen) or not validate.is_id(c.source_id):
        return _refuse(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if person is None:
        return _refuse(person, c.request_id, ResultCode.PERSON_UNKNOWN, c.at_ms)
    if COLOUR_OF_CATEGORY[person.category] != CardColour.BLUE:
        return _refuse(person, c.request_id, ResultCode.COLOUR_NOT_ALLOWED, c.at_ms)
    if c.source_id in person.credit_sources:  # the allocation line was already applied
        return _refuse(person, c.request_id, ResultCode.OK, c.at_ms)
    balance = person.balance_fen + c.amount_fen
    if balance > BALANCE_FEN_MAX:
        return _refuse(person, c.request_id, ResultCode.AMOUNT_OUT_OF_RANGE, c.at_ms)
    event = AccountCredited(
        _event_id(c.request_id, 0), c.at_ms, c.ssn, c.amount_fen, c.source_id, balance
    )
    return _accept(person, c, event, amount_fen=c.amount_fen, balance_fen=balance)


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


def _decide_authorize(person: Person | None, c: Authorize, policy: Policy) -> Decision:
    if (
        not validate.is_card_no(c.card_no)
        or not validate.is_id(c.institution_id)
        or not validate.is_amount_fen(c.amount_fen)
        or c.pin not in (PinOutcome.NOT_VERIFIED, PinOutcome.CORRECT, PinOutcome.WRONG)
    ):
        return _refuse(
            person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms, amount_fen=c.amount_fen
        )
    institution = policy.institutions.get(c.institution_id)
    card = person.card(c.card_no) if person else None

    def decline(
        code: ResultCode,
        fields: dict[str, object] | None = None,
        *,
        pin_wrong: bool = False,
        lock: bool = False,
    ) -> Decision:
        events: list[Event] = [
            SwipeDeclined(
                _event_id(c.request_id, 0),
                c.at_ms,
                c.ssn,
                c.request_id,
                c.card_no,
                c.institution_id,
                c.amount_fen,
                code,
                pin_wrong,
            )
        ]
        if lock and card is not None:
            events.append(
                CardStateChanged(
                    _event_id(c.request_id, 1),
                    c.at_ms,
                    c.ssn,
                    c.card_no,
                    "lock",
                    card.state,
                    CardState.LOCKED,
                    "PIN tries exceeded",
                )
            )
        counted = len(events) if person is not None else 0
        return Decision(
            tuple(events),
            _reply(
                person,
                c.request_id,
                code,
                c.at_ms,
                counted,
                amount_fen=c.amount_fen,
                card_no=c.card_no,
                **(fields or {}),
            ),
        )

    if institution is None:
        return decline(ResultCode.INSTITUTION_UNKNOWN)
    if not institution.designated:
        return decline(ResultCode.INSTITUTION_NOT_DESIGNATED)
    if person is None or card is None:
        return decline(ResultCode.CARD_UNKNOWN)
    if card.state != CardState.ACTIVE:
        return decline(DECLINE_OF_CARD_STATE[card.state], {"card_state": card.state})
    if card.colour != CardColour.BLUE:  # green and red cards have no personal account
        return decline(ResultCode.COLOUR_NOT_ALLOWED, {"card_state": card.state})
    if card.initial_pin:
        return decline(ResultCode.INITIAL_PIN_NOT_CHANGED, {"card_state": card.state})
    if c.pin == PinOutcome.WRONG or (
        c.pin == PinOutcome.NOT_VERIFIED and policy.pin_verification_required
    ):
        remaining = max(0, PIN_TRIES_MAX - card.pin_failures - 1)
        if remaining == 0:
            return decline(
                ResultCode.PIN_TRIES_EXCEEDED,
                {"card_state": CardState.LOCKED, "pin_tries_remaining": 0},
                pin_wrong=True,
                lock=True,
            )
        return decline(
            ResultCode.PIN_WRONG,
            {"card_state": card.state, "pin_tries_remaining": remaining},
            pin_wrong=True,
        )
    day = shanghai_day(c.at_ms)
    today = pharmacy_swipes_on(person, c.card_no, day)
    at_pharmacy = institution.type == InstitutionType.PHARMACY
    limit_fields: dict[str, object] = {
        "card_state": card.state,
        "pin_tries_remaining": PIN_TRIES_MAX,
        "pharmacy_swipes_today": today,
        "pharmacy_swipes_per_day": card.pharmacy_swipes_per_day,
    }
    if at_pharmacy and today >= card.pharmacy_swipes_per_day:
        return decline(ResultCode.DAILY_PHARMACY_LIMIT_REACHED, limit_fields)
    paid = c.amount_fen
    result = ResultCode.OK
    if person.balance_fen < c.amount_fen:
        if not c.allow_partial or person.balance_fen == 0:
            return decline(ResultCode.INSUFFICIENT_BALANCE, limit_fields)
        paid, result = person.balance_fen, ResultCode.PARTIALLY_APPROVED
    balance_after = person.balance_fen - paid
    event = SwipeApproved(
        _event_id(c.request_id, 0),
        c.at_ms,
        c.ssn,
        c.request_id,
        c.card_no,
        c.institution_id,
        institution.type,
        c.amount_fen,
        paid,
        c.amount_fen - paid,
        balance_after,
        day,
    )
    limit_fields["pharmacy_swipes_today"] = today + (1 if at_pharmacy else 0)
    return Decision(
        (event,),
        _reply(
            person,
            c.request_id,
            result,
            c.at_ms,
            1,
            amount_fen=c.amount_fen,
            paid_from_account_fen=paid,
            paid_in_cash_fen=c.amount_fen - paid,
            balance_fen=balance_after,
            card_no=c.card_no,
            **limit_fields,
        ),
    )


def _decide_balance(person: Person | None, c: BalanceInquiry, policy: Policy) -> Decision:
    if not validate.is_card_no(c.card_no) or not validate.is_id(c.institution_id):
        return _refuse(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    institution = policy.institutions.get(c.institution_id)
    if institution is None:
        return _refuse(person, c.request_id, ResultCode.INSTITUTION_UNKNOWN, c.at_ms)
    if not institution.designated:
        return _refuse(person, c.request_id, ResultCode.INSTITUTION_NOT_DESIGNATED, c.at_ms)
    card = person.card(c.card_no) if person else None
    if person is None or card is None:
        return _refuse(person, c.request_id, ResultCode.CARD_UNKNOWN, c.at_ms)
    if card.state != CardState.ACTIVE:
        return _refuse(
            person,
            c.request_id,
            DECLINE_OF_CARD_STATE[card.state],
            c.at_ms,
            card_no=card.card_no,
            card_state=card.state,
        )
    return _refuse(
        person,
        c.request_id,
        ResultCode.OK,
        c.at_ms,
        card_no=card.card_no,
        card_state=card.state,
        pin_tries_remaining=card.pin_tries_remaining,
    )


# ---------------------------------------------------------------------------- apply


def _with_card(person: Person, card_no: str, **changes: object) -> Person:
    cards = tuple(
        replace(card, **changes) if card.card_no == card_no else card  # type: ignore[arg-type]
        for card in person.cards
    )
    return replace(person, cards=cards)


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
        case CardIssued():
            card = Card(event.card_no, event.kind, event.colour, event.state, event.at_ms)
            return replace(person, cards=(*person.cards, card))
        case CardStateChanged():
            changes: dict[str, object] = {"state": event.new_state}
            if event.op == "unlock":
                changes.update(initial_pin=True, pin_failures=0)
            return _with_card(person, event.card_no, **changes)
        case PinChanged():
            return _with_card(person, event.card_no, initial_pin=False, pin_failures=0)
        case AccountCredited():
            sources = (*person.credit_sources, event.source_id)[-CREDIT_SOURCES_REMEMBERED_MAX:]
            return replace(person, balance_fen=event.balance_after_fen, credit_sources=sources)
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
            )
            swipes = (*person.swipes, record)[-SWIPES_REMEMBERED_MAX:]
            person = replace(person, balance_fen=event.balance_after_fen, swipes=swipes)
            return _with_card(person, event.card_no, pin_failures=0)
        case SwipeDeclined():
            declined_card = person.card(event.card_no)
            if event.pin_wrong and declined_card is not None:
                failures = declined_card.pin_failures + 1
                return _with_card(person, event.card_no, pin_failures=failures)
            return person
    raise InvariantError(f"unknown event {type(event).__name__}")


def remember(person: Person, reply: Reply) -> Person:
    """Keep a reply for repeats of its request id, within the count and time bounds."""
    horizon = reply.at_ms - REQUEST_ID_MEMORY_MS
    kept = tuple(r for r in person.replies if r.at_ms >= horizon)
    return replace(person, replies=(*kept, reply)[-REQUEST_IDS_REMEMBERED_MAX:])


def handle(
    person: Person | None, command: Command, policy: Policy
) -> tuple[Person | None, Decision]:
    """Decide a command, apply its events and remember its reply."""
    decision = decide(person, command, policy)
    if decision.reply.replayed or not decision.events:
        return person, decision
    state = person
    for event in decision.events:
        state = apply(state, event)
    if state is None:
        return None, decision
    if state.version != decision.reply.version:
        raise InvariantError(f"reply version {decision.reply.version} != state {state.version}")
    if state.balance_fen < 0:
        raise InvariantError("negative balance")
    return remember(state, decision.reply), decision
