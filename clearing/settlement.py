"""Daily settlement per designated institution: pure, no I/O.

Settlement. For each designated institution and Asia/Shanghai day, what the fund owes it:
    approved − reversed − refunded, paid from personal accounts (integer fen),
with counts and fen sums per kind. Which day an event settles on:
- an approved swipe: its own day (`SwipeApproved.day`);
- a reversal (冲正): the day of the swipe it undoes (`SwipeReversed.original_day`);
- a refund (退费): its own day. A refund is a transaction of the day it is made, as the
  institution books it; the event carries no original day.

Cut-off. Day D closes at a cut-off after its end (CUTOFF_AFTER_DAY_END_MS_DEFAULT: 02:00
Beijing on D+1; MEDCLEAR_SETTLEMENT_CUTOFF_S, 7200). The clock is injected:
`close_due(state, now_ms)`. A closed record is final. An event for a day that is already
closed (a late reversal, or any event that reached settlement after the cut-off) never
rewrites that day: it goes into an adjustment line of the next open day, naming the day
it belongs to.

Idempotent by event id: each kept day holds the ids applied to it (at most
APPLIED_IDS_PER_DAY_MAX, 2,000,000, per institution-day), and a redelivered event
changes nothing and publishes nothing. Closed days keep their ids for CLOSED_DAYS_KEPT
(3) more days, then are forgotten (redeliveries come from the uncommitted tail of a
partition: seconds to minutes). Cost: an institution's state, ids included, is one
changelog record rewritten per event, so a busy hospital writes O(n) bytes per event;
per-event keys in a second table are the remedy if the issue-7 benchmark shows it.

Reconciliation (comparing these records with the event log and the institutions' files)
is clearing/reconciliation.py.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from clearing.calendar import EPOCH, HOUR_MS, shanghai_day
from clearing.errors import ClearingError, RecordError
from clearing.limits import DAY_MS
from clearing.model import Event, Refunded, SwipeApproved, SwipeReversed

CUTOFF_AFTER_DAY_END_MS_DEFAULT = 2 * HOUR_MS  # day D closes at 02:00 Beijing on D+1
CUTOFF_AFTER_DAY_END_MS_MAX = 7 * DAY_MS
APPLIED_IDS_PER_DAY_MAX = 2_000_000  # event ids kept per institution per day
CLOSED_DAYS_KEPT = 3  # closed days kept (ids for dedupe) after the latest closed day
OPEN_DAYS_MAX = 64  # open days per institution; more means the clock is not advancing
NO_DAY = -1


class SettlementError(ClearingError):
    """A bound was exceeded or an invariant broke: a programmer or deployment error."""


class Kind(StrEnum):
    APPROVED = "approved"
    REVERSED = "reversed"
    REFUNDED = "refunded"


SIGN = {Kind.APPROVED: 1, Kind.REVERSED: -1, Kind.REFUNDED: -1}


def iso_day(day: int) -> str:
    """A Shanghai day number as YYYY-MM-DD."""
    return (EPOCH + dt.timedelta(days=day)).isoformat()


def day_number(text: str) -> int:
    """YYYY-MM-DD as a Shanghai day number; ValueError if it is not a date."""
    return (dt.date.fromisoformat(text.strip()) - EPOCH).days


# ---------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class Entry:
    """One event as settlement sees it."""

    event_id: str
    institution_id: str
    day: int  # the settlement day it belongs to
    kind: Kind
    account_fen: int  # paid from (approved) or returned to (reversed, refunded) the account
    amount_fen: int = 0  # approved: the whole amount, account + cash; else 0
    request_id: str = ""


ENTRY_EVENTS = (SwipeApproved, SwipeReversed, Refunded)  # the events entry_of reads


def entry_of(event: Event) -> Entry | None:
    """The settlement entry of an event, or None for events that move no money between
    the fund and an institution (credits, declines, card events)."""
    match event:
        case SwipeApproved():
            return Entry(
                event.event_id,
                event.institution_id,
                event.day,
                Kind.APPROVED,
                event.paid_from_account_fen,
                event.amount_fen,
                event.request_id,
            )
        case SwipeReversed():
            return Entry(
                event.event_id,
                event.institution_id,
                event.original_day,
                Kind.REVERSED,
                event.amount_fen,
                0,
                event.original_request_id,
            )
        case Refunded():
            return Entry(
                event.event_id,
                event.institution_id,
                shanghai_day(event.at_ms),
                Kind.REFUNDED,
                event.amount_fen,
                0,
                event.request_id,
            )
    return None


# ---------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Line:
    count: int = 0
    account_fen: int = 0

    def plus(self, account_fen: int) -> Line:
        return Line(self.count + 1, self.account_fen + account_fen)


@dataclass(frozen=True, slots=True)
class Adjustment:
    """Events of a closed day that reached settlement after its cut-off."""

    original_day: int
    kind: Kind
    count: int
    account_fen: int

    @property
    def signed_fen(self) -> int:
        return SIGN[self.kind] * self.account_fen


@dataclass(frozen=True, slots=True)
class DaySettlement:
    institution_id: str
    day: int
    closed: bool = False
    closed_at_ms: int = 0
    approved: Line = Line()
    approved_amount_fen: int = 0  # account + cash of the approved swipes
    reversed: Line = Line()
    refunded: Line = Line()
    adjustments: tuple[Adjustment, ...] = ()  # sorted by (original_day, kind)
    applied_ids: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def own_net_fen(self) -> int:
        """This day's own lines: approved − reversed − refunded."""
        return self.approved.account_fen - self.reversed.account_fen - self.refunded.account_fen

    @property
    def net_fen(self) -> int:
        """What the fund owes the institution on this day's settlement, adjustments in."""
        return self.own_net_fen + sum(a.signed_fen for a in self.adjustments)

    @property
    def key(self) -> str:
        return settlement_key(self.institution_id, self.day)


