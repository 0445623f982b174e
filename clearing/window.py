"""The service windows' operations on a person: register, issue, the card state machine,
replacement, credit, the pharmacy limit, the phone, cancel, and enrolment (all of them as
one command). Pure, like the rest of the core; `clearing.core.decide` calls these after
its checks of every command.

The card state machine (`CARD_TRANSITIONS`; a refused step answers with its code in
`CARD_REFUSALS`, else TRANSITION_NOT_ALLOWED)::

    ISSUED --activate--> ACTIVE        (a temporary card is born ACTIVE, lives one year)
    live (ISSUED|ACTIVE|LOCKED|FROZEN) --report_pre_loss--> PRE_LOST (deadline: region)
    PRE_LOST --release | lapse--> the state it came from
    live or PRE_LOST --confirm_loss--> LOST    (a release: RELEASE_AFTER_FORMAL_LOSS)
    PRE_LOST|LOST --apply_replacement--> REPLACED (a release: RELEASE_AFTER_REPLACEMENT)
    REPLACED --issue replacement--> CANCELLED, new card ISSUED (same person, same account)
    live --change card (换卡)--> CANCELLED, new card ISSUED
    ACTIVE --3rd wrong PIN--> LOCKED --unlock--> ACTIVE with the initial PIN
    ISSUED|ACTIVE|LOCKED --freeze--> FROZEN
    FROZEN --unfreeze--> ACTIVE;  FROZEN --another card activated--> CANCELLED
    temporary --social card issued--> SUPERSEDED;  person --cancel--> every card CANCELLED

Pre-loss. Lifetimes are data (medclear/data/pre_loss_policy.csv: region → seconds, hours,
days or working days; working days: clearing/calendar.py). A swipe after the deadline is
decided on the lapsed state even before the timer's expiry command arrives. An expiry for
a different (earlier) pre-loss, or after a formal loss or a release, changes nothing.

Colours. Green and red cards have no personal account: a personal-account payment with
one is COLOUR_NOT_ALLOWED at any institution (not only pharmacies), and a credit to such
a person is refused with the same code.
"""

from __future__ import annotations

from dataclasses import replace

from clearing import validate
from clearing.calendar import pre_loss_deadline_ms
from clearing.codes import (
    COLOUR_OF_CATEGORY,
    CardColour,
    CardKind,
    CardState,
    ResultCode,
)
from clearing.decisions import (
    LIVE_STATES,
    InvariantError,
    Told,
    effective_state,
    event_id,
    state_change,
    unchanged,
    with_events,
)
from clearing.limits import (
    BALANCE_FEN_MAX,
    CARDS_PER_PERSON_MAX,
    PHARMACY_SWIPES_PER_DAY_MAX,
    REASON_CHARS_MAX,
    REGION_CHARS_MAX,
    TEMPORARY_CARD_VALIDITY_MS,
)
from clearing.model import (
    AccountCredited,
    CancelPerson,
    Card,
    CardCommand,
    CardIssued,
    Command,
    CreditAccount,
    Decision,
    EnrolPerson,
    Event,
    ExpirePreLoss,
    IssueCard,
    Person,
    PersonCancelled,
    PersonRegistered,
    PharmacyLimitSet,
    PhoneSet,
    PinChanged,
    Policy,
    RegisterPerson,
    ReplaceCard,
    Reply,
    SetPharmacyLimit,
    SetPhone,
)
from clearing.state import apply

# ---------------------------------------------------------------------------- the card
# state machine of the service window: op -> (states it may start from, state it ends in).
# A refused step answers with CARD_REFUSALS' code for it, else TRANSITION_NOT_ALLOWED.
# report_pre_loss and release keep what the card was (active / locked / frozen) so that
# a release or a lapse restores exactly that.

