"""Immutable records of the domain: the person aggregate, commands, events, replies.

Every command carries a client-made request id and the time it was stamped at ingress
(`at_ms`, epoch milliseconds); the core never reads a clock. Event ids derive from the
request id, so a redelivered command can never make a second, different event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clearing.codes import (
    CardColour,
    CardKind,
    CardState,
    InstitutionType,
    InsuranceCategory,
    ResultCode,
)
from clearing.limits import PHARMACY_SWIPES_PER_DAY_DEFAULT, PIN_TRIES_MAX

# ---------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Card:
    card_no: str
    kind: CardKind
    colour: CardColour
    state: CardState
    issued_at_ms: int
    initial_pin: bool = True  # must be changed at a window before paying
    pin_failures: int = 0  # consecutive wrong PINs
    pharmacy_swipes_per_day: int = PHARMACY_SWIPES_PER_DAY_DEFAULT

    @property
    def pin_tries_remaining(self) -> int:
        return max(0, PIN_TRIES_MAX - self.pin_failures)


@dataclass(frozen=True, slots=True)
class SwipeRecord:
    """An approved swipe, kept for reversal, refund and the daily pharmacy count."""

    request_id: str
    card_no: str
    institution_id: str
    institution_type: InstitutionType
    paid_from_account_fen: int
    day: int  # Asia/Shanghai calendar day number (days since 1970-01-01 in UTC+8)
    at_ms: int
    reversed: bool = False
    refunded_fen: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """What the requester is told. Kept per request id, so a repeat gets the same."""

    request_id: str
    result: ResultCode
    version: int = 0  # the person's state version that includes this decision
    amount_fen: int = 0
    paid_from_account_fen: int = 0
    paid_in_cash_fen: int = 0
    balance_fen: int = 0
    pin_tries_remaining: int = 0
    pharmacy_swipes_today: int = 0
    pharmacy_swipes_per_day: int = 0
    card_no: str = ""
    card_state: CardState = CardState.CARD_STATE_UNSPECIFIED
    replayed: bool = False
    at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Person:
    ssn: str
    name: str
    category: InsuranceCategory
    phone: str
    region: str
    created_at_ms: int
    version: int = 0  # events applied
    balance_fen: int = 0
    cards: tuple[Card, ...] = ()
    swipes: tuple[SwipeRecord, ...] = ()  # newest last, bounded
    replies: tuple[Reply, ...] = ()  # newest last, bounded
    credit_sources: tuple[str, ...] = ()  # newest last, bounded

    def card(self, card_no: str) -> Card | None:
        for card in self.cards:
            if card.card_no == card_no:
                return card
        return None

    def reply_to(self, request_id: str) -> Reply | None:
        for reply in reversed(self.replies):
            if reply.request_id == request_id:
                return reply
        return None


# ---------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class Institution:
    institution_id: str
    name: str
    type: InstitutionType
    designated: bool = True


@dataclass(frozen=True, slots=True)
class Policy:
    """Settings of the domain that differ between cities: data, not code."""

    institutions: dict[str, Institution] = field(default_factory=dict)
    # Until the HSM issue lands the gateway cannot verify PINs; swipes then carry
    # PinOutcome.NOT_VERIFIED and this flag says whether that is accepted.
    pin_verification_required: bool = False


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class RegisterPerson:
    request_id: str
    at_ms: int
    ssn: str
    name: str
    category: InsuranceCategory
    phone: str = ""
    region: str = ""


@dataclass(frozen=True, slots=True)
class IssueCard:
    request_id: str
    at_ms: int
    ssn: str
    card_no: str
    kind: CardKind = CardKind.SOCIAL_SECURITY


@dataclass(frozen=True, slots=True)
class CardCommand:
    """A window operation on one card; `op` names it (see core.CARD_TRANSITIONS)."""

    request_id: str
    at_ms: int
    ssn: str
    card_no: str
    op: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CreditAccount:
    request_id: str
    at_ms: int
    ssn: str
    amount_fen: int
    source_id: str


class PinOutcome:
    NOT_VERIFIED = 0  # no HSM on the path yet (see Policy.pin_verification_required)
    CORRECT = 1
    WRONG = 2


@dataclass(frozen=True, slots=True)
class Authorize:
    request_id: str  # terminal id + ":" + trace number
    at_ms: int
    ssn: str
    card_no: str
    institution_id: str
    amount_fen: int
    allow_partial: bool = False
    pin: int = PinOutcome.NOT_VERIFIED


@dataclass(frozen=True, slots=True)
class BalanceInquiry:
    request_id: str
    at_ms: int
    ssn: str
    card_no: str
    institution_id: str


Command = RegisterPerson | IssueCard | CardCommand | CreditAccount | Authorize | BalanceInquiry

# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class PersonRegistered:
    event_id: str
    at_ms: int
    ssn: str
    name: str
    category: InsuranceCategory
    phone: str
    region: str


@dataclass(frozen=True, slots=True)
class CardIssued:
    event_id: str
    at_ms: int
    ssn: str
    card_no: str
    kind: CardKind
    colour: CardColour
    state: CardState


@dataclass(frozen=True, slots=True)
class CardStateChanged:
    event_id: str
    at_ms: int
    ssn: str
    card_no: str
    op: str
    old_state: CardState
    new_state: CardState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PinChanged:
    event_id: str
    at_ms: int
    ssn: str
    card_no: str


@dataclass(frozen=True, slots=True)
class AccountCredited:
    event_id: str
    at_ms: int
    ssn: str
    amount_fen: int
    source_id: str
    balance_after_fen: int


@dataclass(frozen=True, slots=True)
class SwipeApproved:
    event_id: str
    at_ms: int
    ssn: str
    request_id: str
    card_no: str
    institution_id: str
    institution_type: InstitutionType
    amount_fen: int
    paid_from_account_fen: int
    paid_in_cash_fen: int
    balance_after_fen: int
    day: int


@dataclass(frozen=True, slots=True)
class SwipeDeclined:
    event_id: str
    at_ms: int
    ssn: str
    request_id: str
    card_no: str
    institution_id: str
    amount_fen: int
    result: ResultCode
    pin_wrong: bool = False  # counts a PIN failure on the card


Event = (
    PersonRegistered
    | CardIssued
    | CardStateChanged
    | PinChanged
    | AccountCredited
    | SwipeApproved
    | SwipeDeclined
)


@dataclass(frozen=True, slots=True)
class Decision:
    events: tuple[Event, ...]
    reply: Reply
