"""ClickHouse helpers: connection, migrations, the event row, the reconciliation queries.

Migrations. The schema lives in `stream_jobs/schema/NNN_name.sql`; `migrate` applies
every such file of the directory in name order (another job may add its own table with a
higher number) and records each in `schema_migrations` with its checksum: an applied file
that has changed since is an error. Every statement is idempotent on its own (IF NOT
EXISTS), so a run that stops half-way is simply run again. The ClickHouse sink runs them
at start. The SQL is written to run on Debian's ClickHouse 18.16 and on current
ClickHouse (the subset in shared/INFRA.md); a test runs it on chdb 26.9 when
`.[current-clickhouse]` is installed.

The event row. `event_row` is the pure mapping from a published event (clearing.model)
to a row of `events`, columns per the contract: times as `DateTime('Asia/Shanghai')`
plus the exact `at_ms`, money as Int64 fen, the `result` code, `original_day` (the
reversed swipe's day); the rest of the event goes to `detail` (JSON). No card or social
security number: `person_ref` / `card_ref` tokens and masked numbers; names and phones
masked; a PIN's verification value is never stored.

Reconciliation queries, all reading `events FINAL`, so a redelivered event inserted twice
and not merged yet is counted once:
- the view `institution_daily_totals` and `daily_totals(client, day, institution=None)`
  (the same select, with the filter applied inside): per institution per Beijing day,
  approved count / amount / paid from account, reversed (by the day of the swipe they
  undo), refunded (by the day of the refund), and the net;
- `day_events`: the day's lines.
The institutions' imported files (`institution_totals`, `institution_details`) are
written by `insert_institution_files`; a reader takes the latest `imported_at_ms`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import typing
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import orjson
from clickhouse_driver import Client

from clearing import model, reconciliation, validate
from clearing.abnormal import Alert
from clearing.calendar import EPOCH, shanghai_day
from clearing.codes import InstitutionType, ResultCode, message_of
from clearing.redact import CardTokens
from stream_jobs.errors import StreamJobError

SCHEMA_DIR = Path(__file__).with_name("schema")
MIGRATION_NAME = re.compile(r"^\d{3}_[a-z0-9_]+\.sql$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CONNECT_TIMEOUT_S = 3
SEND_RECEIVE_TIMEOUT_S = 10  # an insert of a full batch takes milliseconds; a frozen server
# is noticed after this long, and the batch is retried (duplicates are harmless)

MIGRATIONS_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    name String,
    checksum String,
    applied_at DateTime
)
ENGINE = ReplacingMergeTree()
ORDER BY name
"""


class MigrationError(StreamJobError):
    """A migration file is malformed, or was changed after it was applied."""


# ---------------------------------------------------------------------------- connection


def database_of(url: str, default: str = "medclear") -> str:
    """The database named in a clickhouse:// URL's path, else `default`."""
    name = urllib.parse.urlsplit(url).path.strip("/") or default
    if not IDENTIFIER.match(name):
        raise ValueError(f"invalid ClickHouse database name {name!r}")
    return name


def _with_database(url: str, database: str, **query: str) -> str:
    parts = urllib.parse.urlsplit(url)
    params = dict(urllib.parse.parse_qsl(parts.query)) | query
    return urllib.parse.urlunsplit(
        parts._replace(path=f"/{database}", query=urllib.parse.urlencode(params))
    )


def connect(url: str, default_database: str = "medclear") -> Client:
    """A client on the URL's database (created if missing), with bounded timeouts."""
    database = database_of(url, default_database)
    timeouts = {
        "connect_timeout": str(CONNECT_TIMEOUT_S),
        "send_receive_timeout": str(SEND_RECEIVE_TIMEOUT_S),
    }
    admin = Client.from_url(_with_database(url, "default", **timeouts))
    try:
        admin.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    finally:
        admin.disconnect()
    return Client.from_url(_with_database(url, database, **timeouts))


# ---------------------------------------------------------------------------- migrations


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        return split_statements(self.sql)