CARD_TRANSITIONS: dict[str, tuple[frozenset[CardState], CardState]] = {
    "activate": (frozenset({CardState.ISSUED}), CardState.ACTIVE),
    "report_pre_loss": (LIVE_STATES, CardState.PRE_LOST),
    "confirm_loss": (LIVE_STATES | {CardState.PRE_LOST}, CardState.LOST),
    "release": (frozenset({CardState.PRE_LOST}), CardState.ACTIVE),  # → state before
    "apply_replacement": (frozenset({CardState.PRE_LOST, CardState.LOST}), CardState.REPLACED),
    "freeze": (frozenset({CardState.ISSUED, CardState.ACTIVE, CardState.LOCKED}), CardState.FROZEN),
    "unfreeze": (frozenset({CardState.FROZEN}), CardState.ACTIVE),
    "unlock": (frozenset({CardState.LOCKED}), CardState.ACTIVE),
}
CARD_REFUSALS: dict[tuple[str, CardState], ResultCode] = {
    ("release", CardState.LOST): ResultCode.RELEASE_AFTER_FORMAL_LOSS,
    ("release", CardState.REPLACED): ResultCode.RELEASE_AFTER_REPLACEMENT,
    ("release", CardState.CANCELLED): ResultCode.RELEASE_AFTER_REPLACEMENT,
}
PIN_CHANGE_STATES = frozenset({CardState.ISSUED, CardState.ACTIVE})
# A social security card "is valid" (no temporary card may be issued) in these states.
SOCIAL_VALID_STATES = LIVE_STATES | {CardState.PRE_LOST}
# Cards that another card replaces with 换卡 (damaged / data changed).
CHANGEABLE_STATES = LIVE_STATES


def decide_register(person: Person | None, c: RegisterPerson) -> Decision:
    if (
        not validate.is_name(c.name)
        or c.category not in COLOUR_OF_CATEGORY
        or not validate.is_phone(c.phone)
        or len(c.region) > REGION_CHARS_MAX
    ):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if person is not None:
        return unchanged(person, c.request_id, ResultCode.PERSON_EXISTS, c.at_ms)
    event = PersonRegistered(event_id(c, 0), c.at_ms, c.ssn, c.name, c.category, c.phone, c.region)
    return with_events(None, c, [event])


def _live_person(person: Person | None, c: Command) -> Decision | None:
    """The refusal for a window operation on an unknown or cancelled person, if any."""
    if person is None:
        return unchanged(person, c.request_id, ResultCode.PERSON_UNKNOWN, c.at_ms)
    if person.cancelled:
        return unchanged(person, c.request_id, ResultCode.CARD_CANCELLED, c.at_ms)
    return None


def _new_card_events(
    person: Person,
    c: Command,
    card_no: str,
    kind: CardKind,
    index: int,
    replaces: str = "",
    pvv: str = "",
) -> list[Event]:
    """CardIssued, and for a social card the voiding of every valid temporary card. A
    temporary card is born active with its PIN set (DOMAIN.md: no activation, PIN set
    when it is made)."""
    temporary = kind == CardKind.TEMPORARY
    state = CardState.ACTIVE if temporary else CardState.ISSUED
    expires = c.at_ms + TEMPORARY_CARD_VALIDITY_MS if temporary else 0
    events: list[Event] = [
        CardIssued(
            event_id(c, index),
            c.at_ms,
            c.ssn,
            card_no,
            kind,
            COLOUR_OF_CATEGORY[person.category],
            state,
            expires,
            replaces,
            pin_set=temporary,
            pvv=pvv if temporary else "",
        )
    ]
    if kind == CardKind.SOCIAL_SECURITY:
        for card in person.cards:
            if card.kind == CardKind.TEMPORARY and card.state in SOCIAL_VALID_STATES:
                events.append(
                    state_change(
                        c,
                        card,
                        index + len(events),
                        "supersede",
                        CardState.SUPERSEDED,
                        "social card issued",
                    )
                )
    return events


