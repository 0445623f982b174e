"""The clearing core: handle(person, command, policy) → (person', decision).

Pure: no I/O, no clock, no randomness. The stream worker, the unit tests and the
simulator all run these same functions. `handle` is the one entry point adapters call:
decide, apply every event, check the invariants (the reply's version is the state's,
the balance is ≥ 0), remember the reply.

Every command: a malformed request id or social security number is refused first, then a
repeat of a remembered request id is answered (below). Swipes and balance enquiries are
then decided by `clearing.pos`, one ordered list of checks in result-code order (the
lowest number wins); reversals and refunds by `clearing.returns`.

Repeats. A command that made events has its reply remembered, per person, at most 64
replies for at most 7 days; a repeat of its request id gets that reply with
`replayed = true` and makes no event. A refusal that changes nothing (malformed, unknown
person) is not remembered: deciding it again gives the same answer. Every bound is a
named constant in clearing/limits.py (replies remembered, swipes kept, PIN tries, the
amount range).

Time and event ids. Time is the command's `at_ms`, stamped once at ingress. The calendar
day is Asia/Shanghai (UTC+8 all year, `limits.SHANGHAI_UTC_OFFSET_MS`), so the daily
pharmacy limit resets at Beijing midnight. Event ids are `<request_id>@<at_ms>#<n>`: a
redelivered command (the same bytes) decided again yields the same ids, which every sink
dedupes; two commands that share a request id (a terminal's trace numbers wrap around)
never share an event id.

Where each rule is: swipes, balance enquiries, PINs and the daily pharmacy limit in
`clearing.pos`; reversals and refunds in `clearing.returns`; the service windows' operations
(the card state machine, pre-loss, colours, enrolment) in `clearing.window`; what each
event does to a person in `clearing.state`.

PINs. The core is told the PIN check's outcome (CORRECT, WRONG or INVALID_BLOCK from the
HSM; NOT_VERIFIED, accepted only while `Policy.pin_verification_required` is false) and
owns the try counter and the lock.
- A balance is personal data: an enquiry needs the right PIN. A wrong one is logged
  (`SwipeDeclined`, `inquiry`) and counts towards the lock; a repeat of its request id is
  answered from memory, so it counts once.
- A right PIN restarts the count of consecutive wrong ones: an approved swipe, a swipe
  declined after its PIN check (for the amount or the limit), `PinTriesReset` at an
  enquiry.
- A declined swipe tells no balance before its PIN check.
- A temporary card is made with its PIN (`IssueCard.pvv`, from the HSM) and is active at
  once; without one, when PINs are verified, it is not made.
"""

from __future__ import annotations

from dataclasses import replace

from clearing import pos, returns, validate, window
from clearing.calendar import shanghai_day
from clearing.codes import ResultCode
from clearing.decisions import (
    InvariantError,
    effective_state,
    unchanged,
)
from clearing.model import (
    READ_ONLY_COMMANDS,
    Authorize,
    BalanceInquiry,
    CancelPerson,
    CardCommand,
    Command,
    CreditAccount,
    Decision,
    EnrolPerson,
    ExpirePreLoss,
    IssueCard,
    Person,
    Policy,
    QueryPerson,
    Refund,
    RegisterPerson,
    ReplaceCard,
    Reverse,
    SetPharmacyLimit,
    SetPhone,
)
from clearing.state import apply, remember
from clearing.window import CARD_TRANSITIONS, enrolment_fault, new_person_enrolment

__all__ = [
    "CARD_TRANSITIONS",
    "InvariantError",
    "apply",
    "decide",
    "effective_state",
    "enrolment_fault",
    "handle",
    "new_person_enrolment",
    "pharmacy_swipes_on",
    "shanghai_day",
]
pharmacy_swipes_on = pos.pharmacy_swipes_on


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


# ---------------------------------------------------------------------------- decide


def decide(person: Person | None, command: Command, policy: Policy) -> Decision:
    """The decision on `command` for `person` (None: no such person yet): the checks of
    every command, a repeat answered from memory, then the command's own decider."""
    if not validate.is_id(command.request_id) or command.at_ms <= 0:
        return unchanged(person, command.request_id, ResultCode.MALFORMED_REQUEST, command.at_ms)
    if not validate.is_ssn(command.ssn):
        return unchanged(person, command.request_id, ResultCode.MALFORMED_REQUEST, command.at_ms)
    if person is not None and not isinstance(command, READ_ONLY_COMMANDS):
        original = person.reply_to(command.request_id)
        if original is not None:
            return Decision((), replace(original, replayed=True))
    match command:
        case Authorize():
            return pos.decide_authorize(person, command, policy)
        case Reverse():
            return returns.decide_reverse(person, command)
        case Refund():
            return returns.decide_refund(person, command)
        case BalanceInquiry():
            return pos.decide_balance(person, command, policy)
        case QueryPerson():
            if person is None:
                return unchanged(None, command.request_id, ResultCode.PERSON_UNKNOWN, command.at_ms)
            return unchanged(
                person, command.request_id, ResultCode.OK, command.at_ms, snapshot=person
            )
        case RegisterPerson():
            return window.decide_register(person, command)
        case IssueCard():
            return window.decide_issue(person, command, policy)
        case CardCommand():
            return window.decide_card(person, command, policy)
        case ExpirePreLoss():
            return window.decide_expiry(person, command)
        case ReplaceCard():
            return window.decide_replace(person, command)
        case CreditAccount():
            return window.decide_credit(person, command)
        case SetPharmacyLimit():
            return window.decide_limit(person, command)
        case SetPhone():
            return window.decide_phone(person, command)
        case CancelPerson():
            return window.decide_cancel(person, command)
        case EnrolPerson():
            return window.decide_enrol(person, command, policy)
    raise InvariantError(f"unknown command {type(command).__name__}")
