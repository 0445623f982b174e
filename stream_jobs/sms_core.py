"""The consumption SMS, decided purely: which published event gets which text, to whom.

The feature second-generation cards lost: an SMS in Chinese for every approved swipe,
reversal and refund; for card-status changes (pre-loss, formal loss, release, lapse,
replacement applied, lock after the third wrong PIN, unlock, freeze, a replacement card
issued); and an alert when a lost, locked, frozen or cancelled card is tried.

`decide(person_sms, event, context, now_ms)` → the person's SMS state, an outcome and the
SMS to send. No I/O and no clock: the adapter (stream_jobs/sms.py) passes the wall-clock
time in (`now_ms`, used for one thing only: not sending SMS about events older than
SMS_MAX_AGE_MS), and everything else follows from the events themselves, so a
redelivered event is decided the same way again.

Texts come from stream_jobs/templates/sms.toml (every placeholder is checked when the
file is loaded), with the card's last 4 from `card_masked` (never the number), Beijing
time (`11月22日10:31`), yuan from integer fen, and the institution's name from the policy
file.

Limits (named constants; the rate limits go by event time, so a redelivery is decided
the same way):
- one refused-swipe alert per person per 10 min: a stolen card tried twenty times sends
  one SMS;
- at most 30 SMS per person per hour (card-status changes exempt);
- no SMS for an event more than 24 h old when seen: reading `events` from the start
  sends no history;
- 64 settled event ids remembered per person.

Identity and state. An SMS is identified by its event's id. Per person (keyed by the
person token, in the partition of the person's events) the job keeps a `PersonSms`: the
phone book entry (from PersonRegistered / PhoneSet / PersonCancelled), the phone kept as
the event sealed it and opened only to address an SMS; the ids of the events whose SMS is
settled (sent, refused by the SMSC for good, or suppressed); the ids in flight (handed to
the SMSC, no answer recorded yet); and what the rate limits need. The model has no
opt-out flag, so an empty phone means no SMS (opting out is SetPhone with "").
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from clearing.codes import ResultCode
from clearing.limits import SHANGHAI_UTC_OFFSET_MS
from clearing.model import (
    CardIssued,
    CardStateChanged,
    Event,
    PersonCancelled,
    PersonRegistered,
    PhoneSet,
    Refunded,
    SwipeApproved,
    SwipeDeclined,
    SwipeReversed,
)
from clearing.money import format_yuan
from clearing.redact import Sealer
from clearing.validate import mask_phone
from stream_jobs.errors import StreamJobError

MINUTE_MS = 60_000
SMS_MAX_AGE_MS = 24 * 60 * MINUTE_MS  # older events (a replay from the topic's start) send none
ALERT_INTERVAL_MS = 10 * MINUTE_MS  # refused-swipe alerts: one per person per interval
SENDS_WINDOW_MS = 60 * MINUTE_MS  # flood guard: at most SENDS_PER_WINDOW_MAX ...
SENDS_PER_WINDOW_MAX = 30  # ... SMS per person per window (card-status changes exempt)
SETTLED_IDS_REMEMBERED_MAX = 64  # event ids remembered per person against redelivery
IN_FLIGHT_IDS_MAX = 64  # a person's SMS handed to the SMSC and not yet answered
TEXT_CHARS_MAX = 670  # 10 UCS2 parts of 67 characters
COUNTRY_CODE = "86"
# the events `decide` reads: the phone book's and those `render` may write an SMS for; any
# other leaves a person's SMS state as it was and sends nothing
EVENTS_READ = (
    PersonRegistered,
    PhoneSet,
    PersonCancelled,
    SwipeApproved,
    SwipeReversed,
    Refunded,
    CardStateChanged,
    CardIssued,
    SwipeDeclined,
)
MOBILE = re.compile(r"^1[3-9][0-9]{9}$")  # mainland China mobile number, 11 digits
RECEIPT = re.compile(r"\bid:(?P<id>\S+).*?\bstat:(?P<stat>[A-Z]+)", re.DOTALL)


class TemplateError(StreamJobError, ValueError):
    """A template file that cannot be used; the message names the entry."""


class Kind(StrEnum):
    CONSUMPTION = "consumption"
    REVERSAL = "reversal"
    REFUND = "refund"
    CARD_STATE = "card_state"
    ALERT = "alert"  # a refused swipe on a lost / locked / frozen / cancelled card


class Outcome(StrEnum):
    SEND = "send"
    RESEND_UNCERTAIN = "resend_uncertain"  # was in flight when the job stopped: sent again
    DUPLICATE = "duplicate"  # settled before: nothing to do
    NOT_NOTIFIABLE = "not_notifiable"  # no SMS for this kind of event
    NO_PHONE = "no_phone"  # no (valid) phone, opted out, or person cancelled
    STALE = "stale"  # older than SMS_MAX_AGE_MS when seen
    RATE_LIMITED = "rate_limited"


PLACEHOLDERS = ("card", "time", "institution", "amount", "cash", "balance", "deadline")


@dataclass(frozen=True, slots=True)
class Templates:
    signature: str
    swipe: Mapping[str, str]  # approved, approved_with_cash, reversed, refunded
    card: Mapping[str, str]  # by CardStateChanged.op
    card_issued: Mapping[str, str]  # replacement
    decline: Mapping[ResultCode, str]  # cardholder alerts


SWIPE_KEYS = ("approved", "approved_with_cash", "reversed", "refunded")


def parse_templates(text: str) -> Templates:
    """Templates from TOML text (see stream_jobs/templates/sms.toml), every entry checked
    by rendering it with sample values: an unknown placeholder is a TemplateError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"not TOML: {exc}") from exc
    signature = data.get("signature", "")
    if not isinstance(signature, str):
        raise TemplateError("signature must be a string")

    def table(name: str) -> dict[str, str]:
        section = data.get(name, {})
        if not isinstance(section, dict):
            raise TemplateError(f"[{name}] must be a table")
        for key, value in section.items():
            if not isinstance(value, str) or not value:
                raise TemplateError(f"[{name}] {key} must be a non-empty string")
            _check(f"[{name}] {key}", signature + value)
        return dict(section)

    swipe = table("swipe")
    missing = [key for key in SWIPE_KEYS if key not in swipe]
    if missing:
        raise TemplateError(f"[swipe] lacks {', '.join(missing)}")
    decline: dict[ResultCode, str] = {}
    for name, template in table("decline").items():
        if name not in ResultCode.__members__:
            raise TemplateError(f"[decline] {name} is not a clearing.codes.ResultCode name")
        decline[ResultCode[name]] = template
    return Templates(signature, swipe, table("card"), table("card_issued"), decline)