def decide_issue(person: Person | None, c: IssueCard, policy: Policy) -> Decision:
    """A temporary card must come with its PIN (its verification value, when PINs are
    verified through the HSM); a social security card starts with the initial PIN."""
    temporary = c.kind == CardKind.TEMPORARY
    if (
        not validate.is_card_no(c.card_no)
        or c.kind not in (CardKind.SOCIAL_SECURITY, CardKind.TEMPORARY)
        or not validate.is_pvv(c.pvv)
        or (c.pvv and not temporary)
        or (temporary and policy.pin_verification_required and not c.pvv)
    ):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    refusal = _live_person(person, c)
    if refusal is not None or person is None:
        return refusal or unchanged(person, c.request_id, ResultCode.PERSON_UNKNOWN, c.at_ms)
    if person.card(c.card_no) is not None or len(person.cards) >= CARDS_PER_PERSON_MAX:
        return unchanged(person, c.request_id, ResultCode.CARD_EXISTS, c.at_ms)
    social_valid = any(
        card.kind == CardKind.SOCIAL_SECURITY and card.state in SOCIAL_VALID_STATES
        for card in person.cards
    )
    if social_valid:  # one valid card at a time; the social security card wins
        code = (
            ResultCode.TEMPORARY_CARD_WHILE_SOCIAL_VALID
            if c.kind == CardKind.TEMPORARY
            else ResultCode.TRANSITION_NOT_ALLOWED
        )
        return unchanged(person, c.request_id, code, c.at_ms)
    if c.kind == CardKind.TEMPORARY and any(
        card.kind == CardKind.TEMPORARY and effective_state(card, c.at_ms) in LIVE_STATES
        for card in person.cards
    ):
        return unchanged(person, c.request_id, ResultCode.TRANSITION_NOT_ALLOWED, c.at_ms)
    events = _new_card_events(person, c, c.card_no, c.kind, 0, pvv=c.pvv)
    first = events[0]
    assert isinstance(first, CardIssued)
    return with_events(person, c, events, card_no=c.card_no, card_state=first.state)


def decide_card(person: Person | None, c: CardCommand, policy: Policy) -> Decision:
    if (
        not validate.is_card_no(c.card_no)
        or len(c.reason) > REASON_CHARS_MAX
        or not validate.is_pvv(c.pvv)
    ):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if c.op != "change_pin" and c.op not in CARD_TRANSITIONS:
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    card = person.card(c.card_no) if person else None
    if person is None or card is None:
        return unchanged(person, c.request_id, ResultCode.CARD_UNKNOWN, c.at_ms)
    if person.cancelled:
        return unchanged(person, c.request_id, ResultCode.CARD_CANCELLED, c.at_ms)
    state = effective_state(card, c.at_ms)
    told = Told(card_no=card.card_no, card_state=state)
    if c.op == "change_pin":
        if state not in PIN_CHANGE_STATES:
            return unchanged(
                person, c.request_id, ResultCode.TRANSITION_NOT_ALLOWED, c.at_ms, **told
            )
        pin_event = PinChanged(event_id(c, 0), c.at_ms, c.ssn, c.card_no, c.pvv)
        return with_events(person, c, [pin_event], **told)
    allowed_from, to_state = CARD_TRANSITIONS[c.op]
    if state not in allowed_from:
        code = CARD_REFUSALS.get((c.op, state), ResultCode.TRANSITION_NOT_ALLOWED)
        return unchanged(person, c.request_id, code, c.at_ms, **told)
    deadline = 0
    if c.op == "report_pre_loss":
        deadline = pre_loss_deadline_ms(c.at_ms, policy.pre_loss_lifetime(person.region))
    elif c.op == "release":
        to_state = card.state_before_pre_loss
    if card.state == CardState.PRE_LOST and state != CardState.PRE_LOST:
        # the pre-loss has lapsed (no timer recorded it yet): a formal loss or another
        # report starts from the restored state, which the event records as its origin
        card = replace(card, state=state)
    events: list[Event] = [state_change(c, card, 0, c.op, to_state, c.reason, deadline)]
    if c.op == "activate":  # activating a new card unfreezes the account (old cards go)
        for other in person.cards:
            if other.card_no != card.card_no and other.state == CardState.FROZEN:
                events.append(
                    state_change(
                        c,
                        other,
                        len(events),
                        "cancel",
                        CardState.CANCELLED,
                        "new card activated",
                    )
                )
    told["card_state"] = to_state
    return with_events(person, c, events, **told)


