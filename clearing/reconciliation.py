"""Reconciliation (对账), pure, no I/O: three views of one day per institution compared,
medclear's settlement (clearing/settlement.py's day records), the ClickHouse event log
(`log_view`), and the institution's own file (对总账 totals, optionally detail lines;
`parse_totals`, `parse_details`, which collect every error with its line).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from clearing.errors import RecordError
from clearing.money import format_yuan, parse_yuan
from clearing.settlement import DaySettlement, Kind, day_number, iso_day
from clearing.validate import is_id

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