def settlement_key(institution_id: str, day: int) -> str:
    """The record key on the settlements topic: `institution:YYYY-MM-DD`."""
    return f"{institution_id}:{iso_day(day)}"


@dataclass(frozen=True, slots=True)
class InstitutionState:
    institution_id: str
    closed_through: int = NO_DAY  # every day ≤ this is closed
    days: tuple[DaySettlement, ...] = ()  # open days and the last CLOSED_DAYS_KEPT closed

    def day(self, day: int) -> DaySettlement | None:
        for record in self.days:
            if record.day == day:
                return record
        return None

    def seen(self, event_id: str) -> bool:
        return any(event_id in record.applied_ids for record in self.days)


def closable_through(now_ms: int, cutoff_ms: int) -> int:
    """The latest day whose cut-off has passed at `now_ms`."""
    # day d closes at day_start_ms(d + 1) + cutoff_ms
    return shanghai_day(now_ms - cutoff_ms) - 1


def _check_cutoff(cutoff_ms: int) -> None:
    if not 0 <= cutoff_ms <= CUTOFF_AFTER_DAY_END_MS_MAX:
        raise SettlementError(f"cut-off {cutoff_ms} ms is outside 0..{CUTOFF_AFTER_DAY_END_MS_MAX}")


def _put(state: InstitutionState, record: DaySettlement) -> InstitutionState:
    days = [d for d in state.days if d.day != record.day]
    days.append(record)
    days.sort(key=lambda d: d.day)
    if sum(1 for d in days if not d.closed) > OPEN_DAYS_MAX:
        raise SettlementError(f"{state.institution_id}: more than {OPEN_DAYS_MAX} open days")
    return replace(state, days=tuple(days))


def apply(
    state: InstitutionState | None, entry: Entry
) -> tuple[InstitutionState, DaySettlement | None]:
    """Add one entry. Returns the new state and the day record it changed, or the same
    state and None when the event id was already applied (a redelivery)."""
    if state is None:
        state = InstitutionState(entry.institution_id)
    if entry.institution_id != state.institution_id:
        raise SettlementError(f"entry of {entry.institution_id} applied to {state.institution_id}")
    if entry.account_fen < 0 or entry.amount_fen < 0:
        raise SettlementError(f"negative amount in {entry.event_id}")
    if state.seen(entry.event_id):
        return state, None
    late = entry.day <= state.closed_through
    target_day = state.closed_through + 1 if late else entry.day
    record = state.day(target_day) or DaySettlement(state.institution_id, target_day)
    if record.closed:
        raise SettlementError(f"{record.key} is closed but after closed_through")
    if len(record.applied_ids) >= APPLIED_IDS_PER_DAY_MAX:
        raise SettlementError(f"{record.key}: more than {APPLIED_IDS_PER_DAY_MAX} events")
    ids = record.applied_ids | {entry.event_id}
    if late:
        record = replace(record, adjustments=_adjusted(record.adjustments, entry), applied_ids=ids)
    elif entry.kind == Kind.APPROVED:
        record = replace(
            record,
            approved=record.approved.plus(entry.account_fen),
            approved_amount_fen=record.approved_amount_fen + entry.amount_fen,
            applied_ids=ids,
        )
    elif entry.kind == Kind.REVERSED:
        record = replace(record, reversed=record.reversed.plus(entry.account_fen), applied_ids=ids)
    else:
        record = replace(record, refunded=record.refunded.plus(entry.account_fen), applied_ids=ids)
    return _put(state, record), record


def _adjusted(adjustments: tuple[Adjustment, ...], entry: Entry) -> tuple[Adjustment, ...]:
    lines = {(a.original_day, a.kind): a for a in adjustments}
    old = lines.get((entry.day, entry.kind), Adjustment(entry.day, entry.kind, 0, 0))
    lines[(entry.day, entry.kind)] = replace(
        old, count=old.count + 1, account_fen=old.account_fen + entry.account_fen
    )
    return tuple(sorted(lines.values(), key=lambda a: (a.original_day, a.kind.value)))


def due_to_close(state: InstitutionState, now_ms: int, cutoff_ms: int) -> bool:
    """Whether `close_due` would close a day now (cheap; the timer asks it)."""
    through = closable_through(now_ms, cutoff_ms)
    return any(not d.closed and d.day <= through for d in state.days)