def _pre_lost_card(person: Person, c: ExpirePreLoss) -> Card | None:
    """The card an expiry names: by number, or (from the timer, which sees only published
    events and so only a card token) the card whose pre-loss has exactly that deadline."""
    if c.card_no:
        return person.card(c.card_no)
    for card in person.cards:
        if card.state == CardState.PRE_LOST and card.pre_loss_deadline_ms == c.deadline_ms:
            return card
    return None


def decide_expiry(person: Person | None, c: ExpirePreLoss) -> Decision:
    """A pre-loss lapses only if the card is still in that same pre-loss (same deadline)
    and its deadline has passed; after a formal loss, a release or a new report the
    expiry changes nothing and is answered OK without events."""
    if (c.card_no and not validate.is_card_no(c.card_no)) or c.deadline_ms <= 0:
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    card = _pre_lost_card(person, c) if person else None
    if person is not None and card is None and not c.card_no:
        return unchanged(person, c.request_id, ResultCode.OK, c.at_ms)  # nothing left to lapse
    if person is None or card is None:
        return unchanged(person, c.request_id, ResultCode.CARD_UNKNOWN, c.at_ms)
    if (
        card.state != CardState.PRE_LOST
        or card.pre_loss_deadline_ms != c.deadline_ms
        or c.at_ms < c.deadline_ms
    ):
        return unchanged(
            person,
            c.request_id,
            ResultCode.OK,
            c.at_ms,
            card_no=card.card_no,
            card_state=card.state,
        )
    event = state_change(
        c, card, 0, "pre_loss_lapsed", card.state_before_pre_loss, "pre-loss lapsed"
    )
    return with_events(
        person, c, [event], card_no=card.card_no, card_state=card.state_before_pre_loss
    )


def decide_replace(person: Person | None, c: ReplaceCard) -> Decision:
    if (
        not validate.is_card_no(c.old_card_no)
        or not validate.is_card_no(c.new_card_no)
        or c.mode not in ("replacement", "change")
    ):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    old = person.card(c.old_card_no) if person else None
    if person is None or old is None:
        return unchanged(person, c.request_id, ResultCode.CARD_UNKNOWN, c.at_ms)
    if person.cancelled:
        return unchanged(person, c.request_id, ResultCode.CARD_CANCELLED, c.at_ms)
    if person.card(c.new_card_no) is not None or len(person.cards) >= CARDS_PER_PERSON_MAX:
        return unchanged(person, c.request_id, ResultCode.CARD_EXISTS, c.at_ms)
    state = effective_state(old, c.at_ms)
    allowed = {CardState.REPLACED} if c.mode == "replacement" else CHANGEABLE_STATES
    if state not in allowed or old.kind != CardKind.SOCIAL_SECURITY:
        return unchanged(
            person,
            c.request_id,
            ResultCode.TRANSITION_NOT_ALLOWED,
            c.at_ms,
            card_no=old.card_no,
            card_state=state,
        )
    reason = f"replaced by {validate.mask_card(c.new_card_no)}"
    events: list[Event] = [state_change(c, old, 0, "cancel", CardState.CANCELLED, reason)]
    issued = _new_card_events(
        replace(person, cards=()),
        c,
        c.new_card_no,
        CardKind.SOCIAL_SECURITY,
        1,
        replaces=old.card_no,
    )
    return with_events(
        person, c, events + issued, card_no=c.new_card_no, card_state=CardState.ISSUED
    )


