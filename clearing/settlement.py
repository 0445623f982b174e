"""Daily settlement per designated institution, and reconciliation (对账): pure, no I/O.

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

Reconciliation compares three views of one day per institution: medclear's settlement
(this module's records), the ClickHouse event log, and the institution's own file
(对总账 totals, optionally detail lines). Parsing collects every error with its line.
"""

from __future__ import annotations

import csv
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
from clearing.money import format_yuan, parse_yuan
from clearing.validate import is_id

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


# ---------------------------------------------------------------------------- reconciliation


@dataclass(frozen=True, slots=True)
class Totals:
    """One institution's day: transactions (swipes that stand + refunds), the whole
    amount (None when the source does not know it) and the personal-account net."""

    count: int
    amount_fen: int | None
    account_fen: int


@dataclass(frozen=True, slots=True)
class TotalsRow:
    institution_id: str
    day: int
    totals: Totals
    line_no: int = 0


class DetailKind(StrEnum):
    SWIPE = "swipe"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class DetailLine:
    institution_id: str
    day: int
    request_id: str  # terminal id + ":" + trace number
    kind: DetailKind
    amount_fen: int
    account_fen: int
    line_no: int = 0  # in the institution's file; 0 for medclear's log

    @property
    def ident(self) -> tuple[str, str, DetailKind]:
        return (self.institution_id, self.request_id, self.kind)


def settlement_totals(records: Iterable[DaySettlement], day: int) -> dict[str, Totals]:
    """Each institution's `day` as settlement sees it now: that day's own lines plus every
    adjustment naming it that landed in a later day."""
    count: dict[str, int] = {}
    net: dict[str, int] = {}
    for record in records:
        inst = record.institution_id
        if record.day == day:
            count[inst] = count.get(inst, 0) + (
                record.approved.count - record.reversed.count + record.refunded.count
            )
            net[inst] = net.get(inst, 0) + record.own_net_fen
        for adj in record.adjustments:
            if adj.original_day == day:
                count[inst] = count.get(inst, 0) + (
                    -adj.count if adj.kind == Kind.REVERSED else adj.count
                )
                net[inst] = net.get(inst, 0) + adj.signed_fen
    return {inst: Totals(count[inst], None, net[inst]) for inst in count}


@dataclass(frozen=True, slots=True)
class LogSwipe:
    institution_id: str
    request_id: str
    amount_fen: int
    account_fen: int


@dataclass(frozen=True, slots=True)
class LogReturn:
    """A reversal (request_id = the swipe undone) or a refund (its own request id)."""

    institution_id: str
    request_id: str
    account_fen: int


def log_view(
    day: int,
    swipes: Iterable[LogSwipe],
    reversals: Iterable[LogReturn],
    refunds: Iterable[LogReturn],
) -> tuple[dict[str, Totals], list[DetailLine]]:
    """Totals and detail lines of `day` from the event log: approved swipes of the day,
    reversals of the day's swipes (whenever made), refunds made that day. Totals follow
    settlement's arithmetic; detail lines are the swipes that stand and the refunds."""
    by_request = {(s.institution_id, s.request_id): s for s in swipes}
    reversed_keys = set()
    count: dict[str, int] = {}
    amount: dict[str, int] = {}
    account: dict[str, int] = {}

    def add(inst: str, n: int, amount_fen: int, account_fen: int) -> None:
        count[inst] = count.get(inst, 0) + n
        amount[inst] = amount.get(inst, 0) + amount_fen
        account[inst] = account.get(inst, 0) + account_fen

    for s in by_request.values():
        add(s.institution_id, 1, s.amount_fen, s.account_fen)
    for r in reversals:
        original = by_request.get((r.institution_id, r.request_id))
        reversed_keys.add((r.institution_id, r.request_id))
        add(r.institution_id, -1, -(original.amount_fen if original else 0), -r.account_fen)
    lines: list[DetailLine] = [
        DetailLine(
            s.institution_id, day, s.request_id, DetailKind.SWIPE, s.amount_fen, s.account_fen
        )
        for key, s in sorted(by_request.items())
        if key not in reversed_keys
    ]
    for f in refunds:
        add(f.institution_id, 1, -f.account_fen, -f.account_fen)
        lines.append(
            DetailLine(
                f.institution_id, day, f.request_id, DetailKind.REFUND, f.account_fen, f.account_fen
            )
        )
    totals = {inst: Totals(count[inst], amount[inst], account[inst]) for inst in count}
    return totals, lines


