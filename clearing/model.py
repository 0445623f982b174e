"""Immutable records of the domain: the person aggregate, commands, events, replies.

Every command carries a client-made request id and the time it was stamped at ingress
(`at_ms`, epoch milliseconds); the core never reads a clock. Event ids derive from the
request id, so a redelivered command can never make a second, different event.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

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
    pvv: str = ""  # PIN verification value (hex) from the HSM; "" until a PIN is set there
    expires_at_ms: int = 0  # temporary cards: one year after issue; 0: no expiry
    pre_loss_deadline_ms: int = 0  # while PRE_LOST: when the pre-loss lapses
    state_before_pre_loss: CardState = CardState.ACTIVE  # what a release or lapse restores

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
    amount_fen: int = 0  # what the terminal asked (account + cash)


@dataclass(frozen=True, slots=True)
class CreditRecord:
    """An allocation into the account: kept for the records and for idempotency."""

    source_id: str
    amount_fen: int
    at_ms: int


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
    snapshot: Person | None = None  # QueryPerson only; never remembered


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
    credits: tuple[CreditRecord, ...] = ()  # allocations (拨付), newest last, bounded
    cancelled: bool = False  # death / deregistration: terminal

    def swipe(self, request_id: str) -> SwipeRecord | None:
        for record in reversed(self.swipes):
            if record.request_id == request_id:
                return record
        return None

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


class LifetimeUnit:
    SECONDS = "seconds"  # fault drills and tests; no region uses it
    HOURS = "hours"
    DAYS = "days"  # calendar days
    WORKING_DAYS = "working_days"  # China's official calendar, adjusted workdays included


@dataclass(frozen=True, slots=True)
class PreLossLifetime:
    """How long a pre-loss report holds before it lapses, in one region."""

    amount: int
    unit: str  # a LifetimeUnit value


DEFAULT_PRE_LOSS_LIFETIME = PreLossLifetime(3, LifetimeUnit.WORKING_DAYS)


@dataclass(frozen=True, slots=True)
class Policy:
    """Settings of the domain that differ between cities: data, not code."""

    institutions: dict[str, Institution] = field(default_factory=dict)
    pre_loss_lifetimes: dict[str, PreLossLifetime] = field(default_factory=dict)  # by region
    # Until the HSM issue lands the gateway cannot verify PINs; swipes then carry
    # PinOutcome.NOT_VERIFIED and this flag says whether that is accepted.
    pin_verification_required: bool = False

    def pre_loss_lifetime(self, region: str) -> PreLossLifetime:
        return self.pre_loss_lifetimes.get(region, DEFAULT_PRE_LOSS_LIFETIME)


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
    # A temporary card's PIN is set when it is made: its verification value from the HSM
    # ("" without terminal security). A social security card starts with the initial PIN.
    pvv: str = ""


@dataclass(frozen=True, slots=True)
class CardCommand:
    """A window operation on one card; `op` names it (see core.CARD_TRANSITIONS)."""

    request_id: str
    at_ms: int
    ssn: str
    card_no: str
    op: str
    reason: str = ""
    pvv: str = ""  # change_pin: the new PIN's verification value from the HSM


@dataclass(frozen=True, slots=True)
class CreditAccount:
    request_id: str
    at_ms: int
    ssn: str
    amount_fen: int
    source_id: str


class PinOutcome(IntEnum):
    """What the PIN check said of a swipe's or a balance enquiry's PIN block."""

    NOT_VERIFIED = 0  # no PIN check on the path (see Policy.pin_verification_required)
    CORRECT = 1
    WRONG = 2
    INVALID_BLOCK = 3  # the PIN block is malformed: refused, no try counted
    UNAVAILABLE = 4  # the HSM did not answer in time: nothing is decided (UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class Authorize:
    request_id: str  # terminal id + ":" + trace number
    at_ms: int
    ssn: str
    card_no: str
    institution_id: str
    amount_fen: int
    allow_partial: bool = False
    pin: PinOutcome = PinOutcome.NOT_VERIFIED
    terminal_id: str = ""  # whose PIN key encrypted pin_block
    pin_block: str = ""  # hex, ISO 9564 under the terminal's PIN key; checked via the HSM


@dataclass(frozen=True, slots=True)
class BalanceInquiry:
    """A balance is personal data: it is told only for a correct PIN, and a wrong one
    counts towards the lock as at a swipe."""

    request_id: str
    at_ms: int
    ssn: str
    card_no: str
    institution_id: str
    pin: PinOutcome = PinOutcome.NOT_VERIFIED
    terminal_id: str = ""  # whose PIN key encrypted pin_block
    pin_block: str = ""  # hex, ISO 9564 under the terminal's PIN key; checked via the HSM


def checked(command: Authorize | BalanceInquiry, pin: PinOutcome) -> Authorize | BalanceInquiry:
    """A swipe or an enquiry with the PIN check's outcome, as the core decides it (the
    worker's check against the card; the gateway's of the block's form for a card no one
    holds). Before it, `pin` is NOT_VERIFIED: what a command carries on the topic."""
    return replace(command, pin=pin)


@dataclass(frozen=True, slots=True)
class Reverse:
    """Undo a swipe (冲正) by its request id; answered whatever the original's fate."""

    request_id: str
    at_ms: int
    ssn: str
    original_request_id: str
    card_no: str
    amount_fen: int = 0  # 0: not checked; else must equal the original amount