def decide_credit(person: Person | None, c: CreditAccount) -> Decision:
    if not validate.is_amount_fen(c.amount_fen) or not validate.is_id(c.source_id):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    refusal = _live_person(person, c)
    if refusal is not None or person is None:
        return refusal or unchanged(person, c.request_id, ResultCode.PERSON_UNKNOWN, c.at_ms)
    if COLOUR_OF_CATEGORY[person.category] != CardColour.BLUE:
        return unchanged(person, c.request_id, ResultCode.COLOUR_NOT_ALLOWED, c.at_ms)
    if any(r.source_id == c.source_id for r in person.credits):  # already applied
        return unchanged(person, c.request_id, ResultCode.OK, c.at_ms)
    balance = person.balance_fen + c.amount_fen
    if balance > BALANCE_FEN_MAX:
        return unchanged(person, c.request_id, ResultCode.AMOUNT_OUT_OF_RANGE, c.at_ms)
    event = AccountCredited(event_id(c, 0), c.at_ms, c.ssn, c.amount_fen, c.source_id, balance)
    return with_events(person, c, [event], amount_fen=c.amount_fen, balance_fen=balance)


def decide_limit(person: Person | None, c: SetPharmacyLimit) -> Decision:
    if not validate.is_card_no(c.card_no) or not 0 <= c.swipes_per_day <= (
        PHARMACY_SWIPES_PER_DAY_MAX
    ):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    card = person.card(c.card_no) if person else None
    if person is None or card is None:
        return unchanged(person, c.request_id, ResultCode.CARD_UNKNOWN, c.at_ms)
    event = PharmacyLimitSet(event_id(c, 0), c.at_ms, c.ssn, c.card_no, c.swipes_per_day)
    return with_events(
        person,
        c,
        [event],
        card_no=c.card_no,
        card_state=card.state,
        pharmacy_swipes_per_day=c.swipes_per_day,
    )


def decide_phone(person: Person | None, c: SetPhone) -> Decision:
    if not validate.is_phone(c.phone):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    refusal = _live_person(person, c)
    if refusal is not None or person is None:
        return refusal or unchanged(person, c.request_id, ResultCode.PERSON_UNKNOWN, c.at_ms)
    return with_events(person, c, [PhoneSet(event_id(c, 0), c.at_ms, c.ssn, c.phone)])


def decide_cancel(person: Person | None, c: CancelPerson) -> Decision:
    if not c.reason or len(c.reason) > REASON_CHARS_MAX:
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    refusal = _live_person(person, c)
    if refusal is not None or person is None:
        return refusal or unchanged(person, c.request_id, ResultCode.PERSON_UNKNOWN, c.at_ms)
    events: list[Event] = [
        state_change(c, card, i, "cancel", CardState.CANCELLED, c.reason)
        for i, card in enumerate(
            card
            for card in person.cards
            if card.state not in (CardState.CANCELLED, CardState.SUPERSEDED)
        )
    ]
    events.append(PersonCancelled(event_id(c, len(events)), c.at_ms, c.ssn, c.reason))
    return with_events(person, c, events)


def enrolment_fault(c: EnrolPerson) -> str | None:
    """The first field of an enrolment that its deciders refuse as malformed, named for the
    person at the window (None when no field is). Only words: the decision stays with
    `decide`, which refuses the same fields."""
    faults = (
        (not validate.is_name(c.name), "name"),
        (c.category not in COLOUR_OF_CATEGORY, "category"),
        (not validate.is_phone(c.phone), "phone: 11 digits from 13 to 19, or none"),
        (len(c.region) > REGION_CHARS_MAX, f"region: at most {REGION_CHARS_MAX} characters"),
        (not validate.is_card_no(c.card_no), "card_no"),
        (c.kind != CardKind.SOCIAL_SECURITY, "kind: enrolment makes a social security card"),
        (not validate.is_pvv(c.pvv), "pin_verification_value"),
        (c.opening_balance_fen < 0, "opening_balance_fen: not below 0"),
        (
            c.opening_balance_fen > 0 and not validate.is_amount_fen(c.opening_balance_fen),
            "opening_balance_fen",
        ),
        (c.opening_balance_fen > 0 and not validate.is_id(c.source_id), "source_id"),
    )
    return next((field for fault, field in faults if fault), None)