class Status(StrEnum):
    MATCHED = "matched"
    MISMATCHED = "mismatched"
    MISSING_IN_FILE = "missing in institution file"
    MISSING_IN_MEDCLEAR = "missing in medclear"


@dataclass(frozen=True, slots=True)
class ReconRow:
    institution_id: str
    settlement: Totals | None
    log: Totals | None
    file: Totals | None
    status: Status
    notes: tuple[str, ...] = ()


def _empty(totals: Totals | None) -> bool:
    return totals is None or (
        totals.count == 0 and totals.account_fen == 0 and not totals.amount_fen
    )


def compare_totals(
    settlement: Mapping[str, Totals], log: Mapping[str, Totals], file: Mapping[str, Totals]
) -> list[ReconRow]:
    """One row per institution present anywhere, sorted by institution id."""
    rows: list[ReconRow] = []
    for inst in sorted(set(settlement) | set(log) | set(file)):
        s, g, f = settlement.get(inst), log.get(inst), file.get(inst)
        notes: list[str] = []
        ours = s or g
        if f is None:
            status = Status.MATCHED if _empty(s) and _empty(g) else Status.MISSING_IN_FILE
        elif _empty(s) and _empty(g):
            status = Status.MATCHED if _empty(f) else Status.MISSING_IN_MEDCLEAR
        else:
            assert ours is not None
            for name, mine in (("settlement", s), ("log", g)):
                if mine is None:
                    notes.append(f"no {name} figures")
                    continue
                if mine.count != f.count:
                    notes.append(f"count: {name} {mine.count}, file {f.count}")
                if mine.account_fen != f.account_fen:
                    notes.append(
                        f"account ¥: {name} {format_yuan(mine.account_fen)}, "
                        f"file {format_yuan(f.account_fen)}"
                    )
                if (
                    mine.amount_fen is not None
                    and f.amount_fen is not None
                    and (mine.amount_fen != f.amount_fen)
                ):
                    notes.append(
                        f"amount ¥: {name} {format_yuan(mine.amount_fen)}, "
                        f"file {format_yuan(f.amount_fen)}"
                    )
            status = Status.MISMATCHED if notes else Status.MATCHED
        if s is not None and g is not None and (s.count, s.account_fen) != (g.count, g.account_fen):
            notes.append(
                f"settlement and log differ: {s.count} / ¥{format_yuan(s.account_fen)} vs "
                f"{g.count} / ¥{format_yuan(g.account_fen)} (settlement job behind?)"
            )
            if status == Status.MATCHED:
                status = Status.MISMATCHED
        rows.append(ReconRow(inst, s, g, f, status, tuple(notes)))
    return rows


class DetailIssue(StrEnum):
    MISSING_IN_FILE = "missing in institution file"
    MISSING_IN_MEDCLEAR = "missing in medclear"
    AMOUNT_DIFFERS = "amount differs"


@dataclass(frozen=True, slots=True)
class DetailDiff:
    institution_id: str
    request_id: str
    kind: DetailKind
    issue: DetailIssue
    medclear: DetailLine | None
    institution: DetailLine | None


def compare_details(
    log_lines: Iterable[DetailLine], file_lines: Iterable[DetailLine], institutions: Iterable[str]
) -> list[DetailDiff]:
    """Transaction by transaction, for the institutions that sent detail lines."""
    wanted = set(institutions)
    ours = {line.ident: line for line in log_lines if line.institution_id in wanted}
    theirs = {line.ident: line for line in file_lines if line.institution_id in wanted}
    diffs: list[DetailDiff] = []
    for ident in sorted(set(ours) | set(theirs)):
        mine, other = ours.get(ident), theirs.get(ident)
        if other is None:
            issue = DetailIssue.MISSING_IN_FILE
        elif mine is None:
            issue = DetailIssue.MISSING_IN_MEDCLEAR
        elif (mine.amount_fen, mine.account_fen) != (other.amount_fen, other.account_fen):
            issue = DetailIssue.AMOUNT_DIFFERS
        else:
            continue
        diffs.append(DetailDiff(ident[0], ident[1], ident[2], issue, mine, other))
    return diffs


# ---------------------------------------------------------------------------- files

TOTALS_COLUMNS = ("institution_id", "day", "count", "total_amount", "account_amount")
DETAIL_COLUMNS = ("institution_id", "day", "request_id", "kind", "amount", "account_amount")
FILE_LINES_MAX = 1_000_000