def split_statements(sql: str) -> list[str]:
    """Statements of a migration file: `--` comment lines dropped, split at a `;` that
    ends a line. (No `;` inside a string literal at a line end: keep migrations plain.)"""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    statements, current = [], []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";").strip())
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return [s for s in statements if s]


def migrations(directory: Path = SCHEMA_DIR) -> list[Migration]:
    """Every *.sql file of `directory`, in name order."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        if not MIGRATION_NAME.match(path.name):
            raise MigrationError(f"{path.name}: migrations are named NNN_lower_case.sql")
        found.append(Migration(path.name, path.read_text(encoding="utf-8")))
    return found


def applied_migrations(client: Client) -> dict[str, str]:
    """name → checksum of the migrations recorded in `schema_migrations`."""
    client.execute(MIGRATIONS_TABLE_SQL)
    rows = client.execute("SELECT name, any(checksum) FROM schema_migrations GROUP BY name")
    return {str(name): str(checksum) for name, checksum in rows}


def migrate(client: Client, directory: Path = SCHEMA_DIR) -> list[str]:
    """Apply the migrations not yet recorded, in order; returns the names applied.

    Idempotent: a second run applies nothing. A recorded file whose text changed since is
    an error (migrations are append-only: add a new file instead)."""
    done = applied_migrations(client)
    applied: list[str] = []
    for migration in migrations(directory):
        recorded = done.get(migration.name)
        if recorded is not None:
            if recorded != migration.checksum:
                raise MigrationError(
                    f"{migration.name} changed after it was applied "
                    f"(checksum {recorded} recorded, {migration.checksum} now)"
                )
            continue
        for statement in migration.statements():
            client.execute(statement)
        client.execute(
            "INSERT INTO schema_migrations (name, checksum, applied_at) VALUES",
            [(migration.name, migration.checksum, dt.datetime.now(dt.UTC))],
        )
        applied.append(migration.name)
    if "result_codes" in {row[0] for row in client.execute("SHOW TABLES")}:
        sync_lookups(client)
    return applied


def sync_lookups(client: Client) -> None:
    """The names of the result codes and institution types (520_analysts.sql), from
    clearing/codes.py: one row per code, replaced on every run (ReplacingMergeTree)."""
    client.execute(
        "INSERT INTO result_codes (code, name, message, approved) VALUES",
        [(int(code), code.name, message_of(code), int(code.approved)) for code in ResultCode],
    )
    client.execute(
        "INSERT INTO institution_types (type, name) VALUES",
        [(int(kind), kind.name.lower()) for kind in InstitutionType],
    )


# ---------------------------------------------------------------------------- the event row

COLUMNS = (
    "event_id",
    "event_type",
    "at",
    "at_ms",
    "day",
    "person_ref",
    "ssn_masked",
    "card_ref",
    "card_masked",
    "request_id",
    "original_request_id",
    "institution_id",
    "institution_type",
    "amount_fen",
    "paid_from_account_fen",
    "paid_in_cash_fen",
    "balance_after_fen",
    "result",
    "original_day",
    "detail",
)
INSERT_SQL = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES"

EVENT_TYPES: tuple[type[Any], ...] = typing.get_args(model.Event)

# Fields that have a column of their own, and fields that never leave the aggregate.
_COLUMN_FIELDS = frozenset(COLUMNS) | {"day", "original_day", "ssn", "card_no"}
# ... the clear name and phone of an unpublished event too: their masked copies are stored
_NEVER_STORED = frozenset({"ssn", "card_no", "replaces_card_no", "pvv", "sealed", "name", "phone"})
_MASKED = {"phone": validate.mask_phone}


def day_date(day: int) -> dt.date:
    """A Shanghai day number (clearing.calendar) as a date."""
    return EPOCH + dt.timedelta(days=day)


_DETAIL_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def _detail_fields(cls: type[Any]) -> tuple[str, ...]:
    names = _DETAIL_FIELDS.get(cls)
    if names is None:
        every = (f.name for f in dataclasses.fields(cls))
        names = tuple(n for n in every if n not in _COLUMN_FIELDS and n not in _NEVER_STORED)
        _DETAIL_FIELDS[cls] = names
    return names


def _detail(event: model.Event) -> str:
    rest: dict[str, Any] = {}
    for name in _detail_fields(type(event)):
        value = getattr(event, name)
        if name in _MASKED:
            value = _MASKED[name](value)
        elif name == "name":
            value = validate.mask_name(value)
        elif isinstance(value, IntEnum):
            value = value.name
        rest[name] = value
    return orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode()  # compact, UTF-8


def _result(event: model.Event) -> ResultCode:
    if isinstance(event, model.SwipeDeclined):
        return event.result
    if isinstance(event, model.SwipeApproved) and event.paid_in_cash_fen > 0:
        return ResultCode.PARTIALLY_APPROVED
    if isinstance(event, model.ReversalUnmatched):
        return ResultCode.ORIGINAL_NOT_FOUND
    return ResultCode.OK


def event_row(event: model.Event, tokens: CardTokens) -> tuple[Any, ...]:
    """The `events` row of a published event, in COLUMNS order.

    A published event carries card_ref/card_masked and an empty card_no; an event that
    still has its card number (not published) is tokenised here, so no path stores one."""
    card_no: str = getattr(event, "card_no", "")
    card_ref: str = getattr(event, "card_ref", "") or tokens.card_ref(card_no)
    card_masked: str = getattr(event, "card_masked", "") or (
        validate.mask_card(card_no) if card_no else ""
    )
    day = shanghai_day(event.at_ms)
    original_day = event.original_day if isinstance(event, model.SwipeReversed) else day
    institution_type = getattr(event, "institution_type", 0)
    row = (
        event.event_id,
        type(event).__name__,
        event.at_ms // 1000,
        event.at_ms,
        day_date(day),
        event.person_ref or tokens.person_ref(event.ssn),
        event.ssn_masked or validate.mask_ssn(event.ssn),
        card_ref,
        card_masked,
        getattr(event, "request_id", ""),
        getattr(event, "original_request_id", ""),
        getattr(event, "institution_id", ""),
        int(institution_type),
        int(getattr(event, "amount_fen", 0)),
        int(getattr(event, "paid_from_account_fen", 0)),
        int(getattr(event, "paid_in_cash_fen", 0)),
        int(getattr(event, "balance_after_fen", 0)),
        int(_result(event)),
        day_date(original_day),
        _detail(event),
    )
    if len(row) != len(COLUMNS):
        raise AssertionError("event_row and COLUMNS disagree")
    return row


ALERT_COLUMNS = (
    "alert_id",
    "kind",
    "at",
    "at_ms",
    "day",
    "person_ref",
    "card_ref",
    "card_masked",
    "institution_id",
    "terminal_id",
    "cardholder_facing",
    "detail",
)
ALERTS_INSERT_SQL = f"INSERT INTO alerts ({', '.join(ALERT_COLUMNS)}) VALUES"
SMS_OUTCOME_COLUMNS = (
    "event_id",
    "outcome",
    "at",
    "at_ms",
    "day",
    "kind",
    "event_at_ms",
    "phone_masked",
    "parts",
    "smsc_message_ids",
    "resent_uncertain",
    "status",
)
SMS_OUTCOMES_INSERT_SQL = f"INSERT INTO sms_outcomes ({', '.join(SMS_OUTCOME_COLUMNS)}) VALUES"


def alert_row(alert: Alert, tokens: CardTokens) -> tuple[Any, ...]:
    """The `alerts` row of an abnormal-transaction alert, in ALERT_COLUMNS order."""
    return (
        alert.alert_id,
        alert.kind.value,
        alert.at_ms // 1000,
        alert.at_ms,
        day_date(shanghai_day(alert.at_ms)),
        alert.person_ref,
        alert.card_ref,
        alert.card_masked,
        alert.institution_id,
        alert.terminal_id,
        int(alert.cardholder_facing),
        alert.detail,
    )


def sms_outcome_row(body: dict[str, Any]) -> tuple[Any, ...]:
    """The `sms_outcomes` row of a medclear.sms-outcomes record (its JSON body)."""
    at_ms = int(body["at_ms"])
    return (
        str(body["event_id"]),
        str(body["outcome"]),
        at_ms // 1000,
        at_ms,
        day_date(shanghai_day(at_ms)),
        str(body.get("kind", "")),
        int(body.get("event_at_ms", 0)),
        str(body.get("phone_masked", "")),
        int(body.get("parts", 0)),
        ",".join(body.get("smsc_message_ids", ())),
        int(bool(body.get("resent_uncertain", False))),
        str(body.get("status", "")),
    )


# ---------------------------------------------------------------------------- queries


@dataclass(frozen=True, slots=True)
class DailyTotals:
    """One institution's Beijing day in the event log (integer fen)."""

    day: dt.date
    institution_id: str
    approved_count: int
    approved_amount_fen: int
    approved_account_fen: int  # paid from personal accounts
    reversed_count: int
    reversed_fen: int  # returned to accounts by reversals of this day's swipes
    refunded_count: int
    refunded_fen: int  # refunded on this day
    net_fen: int  # approved_account_fen − reversed_fen − refunded_fen