def _check(where: str, template: str) -> None:
    sample = dict.fromkeys(PLACEHOLDERS, "0")
    try:
        rendered = template.format_map(sample)
    except (KeyError, IndexError, ValueError) as exc:
        raise TemplateError(f"{where}: bad placeholder {exc}") from exc
    if len(rendered) > TEXT_CHARS_MAX // 2:
        raise TemplateError(f"{where}: longer than {TEXT_CHARS_MAX // 2} characters")


# ---------------------------------------------------------------------------- rendering


def beijing_time(at_ms: int) -> str:
    """'11月22日10:31': month and day without leading zeros, as Chinese SMS write them."""
    moment = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=at_ms + SHANGHAI_UTC_OFFSET_MS)
    return f"{moment.month}月{moment.day}日{moment.hour:02d}:{moment.minute:02d}"


def card_last4(card_masked: str, card_no: str = "") -> str:
    """The last 4 of the masked number the published event carries (never the number)."""
    shown = card_masked or card_no
    return shown[-4:]


@dataclass(frozen=True, slots=True)
class Rendered:
    kind: Kind
    text: str


def render(event: Event, templates: Templates, institutions: Mapping[str, str]) -> Rendered | None:
    """The SMS text for an event, or None if this event sends none."""

    def text(template: str, **values: str) -> str:
        return templates.signature + template.format_map(values)

    def place(institution_id: str) -> str:
        return institutions.get(institution_id, institution_id)

    swipe = templates.swipe
    match event:
        case SwipeApproved():
            values = {
                "card": card_last4(event.card_masked, event.card_no),
                "time": beijing_time(event.at_ms),
                "institution": place(event.institution_id),
                "amount": format_yuan(event.paid_from_account_fen),
                "cash": format_yuan(event.paid_in_cash_fen),
                "balance": format_yuan(event.balance_after_fen),
            }
            key = "approved_with_cash" if event.paid_in_cash_fen > 0 else "approved"
            return Rendered(Kind.CONSUMPTION, text(swipe[key], **values))
        case SwipeReversed() | Refunded():
            values = {
                "card": card_last4(event.card_masked, event.card_no),
                "time": beijing_time(event.at_ms),
                "institution": place(event.institution_id),
                "amount": format_yuan(event.amount_fen),
                "balance": format_yuan(event.balance_after_fen),
            }
            if isinstance(event, SwipeReversed):
                return Rendered(Kind.REVERSAL, text(swipe["reversed"], **values))
            return Rendered(Kind.REFUND, text(swipe["refunded"], **values))
        case CardStateChanged():
            template = templates.card.get(event.op)
            if template is None:
                return None
            values = {
                "card": card_last4(event.card_masked, event.card_no),
                "time": beijing_time(event.at_ms),
                "deadline": beijing_time(event.deadline_ms) if event.deadline_ms else "",
            }
            return Rendered(Kind.CARD_STATE, text(template, **values))
        case CardIssued():
            replacement = templates.card_issued.get("replacement")
            if replacement is None or not (event.replaces_card_ref or event.replaces_card_no):
                return None
            values = {
                "card": card_last4(event.card_masked, event.card_no),
                "time": beijing_time(event.at_ms),
            }
            return Rendered(Kind.CARD_STATE, text(replacement, **values))
        case SwipeDeclined():
            template = templates.decline.get(event.result)
            if template is None:
                return None
            values = {
                "card": card_last4(event.card_masked, event.card_no),
                "time": beijing_time(event.at_ms),
                "institution": place(event.institution_id),
                "amount": format_yuan(event.amount_fen),
            }
            return Rendered(Kind.ALERT, text(template, **values))
    return None