def close_due(
    state: InstitutionState, now_ms: int, cutoff_ms: int = CUTOFF_AFTER_DAY_END_MS_DEFAULT
) -> tuple[InstitutionState, tuple[DaySettlement, ...]]:
    """Close every open day whose cut-off has passed at `now_ms`; returns the new state
    and the records closed now (each is final: nothing changes it afterwards). Closed
    days older than CLOSED_DAYS_KEPT before the latest closed day are forgotten."""
    _check_cutoff(cutoff_ms)
    through = max(state.closed_through, closable_through(now_ms, cutoff_ms))
    closed_now: list[DaySettlement] = []
    days: list[DaySettlement] = []
    for record in state.days:
        if not record.closed and record.day <= through:
            record = replace(record, closed=True, closed_at_ms=now_ms)
            closed_now.append(record)
        if record.closed and record.day < through - CLOSED_DAYS_KEPT:
            continue
        days.append(record)
    return replace(state, closed_through=through, days=tuple(days)), tuple(closed_now)


def step(
    state: InstitutionState | None, entry: Entry, now_ms: int, cutoff_ms: int
) -> tuple[InstitutionState, list[DaySettlement]]:
    """What the job does per event: close what is due at `now_ms`, then apply. Returns
    the records to publish (closed now, then the one changed)."""
    closed: tuple[DaySettlement, ...] = ()
    if state is not None:
        state, closed = close_due(state, now_ms, cutoff_ms)
    state, changed = apply(state, entry)
    return state, [*closed, *([changed] if changed is not None else [])]


# ---------------------------------------------------------------------------- records


def record_to_json(record: DaySettlement, *, with_ids: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "institution_id": record.institution_id,
        "day": iso_day(record.day),
        "closed": record.closed,
        "closed_at_ms": record.closed_at_ms,
        "approved": [record.approved.count, record.approved.account_fen],
        "approved_amount_fen": record.approved_amount_fen,
        "reversed": [record.reversed.count, record.reversed.account_fen],
        "refunded": [record.refunded.count, record.refunded.account_fen],
        "adjustments": [
            [iso_day(a.original_day), a.kind.value, a.count, a.account_fen]
            for a in record.adjustments
        ],
        "net_fen": record.net_fen,
    }
    if with_ids:
        data["applied_ids"] = sorted(record.applied_ids)
    return data


def record_from_json(data: Mapping[str, Any]) -> DaySettlement:
    for name in ("approved", "reversed", "refunded"):
        count, fen = data[name]
        if not isinstance(count, int) or not isinstance(fen, int):
            raise RecordError(f"{name}: counts and amounts are integers")
    record = DaySettlement(
        institution_id=str(data["institution_id"]),
        day=day_number(data["day"]),
        closed=bool(data["closed"]),
        closed_at_ms=int(data["closed_at_ms"]),
        approved=Line(*data["approved"]),
        approved_amount_fen=int(data["approved_amount_fen"]),
        reversed=Line(*data["reversed"]),
        refunded=Line(*data["refunded"]),
        adjustments=tuple(
            Adjustment(day_number(d), Kind(k), int(c), int(f)) for d, k, c, f in data["adjustments"]
        ),
        applied_ids=frozenset(data.get("applied_ids", ())),
    )
    if "net_fen" in data and data["net_fen"] != record.net_fen:
        raise RecordError(f"{record.key}: net_fen {data['net_fen']} != lines {record.net_fen}")
    return record


def encode_record(record: DaySettlement) -> bytes:
    """The value published on the settlements topic (without the applied ids)."""
    return json.dumps(record_to_json(record), ensure_ascii=False, sort_keys=True).encode()


def decode_record(raw: bytes) -> DaySettlement:
    return record_from_json(json.loads(raw))


def encode_state(state: InstitutionState) -> bytes:
    return json.dumps(
        {
            "institution_id": state.institution_id,
            "closed_through": state.closed_through,
            "days": [record_to_json(d, with_ids=True) for d in state.days],
        },
        ensure_ascii=False,
    ).encode()


def decode_state(raw: bytes) -> InstitutionState:
    data = json.loads(raw)
    return InstitutionState(
        str(data["institution_id"]),
        int(data["closed_through"]),
        tuple(record_from_json(d) for d in data["days"]),
    )


# ---------------------------------------------------------------------------- conservation


@dataclass(frozen=True, slots=True)
class Conservation:
    """Over all persons and institutions: credits − balances = settled + pending.

    credits: every allocation into personal accounts; balances: what the accounts hold
    now; settled: net owed on closed days; pending: net owed on open days."""

    credits_fen: int
    balances_fen: int
    settled_fen: int
    pending_fen: int

    @property
    def difference_fen(self) -> int:
        return self.credits_fen - self.balances_fen - (self.settled_fen + self.pending_fen)

    @property
    def holds(self) -> bool:
        return self.difference_fen == 0


def settled_and_pending(records: Iterable[DaySettlement]) -> tuple[int, int]:
    """(settled, pending): the net of the closed and of the open day records. Pass the
    latest record of each key."""
    settled = pending = 0
    for record in records:
        if record.closed:
            settled += record.net_fen
        else:
            pending += record.net_fen
    return settled, pending