def _rows(
    text: str, source: str, columns: tuple[str, ...]
) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    lines = text.lstrip("\ufeff").splitlines()
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return [], [f"{source}:1: empty file; expected the header {','.join(columns)}"]
    names = [h.strip().lower() for h in header]
    if sorted(names) != sorted(columns):
        return [], [f"{source}:1: header {','.join(names)!r}; expected {','.join(columns)}"]
    rows: list[tuple[int, dict[str, str]]] = []
    errors: list[str] = []
    for line_no, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if line_no > FILE_LINES_MAX:
            errors.append(f"{source}:{line_no}: more than {FILE_LINES_MAX} lines")
            break
        if len(values) != len(names):
            errors.append(f"{source}:{line_no}: {len(values)} fields, expected {len(names)}")
            continue
        rows.append((line_no, dict(zip(names, (v.strip() for v in values), strict=True))))
    return rows, errors


def _id(value: str, what: str) -> str:
    if not is_id(value):
        raise RecordError(f"{what} {value!r} is not an id (printable, no spaces)")
    return value


def parse_totals(text: str, source: str) -> tuple[list[TotalsRow], list[str]]:
    """An institution's daily totals (对总账), CSV with the header TOTALS_COLUMNS; amounts
    in yuan with at most two decimals, `count` the transactions (swipes that stand plus
    refunds), `total_amount` and `account_amount` net of refunds. Returns the rows and
    every error as `file:line: message`."""
    rows, errors = _rows(text, source, TOTALS_COLUMNS)
    parsed: list[TotalsRow] = []
    seen: dict[tuple[str, int], int] = {}
    for line_no, row in rows:
        try:
            inst = _id(row["institution_id"], "institution")
            day = day_number(row["day"])
            count = int(row["count"])
            if count < 0:
                raise RecordError(f"count {count} is negative")
            total, account = _signed_yuan(row["total_amount"]), _signed_yuan(row["account_amount"])
            if abs(account) > abs(total):
                raise RecordError("account amount exceeds the total amount")
        except ValueError as exc:
            errors.append(f"{source}:{line_no}: {exc}")
            continue
        if (inst, day) in seen:
            errors.append(
                f"{source}:{line_no}: {inst} {iso_day(day)} again "
                f"(first on line {seen[(inst, day)]})"
            )
            continue
        seen[(inst, day)] = line_no
        parsed.append(TotalsRow(inst, day, Totals(count, total, account), line_no))
    return parsed, sorted(errors, key=_line_of)


def _signed_yuan(text: str) -> int:
    """Totals may be negative (a day of refunds only): '-12.50' → -1250."""
    stripped = text.strip()
    if stripped.startswith("-"):
        return -parse_yuan(stripped[1:])
    return parse_yuan(stripped)


def parse_details(text: str, source: str) -> tuple[list[DetailLine], list[str]]:
    """An institution's detail lines, CSV with the header DETAIL_COLUMNS: one line per
    transaction, kind `swipe` or `refund`, request_id = terminal id:trace number."""
    rows, errors = _rows(text, source, DETAIL_COLUMNS)
    parsed: list[DetailLine] = []
    seen: dict[tuple[str, str, DetailKind], int] = {}
    for line_no, row in rows:
        try:
            inst = _id(row["institution_id"], "institution")
            day = day_number(row["day"])
            request_id = _id(row["request_id"], "request id")
            try:
                kind = DetailKind(row["kind"].lower())
            except ValueError:
                raise RecordError(f"kind {row['kind']!r} is not swipe or refund") from None
            amount, account = parse_yuan(row["amount"]), parse_yuan(row["account_amount"])
            if account > amount:
                raise RecordError("account amount exceeds the amount")
        except ValueError as exc:
            errors.append(f"{source}:{line_no}: {exc}")
            continue
        line = DetailLine(inst, day, request_id, kind, amount, account, line_no)
        if line.ident in seen:
            errors.append(
                f"{source}:{line_no}: {request_id} {kind.value} again "
                f"(first on line {seen[line.ident]})"
            )
            continue
        seen[line.ident] = line_no
        parsed.append(line)
    return parsed, sorted(errors, key=_line_of)


def _line_of(error: str) -> int:
    """`file:line: message` → line (errors are reported in file order)."""
    location = error.split(": ", 1)[0]
    return int(location.rsplit(":", 1)[1])


def file_totals(rows: Iterable[TotalsRow], day: int) -> dict[str, Totals]:
    return {r.institution_id: r.totals for r in rows if r.day == day}