@dataclass(frozen=True, slots=True)
class Refund:
    """Return money for a completed swipe (退费), at most what it paid from the account."""

    request_id: str
    at_ms: int
    ssn: str
    original_request_id: str
    card_no: str
    amount_fen: int


@dataclass(frozen=True, slots=True)
class ExpirePreLoss:
    """Sent by the pre-loss timer job when a deadline passes; decided like any command."""

    request_id: str
    at_ms: int
    ssn: str
    card_no: str  # "" when the timer only knows the card's token: matched by deadline
    deadline_ms: int
    card_ref: str = ""


@dataclass(frozen=True, slots=True)
class ReplaceCard:
    """补卡 (mode "replacement", after ApplyReplacement) or 换卡 (mode "change")."""

    request_id: str
    at_ms: int
    ssn: str
    old_card_no: str
    new_card_no: str
    mode: str = "replacement"


@dataclass(frozen=True, slots=True)
class SetPharmacyLimit:
    request_id: str
    at_ms: int
    ssn: str
    card_no: str
    swipes_per_day: int


@dataclass(frozen=True, slots=True)
class SetPhone:
    request_id: str
    at_ms: int
    ssn: str
    phone: str


@dataclass(frozen=True, slots=True)
class CancelPerson:
    request_id: str
    at_ms: int
    ssn: str
    reason: str


@dataclass(frozen=True, slots=True)
class EnrolPerson:
    """Bulk enrolment: what RegisterPerson, IssueCard, activate, change_pin and (for an
    opening balance) CreditAccount carry, decided as one command, all or nothing."""

    request_id: str
    at_ms: int
    ssn: str
    name: str
    category: InsuranceCategory
    phone: str
    region: str
    card_no: str
    kind: CardKind = CardKind.SOCIAL_SECURITY  # only a social security card is enrolled
    pvv: str = ""  # the PIN's verification value from the HSM; "" without terminal security
    opening_balance_fen: int = 0  # 0: no opening credit
    source_id: str = ""  # the opening credit's allocation source (needed when it is > 0)


@dataclass(frozen=True, slots=True)
class QueryPerson:
    request_id: str
    at_ms: int
    ssn: str


Command = (
    RegisterPerson
    | IssueCard
    | CardCommand
    | CreditAccount
    | Authorize
    | BalanceInquiry
    | Reverse
    | Refund
    | ExpirePreLoss
    | ReplaceCard
    | SetPharmacyLimit
    | SetPhone
    | CancelPerson
    | EnrolPerson
    | QueryPerson
)
# Commands that are never answered from a remembered reply (a lookup is always fresh).
READ_ONLY_COMMANDS = (QueryPerson,)

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
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy
    name_masked: str = ""  # family name only: set on the published copy
    phone_masked: str = ""  # 138****5678: set on the published copy
    sealed: str = ""  # name and phone, encrypted for the sms job: set on the published copy