TOTALS_VIEW = "institution_daily_totals"
_TOTALS_FILTERED_AT = "('SwipeApproved', 'SwipeReversed', 'Refunded')\n)"


def _totals_select(directory: Path = SCHEMA_DIR) -> str:
    """The select of the view `institution_daily_totals`, read from its migration, with a
    `{where}` slot inside the inner select (a filter before the aggregation) and ordered."""
    text = (directory / "002_institution_daily_totals.sql").read_text(encoding="utf-8")
    select = text.split(f"CREATE VIEW IF NOT EXISTS {TOTALS_VIEW} AS", 1)[1].strip().rstrip(";")
    if select.count(_TOTALS_FILTERED_AT) != 1:
        raise RuntimeError(f"{TOTALS_VIEW}: the view's inner filter is not where ch.py expects it")
    select = select.replace("{", "{{").replace("}", "}}")
    select = select.replace(_TOTALS_FILTERED_AT, _TOTALS_FILTERED_AT[:-2] + " {where}\n)")
    return select + "\nORDER BY settle_day, institution_id"


_TOTALS_SELECT = _totals_select()


def _as_date(day: dt.date | int) -> dt.date:
    return day_date(day) if isinstance(day, int) else day


def daily_totals(
    client: Client, day: dt.date | int, institution: str | None = None
) -> list[DailyTotals]:
    """Per institution totals of one Beijing day (a date or a Shanghai day number), the
    same figures as the view `institution_daily_totals`, with the filter applied before
    the aggregation. Exact before merges (FINAL)."""
    where = "AND original_day = %(day)s"
    params: dict[str, Any] = {"day": _as_date(day)}
    if institution is not None:
        where += " AND institution_id = %(institution)s"
        params["institution"] = institution
    rows = client.execute(_TOTALS_SELECT.format(where=where), params)
    return [DailyTotals(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """A money-moving event of a day, for detail reconciliation."""

    event_id: str
    event_type: str
    at_ms: int
    institution_id: str
    request_id: str
    original_request_id: str
    card_masked: str
    amount_fen: int
    paid_from_account_fen: int


def day_events(
    client: Client, day: dt.date | int, institution: str | None = None
) -> list[LoggedEvent]:
    """Approvals, reversals (by the day of their swipe) and refunds of one Beijing day,
    one per event id, ordered by time."""
    where = "original_day = %(day)s"
    params: dict[str, Any] = {"day": _as_date(day)}
    if institution is not None:
        where += " AND institution_id = %(institution)s"
        params["institution"] = institution
    rows = client.execute(
        "SELECT event_id, event_type, at_ms, institution_id, request_id, original_request_id,"
        " card_masked, amount_fen, paid_from_account_fen FROM events FINAL"
        " WHERE event_type IN ('SwipeApproved', 'SwipeReversed', 'Refunded') AND "
        + where
        + " ORDER BY at_ms, event_id",
        params,
    )
    return [LoggedEvent(*row) for row in rows]


def event_count(client: Client, *, final: bool = True) -> int:
    """Rows of `events`: distinct events with `final`, physical rows (duplicates before a
    merge included) without."""
    rows = client.execute(f"SELECT count() FROM events{' FINAL' if final else ''}")
    return int(rows[0][0])


def present_event_ids(client: Client, event_ids: Sequence[str]) -> set[str]:
    """Which of `event_ids` are in the log."""
    if not event_ids:
        return set()
    rows = client.execute(
        "SELECT DISTINCT event_id FROM events WHERE event_id IN %(ids)s",
        {"ids": tuple(event_ids)},
    )
    return {str(row[0]) for row in rows}


# ---------------------------------------------------------------------------- institutions' files


def insert_institution_files(
    client: Client,
    totals: Sequence[reconciliation.TotalsRow],
    details: Sequence[reconciliation.DetailLine],
    totals_source: str,
    details_source: str,
    imported_at_ms: int,
) -> None:
    """Store an institution's imported totals and detail lines (`institution_totals`,
    `institution_details`); a later import of the same day supersedes it (readers take the
    latest `imported_at_ms`)."""
    client.execute(
        "INSERT INTO institution_totals (institution_id, day, count, total_fen, account_fen,"
        " source_file, line, imported_at_ms) VALUES",
        [
            (
                r.institution_id,
                day_date(r.day),
                r.totals.count,
                r.totals.amount_fen,
                r.totals.account_fen,
                totals_source,
                r.line_no,
                imported_at_ms,
            )
            for r in totals
        ],
    )
    if details:
        client.execute(
            "INSERT INTO institution_details (institution_id, day, request_id, kind, amount_fen,"
            " account_fen, source_file, line, imported_at_ms) VALUES",
            [
                (
                    d.institution_id,
                    day_date(d.day),
                    d.request_id,
                    d.kind.value,
                    d.amount_fen,
                    d.account_fen,
                    details_source,
                    d.line_no,
                    imported_at_ms,
                )
                for d in details
            ],
        )


def institution_files(
    client: Client, day: int, institution: str | None
) -> tuple[dict[str, reconciliation.Totals], list[reconciliation.DetailLine], set[str]]:
    """The latest import per institution of the day's totals and detail lines, and the
    institutions that sent detail lines."""
    params: dict[str, Any] = {"day": day_date(day)}
    where = "day = %(day)s"
    if institution is not None:
        where += " AND institution_id = %(institution)s"
        params["institution"] = institution
    totals: dict[str, reconciliation.Totals] = {}
    for inst, count, total, account in client.execute(
        "SELECT institution_id, argMax(count, imported_at_ms), argMax(total_fen, imported_at_ms),"
        f" argMax(account_fen, imported_at_ms) FROM institution_totals WHERE {where}"
        " GROUP BY institution_id",
        params,
    ):
        totals[str(inst)] = reconciliation.Totals(int(count), int(total), int(account))
    rows = client.execute(
        "SELECT institution_id, request_id, kind, amount_fen, account_fen, line, imported_at_ms"
        f" FROM institution_details WHERE {where}",
        params,
    )
    latest: dict[str, int] = {}
    for row in rows:
        latest[row[0]] = max(latest.get(row[0], 0), int(row[6]))
    kind_of = reconciliation.DetailKind
    lines = [
        reconciliation.DetailLine(
            str(inst), day, str(request_id), kind_of(kind), int(amount), int(account), int(line)
        )
        for inst, request_id, kind, amount, account, line, imported in rows
        if int(imported) == latest[inst]
    ]
    return totals, lines, set(latest)