def new_person_enrolment(c: EnrolPerson) -> ResultCode:
    """What `decide` answers an enrolment of a person not yet registered, without deciding
    it (no person is built): the card registry's check before it asks the HSM. Equal to
    decide(None, c, policy).reply.result for every input (tests/unit/test_enrol.py): the
    malformed fields, then the opening credit's rule that only a blue card has an
    account (a new person's balance is the credit itself: never above BALANCE_FEN_MAX)."""
    well_formed = (
        validate.is_id(c.request_id)
        and c.at_ms > 0
        and validate.is_ssn(c.ssn)
        and enrolment_fault(c) is None
    )
    if not well_formed:
        return ResultCode.MALFORMED_REQUEST
    if c.opening_balance_fen > 0 and COLOUR_OF_CATEGORY[c.category] != CardColour.BLUE:
        return ResultCode.COLOUR_NOT_ALLOWED
    return ResultCode.OK


def _enrolment_steps(c: EnrolPerson) -> list[Command]:
    """The window commands an enrolment stands for, in the order they are decided."""
    steps: list[Command] = [
        RegisterPerson(c.request_id, c.at_ms, c.ssn, c.name, c.category, c.phone, c.region),
        IssueCard(c.request_id, c.at_ms, c.ssn, c.card_no, c.kind),
        CardCommand(c.request_id, c.at_ms, c.ssn, c.card_no, "activate"),
        CardCommand(c.request_id, c.at_ms, c.ssn, c.card_no, "change_pin", pvv=c.pvv),
    ]
    if c.opening_balance_fen > 0:
        steps.append(
            CreditAccount(c.request_id, c.at_ms, c.ssn, c.opening_balance_fen, c.source_id)
        )
    return steps


def decide_enrol(person: Person | None, c: EnrolPerson, policy: Policy) -> Decision:
    """Register → issue → activate → change the initial PIN → credit the opening balance,
    each step decided by its own decider on the person the earlier steps left. All or
    nothing: the first refused step's code, and no event at all. The events are those the
    separate commands make, numbered on through this command's id (`#0`, `#1`, …)."""
    if c.kind != CardKind.SOCIAL_SECURITY or c.opening_balance_fen < 0:
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    state = person
    events: list[Event] = []
    reply: Reply | None = None
    for step in _enrolment_steps(c):
        match step:
            case RegisterPerson():
                decision = decide_register(state, step)
            case IssueCard():
                decision = decide_issue(state, step, policy)
            case CardCommand():
                decision = decide_card(state, step, policy)
            case CreditAccount():
                decision = decide_credit(state, step)
            case _:
                raise InvariantError(f"no enrolment step {type(step).__name__}")
        if decision.reply.result != ResultCode.OK:
            return unchanged(person, c.request_id, decision.reply.result, c.at_ms)
        if not decision.events:  # every step of a new person's enrolment changes it
            raise InvariantError(f"enrolment step {type(step).__name__} made no event")
        for event in decision.events:
            state = apply(state, event)
            events.append(replace(event, event_id=event_id(c, len(events))))
        reply = decision.reply
    card = state.card(c.card_no) if state is not None else None
    if reply is None or card is None:
        raise InvariantError("an enrolment without a card")
    return Decision(tuple(events), replace(reply, card_no=card.card_no, card_state=card.state))