@dataclass(frozen=True, slots=True)
class CardIssued:
    event_id: str
    at_ms: int
    ssn: str
    card_no: str
    kind: CardKind
    colour: CardColour
    state: CardState
    expires_at_ms: int = 0
    replaces_card_no: str = ""
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    replaces_card_ref: str = ""
    pin_set: bool = False  # a temporary card: its PIN was set when it was made
    pvv: str = ""  # ... and its verification value ("" without terminal security)
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


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
    deadline_ms: int = 0  # report_pre_loss: when it lapses
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy
    sealed: str = ""  # a pre-loss report: the ssn, encrypted for the pre-loss timer


@dataclass(frozen=True, slots=True)
class PinChanged:
    event_id: str
    at_ms: int
    ssn: str
    card_no: str
    pvv: str = ""
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


@dataclass(frozen=True, slots=True)
class AccountCredited:
    event_id: str
    at_ms: int
    ssn: str
    amount_fen: int
    source_id: str
    balance_after_fen: int
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


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
    terminal_id: str = ""  # where the card was presented (abnormal-use detection)
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


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
    terminal_id: str = ""  # where the card was presented (abnormal-use detection)
    pin_verified: bool = False  # the PIN was right: the count of wrong ones starts again
    inquiry: bool = False  # a balance enquiry (amount 0), not a payment
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


@dataclass(frozen=True, slots=True)
class SwipeReversed:
    event_id: str
    at_ms: int
    ssn: str
    request_id: str
    original_request_id: str
    card_no: str
    institution_id: str
    amount_fen: int  # returned to the account
    balance_after_fen: int
    original_day: int  # the Shanghai day of the original swipe (settlement)
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


@dataclass(frozen=True, slots=True)
class ReversalUnmatched:
    """A reversal of a swipe this person never had approved: answered, and remembered so a
    late original with that request id is refused rather than approved."""

    event_id: str
    at_ms: int
    ssn: str
    request_id: str
    original_request_id: str
    card_no: str
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


@dataclass(frozen=True, slots=True)
class Refunded:
    event_id: str
    at_ms: int
    ssn: str
    request_id: str
    original_request_id: str
    card_no: str
    institution_id: str
    amount_fen: int
    balance_after_fen: int
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


@dataclass(frozen=True, slots=True)
class PinTriesReset:
    """A right PIN at a balance enquiry after wrong ones: the consecutive wrong PINs that
    lock a card are counted from zero again (a swipe records it in its own event)."""

    event_id: str
    at_ms: int
    ssn: str
    card_no: str
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


@dataclass(frozen=True, slots=True)
class PharmacyLimitSet:
    event_id: str
    at_ms: int
    ssn: str
    card_no: str
    swipes_per_day: int
    card_ref: str = ""  # keyed hash of card_no: set on the published copy
    card_masked: str = ""  # last 4 only: set on the published copy
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


@dataclass(frozen=True, slots=True)
class PhoneSet:
    event_id: str
    at_ms: int
    ssn: str
    phone: str
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy
    phone_masked: str = ""  # 138****5678: set on the published copy
    sealed: str = ""  # the phone, encrypted for the sms job: set on the published copy


@dataclass(frozen=True, slots=True)
class PersonCancelled:
    event_id: str
    at_ms: int
    ssn: str
    reason: str
    person_ref: str = ""  # keyed hash of the ssn: set on the published copy
    ssn_masked: str = ""  # region and last 4 only: set on the published copy


Event = (
    PersonRegistered
    | CardIssued
    | CardStateChanged
    | PinChanged
    | AccountCredited
    | SwipeApproved
    | SwipeDeclined
    | SwipeReversed
    | ReversalUnmatched
    | Refunded
    | PinTriesReset
    | PharmacyLimitSet
    | PhoneSet
    | PersonCancelled
)


@dataclass(frozen=True, slots=True)
class Decision:
    events: tuple[Event, ...]
    reply: Reply