# ---------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class PersonSms:
    """What the SMS job keeps per person (a row of its table, keyed by the person token).
    The phone is kept as the event sealed it (clearing/redact.py): the table's changelog
    holds no phone number in clear; it is opened only to address an SMS."""

    phone_sealed: str = ""
    cancelled: bool = False
    settled: tuple[str, ...] = ()  # event ids whose SMS is decided for good, newest last
    in_flight: tuple[str, ...] = ()  # event ids handed to the SMSC, no answer recorded
    sent_at_ms: tuple[int, ...] = ()  # event times of recent sends (flood guard), newest last
    last_alert_at_ms: int = 0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "phone_sealed": self.phone_sealed,
                "cancelled": self.cancelled,
                "settled": list(self.settled),
                "in_flight": list(self.in_flight),
                "sent_at_ms": list(self.sent_at_ms),
                "last_alert_at_ms": self.last_alert_at_ms,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PersonSms:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            phone_sealed=str(data.get("phone_sealed", "")),
            cancelled=bool(data.get("cancelled", False)),
            settled=tuple(str(x) for x in data.get("settled", ())),
            in_flight=tuple(str(x) for x in data.get("in_flight", ())),
            sent_at_ms=tuple(int(x) for x in data.get("sent_at_ms", ())),
            last_alert_at_ms=int(data.get("last_alert_at_ms", 0)),
        )


@dataclass(frozen=True, slots=True)
class Sms:
    """One SMS to submit. `message_id` is the event id: the identity of the SMS."""

    message_id: str
    person_ref: str  # the table row the SMS is settled in
    destination: str  # international form without '+': 86 + mobile number
    phone_masked: str
    kind: Kind
    text: str
    event_at_ms: int


@dataclass(frozen=True, slots=True)
class Decision:
    state: PersonSms
    outcome: Outcome
    sms: Sms | None = None
    kind: Kind | None = None  # the kind of SMS the event would get, None if it gets none


@dataclass(frozen=True, slots=True)
class Context:
    templates: Templates
    contact: Sealer  # opens the phones the worker sealed (the contact data key)
    institutions: Mapping[str, str] = field(default_factory=dict)  # id → name

    def phone_of(self, person: PersonSms) -> str:
        """The person's phone in clear, for the one moment an SMS is addressed."""
        if not person.phone_sealed:
            return ""
        return self.contact.open(person.phone_sealed).get("phone", "").strip()

    def sealed_phone(self, event: PersonRegistered | PhoneSet) -> str:
        """What the phone book keeps of an event's phone: the published event's sealed
        value, or (an event not published, in tests) the phone sealed here."""
        if event.sealed:
            return event.sealed
        return self.contact.seal({"phone": event.phone.strip()}, event.event_id)


def is_mobile(phone: str) -> bool:
    return bool(MOBILE.match(phone))


def decide(state: PersonSms | None, event: Event, context: Context, now_ms: int) -> Decision:
    """The person's SMS state after `event`, and the SMS to send for it, if any.

    Order of the checks: phone book events → an event that sends nothing → settled before
    (duplicate) → no phone / opted out / cancelled → in flight before (sent again: see
    stream_jobs/sms.py, residual window) → too old → alert interval → flood guard → send."""
    person = state or PersonSms()
    match event:
        case PersonRegistered() | PhoneSet():
            phone_book = replace(person, phone_sealed=context.sealed_phone(event))
            return Decision(phone_book, Outcome.NOT_NOTIFIABLE)
        case PersonCancelled():
            return Decision(replace(person, cancelled=True), Outcome.NOT_NOTIFIABLE)
    rendered = render(event, context.templates, context.institutions)
    if rendered is None:
        return Decision(person, Outcome.NOT_NOTIFIABLE)
    event_id = event.event_id
    if event_id in person.settled:
        return Decision(person, Outcome.DUPLICATE, kind=rendered.kind)
    phone = context.phone_of(person)
    sms = Sms(
        event_id,
        event.person_ref or event.ssn,
        COUNTRY_CODE + phone,
        mask_phone(phone),
        rendered.kind,
        rendered.text,
        event.at_ms,
    )
    if person.cancelled or not is_mobile(phone):
        return Decision(settle(person, event_id), Outcome.NO_PHONE, kind=rendered.kind)
    if event_id in person.in_flight:
        return Decision(person, Outcome.RESEND_UNCERTAIN, sms, rendered.kind)
    if now_ms - event.at_ms > SMS_MAX_AGE_MS:
        return Decision(settle(person, event_id), Outcome.STALE, kind=rendered.kind)
    if rendered.kind == Kind.ALERT:
        if person.last_alert_at_ms and event.at_ms - person.last_alert_at_ms < ALERT_INTERVAL_MS:
            return Decision(settle(person, event_id), Outcome.RATE_LIMITED, kind=rendered.kind)
        person = replace(person, last_alert_at_ms=event.at_ms)
    recent = tuple(t for t in person.sent_at_ms if event.at_ms - t < SENDS_WINDOW_MS)
    if rendered.kind != Kind.CARD_STATE and len(recent) >= SENDS_PER_WINDOW_MAX:
        return Decision(settle(person, event_id), Outcome.RATE_LIMITED, kind=rendered.kind)
    sent_at = (*recent, event.at_ms)[-SENDS_PER_WINDOW_MAX:]
    in_flight = (*person.in_flight, event_id)
    if len(in_flight) > IN_FLIGHT_IDS_MAX:
        raise AssertionError(f"more than {IN_FLIGHT_IDS_MAX} SMS in flight for one person")
    person = replace(person, in_flight=in_flight, sent_at_ms=sent_at)
    return Decision(person, Outcome.SEND, sms, rendered.kind)


def settle(state: PersonSms, event_id: str) -> PersonSms:
    """Record the SMS of `event_id` as decided for good (sent, refused for good, or
    suppressed): a redelivered event then sends nothing."""
    settled = tuple(x for x in state.settled if x != event_id)
    in_flight = tuple(x for x in state.in_flight if x != event_id)
    return replace(
        state, settled=(*settled, event_id)[-SETTLED_IDS_REMEMBERED_MAX:], in_flight=in_flight
    )


# ---------------------------------------------------------------------------- outcomes


def parse_receipt(text: str) -> tuple[str, str] | None:
    """(SMSC message id, stat) of a delivery receipt's text
    ('id:IIII sub:001 dlvrd:001 submit date:... done date:... stat:DELIVRD err:000 text:')."""
    found = RECEIPT.search(text)
    return (found["id"], found["stat"]) if found else None


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """A record of the `medclear.sms-outcomes` topic (key: the event id), for the
    ClickHouse sink. No phone number in clear and no social security number."""

    event_id: str
    outcome: str  # submitted | failed | rate_limited | no_phone | stale | receipt
    at_ms: int  # when the outcome happened (wall clock of the SMS job)
    kind: str = ""
    event_at_ms: int = 0
    phone_masked: str = ""
    parts: int = 0
    smsc_message_ids: tuple[str, ...] = ()
    resent_uncertain: bool = False  # a resend after a crash: may be a duplicate
    status: str = ""  # failed: the SMPP command_status; receipt: the stat (DELIVRD, ...)

    def to_json(self) -> bytes:
        body = {
            "event_id": self.event_id,
            "outcome": self.outcome,
            "at_ms": self.at_ms,
            "kind": self.kind,
            "event_at_ms": self.event_at_ms,
            "phone_masked": self.phone_masked,
            "parts": self.parts,
            "smsc_message_ids": list(self.smsc_message_ids),
            "resent_uncertain": self.resent_uncertain,
            "status": self.status,
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
