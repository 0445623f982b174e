"""`medclear recon ...`: reconciliation (对账) of medclear's settlement with the
institutions' own files, and the conservation check. The rules and the comparisons are
pure (clearing/settlement.py, clearing/reconciliation.py); this module reads the sources
and runs the commands; medclear/cli/recon_report.py prints and writes the reports.

`medclear recon import FILE [--detail FILE]` validates an institution's totals CSV
(对总账) and optionally its detail CSV, reporting every error with file:line and storing
nothing if there is any, then stores them in ClickHouse `institution_totals` /
`institution_details` (stream_jobs/schema/510_recon.sql). A re-import supersedes the
earlier one: readers take the latest `imported_at_ms`.

`medclear recon --date D [--institution I]` (or `recon run`) compares three views of one
Beijing day per designated institution:
- medclear's settlement: the latest record of each `institution:YYYY-MM-DD` key on the
  `medclear.settlements` topic, plus the adjustment lines of later days that name D;
- the event log: ClickHouse `events FINAL` (exact before merges), through
  stream_jobs/ch.py;
- the institution's imported file.
It prints matched / mismatched / missing per institution and the transaction-level
differences (missing in the file, missing in medclear, amount differs), and writes a
self-contained HTML report with an inline SVG of each institution's flow. Exit 4 means
differences were found (1: the comparison could not run). Count = transactions (swipes
that stand + refunds); amounts are net. Settlement keeps no cash part, so total amounts
compare the log with the file only.

`medclear recon check`: credits − balances = settled + pending, over all persons and
institutions. Credits and balances come from `medclear.events`, each event once; a
person's balance is the `balance_after` of their last money event in partition order,
which is decision order (`at_ms` can tie or run backwards between gateways, and ClickHouse
has no sequence column, so it cannot say which event was last). Settled and pending are
the closed and open records of `medclear.settlements`. Per person, the log's own
arithmetic is checked against the recorded balance.

Both commands first wait (`await_jobs`, up to 30 s) until the jobs that count an event
have committed every event on their topics (the settlement route and settle groups, and
for `run` the ClickHouse sink), so a report made right after a swipe includes it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clearing import codec, reconciliation
from clearing import settlement as rules
from clearing.model import AccountCredited, Refunded, SwipeApproved, SwipeReversed
from clearing.money import format_yuan
from clearing.redact import PERSON_TOKEN_PREFIX
from clearing.validate import mask_ssn
from medclear.cli.recon_report import (
    Report,
    console,
    detail_records,
    institution_records,
    print_report,
    render_html,
    write_csv,
    write_xlsx,
)
from medclear.cli.support import fail
from medclear.infra import kafka_access, topics
from medclear.infra.exits import Exit
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.kafka_admin import read_topic, wait_caught_up
from medclear.infra.settings import Settings, get_settings
from medclear.infra.stack_state import StackError, load_endpoints
from stream_jobs import ch
from stream_jobs import settlement as settlement_job
from stream_jobs.clickhouse_sink import GROUP_ID as SINK_GROUP

recon_app = typer.Typer(
    help="Reconciliation (对账) per designated institution per Beijing day: medclear's "
    "settlement (topic medclear.settlements), the ClickHouse event log and the "
    "institution's file. `medclear recon import FILE` loads a file; `medclear recon --date "
    "YYYY-MM-DD` compares (same as `recon run`); `medclear recon check` checks that money "
    "is conserved.",
    invoke_without_command=True,
)
err = Console(stderr=True)


# ---------------------------------------------------------------------------- sources


def _servers(settings: Settings) -> tuple[KafkaAccess, str]:
    """(the broker, as the recon principal; the ClickHouse URL): the settings, else the
    local stack's."""
    kafka = kafka_access.from_settings(settings, kafka_access.RECON)
    ch_url = settings.clickhouse_url
    if not kafka.bootstrap or not ch_url:
        try:
            endpoints = load_endpoints(settings)
        except StackError as exc:
            raise fail(str(exc)) from exc
        if not kafka.bootstrap:
            kafka = endpoints.kafka(kafka_access.RECON)
        ch_url = ch_url or endpoints.clickhouse_url
    return kafka, ch_url


def _clickhouse(settings: Settings) -> Any:
    _bootstrap, url = _servers(settings)
    try:
        client = ch.connect(url, settings.clickhouse_database)
        ch.migrate(client)  # the recon tables (stream_jobs/schema/510_recon.sql) and the log's
    except Exception as exc:
        raise fail(f"ClickHouse {url}: {type(exc).__name__}: {exc}") from exc
    return client


def await_jobs(kafka: KafkaAccess, stages: tuple[tuple[str, str], ...]) -> None:
    """Wait until the jobs that count an event (settlement, the sink) have committed every
    event on the topics now, so a report made right after a swipe includes it. If they do
    not catch up in time, say how far behind they are and go on: a difference may be that."""
    with err.status("waiting for the settlement job and the sink to catch up"):
        try:
            behind = asyncio.run(wait_caught_up(kafka, stages))
        except Exception as exc:
            raise fail(f"reading the jobs' offsets: {type(exc).__name__}: {exc}") from exc
    for group, lag in behind.items():
        err.print(
            f"[yellow]{group} is {lag:,} records behind; what it has not counted "
            "yet shows as a difference[/]"
        )


def read_settlements(kafka: KafkaAccess) -> list[rules.DaySettlement]:
    """The latest record of each key of the settlements topic."""
    latest: dict[bytes, bytes] = {}
    for key, value in asyncio.run(read_topic(kafka, topics.SETTLEMENTS.name)):
        if key is not None and value is not None:
            latest[key] = value
    return [rules.decode_record(value) for value in latest.values()]


@dataclass
class Accounts:
    """What the events topic says about the personal accounts."""

    credits_fen: int = 0
    balances_fen: int = 0
    persons: int = 0
    events: int = 0
    redelivered: int = 0
    person_differences: list[tuple[str, int, int]] | None = None  # person token, log, expected


def read_accounts(kafka: KafkaAccess) -> Accounts:
    """Credits and current balances from `medclear.events`, each event once (by id).

    A person's balance is the balance_after of their last money event in partition order:
    events are keyed by person, so a partition holds a person's events in the order the
    one worker that owns the person decided them. (`at_ms` is the ingress stamp and can
    tie or run backwards between gateways, so ClickHouse, which has no sequence column,
    cannot say which event was last.) Per person the log's arithmetic (credits − paid +
    returned) is checked against that balance too."""
    seen: set[str] = set()
    last_balance: dict[str, int] = {}
    arithmetic: dict[str, int] = {}
    accounts = Accounts(person_differences=[])
    for _key, raw in asyncio.run(read_topic(kafka, topics.EVENTS.name)):
        if raw is None:
            continue
        try:
            event = codec.decode(raw)
        except codec.CodecError:
            continue
        if not isinstance(event, AccountCredited | SwipeApproved | SwipeReversed | Refunded):
            continue
        if event.event_id in seen:
            accounts.redelivered += 1
            continue
        seen.add(event.event_id)
        accounts.events += 1
        if isinstance(event, AccountCredited):
            accounts.credits_fen += event.amount_fen
            change = event.amount_fen
        elif isinstance(event, SwipeApproved):
            change = -event.paid_from_account_fen
        else:
            change = event.amount_fen
        person = event.person_ref or event.ssn  # published events name the person by token
        arithmetic[person] = arithmetic.get(person, 0) + change
        last_balance[person] = event.balance_after_fen
    accounts.balances_fen = sum(last_balance.values())
    accounts.persons = len(last_balance)
    assert accounts.person_differences is not None
    for person, balance in sorted(last_balance.items()):
        if balance != arithmetic[person]:
            shown = person if person.startswith(PERSON_TOKEN_PREFIX) else mask_ssn(person)
            accounts.person_differences.append((shown, balance, arithmetic[person]))
    return accounts


def log_figures(
    client: Any, day: int, institution: str | None
) -> tuple[dict[str, reconciliation.Totals], list[reconciliation.DetailLine], dict[str, Any]]:
    """The day from the ClickHouse log: totals and detail lines (clearing.settlement's
    log_view over `events FINAL`), and each institution's flow (stream_jobs.ch)."""
    swipes: list[reconciliation.LogSwipe] = []
    reversals: list[reconciliation.LogReturn] = []
    refunds: list[reconciliation.LogReturn] = []
    for e in ch.day_events(client, day, institution):
        if e.event_type == "SwipeApproved":
            swipes.append(
                reconciliation.LogSwipe(
                    e.institution_id, e.request_id, e.amount_fen, e.paid_from_account_fen
                )
            )
        elif e.event_type == "SwipeReversed":
            reversals.append(
                reconciliation.LogReturn(e.institution_id, e.original_request_id, e.amount_fen)
            )
        elif e.event_type == "Refunded":
            refunds.append(reconciliation.LogReturn(e.institution_id, e.request_id, e.amount_fen))
    totals, lines = reconciliation.log_view(day, swipes, reversals, refunds)
    flows = {t.institution_id: t for t in ch.daily_totals(client, day, institution)}
    return totals, lines, flows


# ---------------------------------------------------------------------------- import


@recon_app.command("import")
def import_(
    file: Annotated[
        Path, typer.Argument(help="daily totals CSV (对总账)", exists=True, dir_okay=False)
    ],
    detail: Annotated[
        Path | None,
        typer.Option(
            help="detail lines CSV (one line per transaction)", exists=True, dir_okay=False
        ),
    ] = None,
) -> None:
    """Import an institution's daily totals (对总账) and, optionally, its detail lines.

    Totals CSV header: institution_id,day,count,total_amount,account_amount — one line per
    institution and day; day YYYY-MM-DD (Beijing); count = transactions (swipes that stand,
    i.e. not reversed, plus refunds); amounts in yuan with at most two decimals, net of
    refunds (account_amount: paid from personal accounts, the amount the fund owes).

    Detail CSV header: institution_id,day,request_id,kind,amount,account_amount — one line
    per transaction; request_id = terminal id:trace number; kind swipe or refund.

    Every error is reported with its file and line, and then nothing is stored. A file
    imported again replaces the earlier import of the same institution and day.
    """
    totals, errors = reconciliation.parse_totals(file.read_text(encoding="utf-8-sig"), str(file))
    details: list[reconciliation.DetailLine] = []
    if detail is not None:
        details, detail_errors = reconciliation.parse_details(
            detail.read_text(encoding="utf-8-sig"), str(detail)
        )
        errors += detail_errors
    if errors:
        for message in errors:
            err.print(f"[red]{escape(message)}[/]")
        raise fail(f"{len(errors)} error(s); nothing imported")
    ch.insert_institution_files(
        _clickhouse(get_settings()),
        totals,
        details,
        str(file),
        str(detail),
        time.time_ns() // 1_000_000,
    )
    console.print(_imported_table(file, detail, totals, details))


def _imported_table(
    file: Path,
    detail: Path | None,
    totals: list[reconciliation.TotalsRow],
    details: list[reconciliation.DetailLine],
) -> Table:
    table = Table(title=f"imported {file.name}" + (f" and {detail.name}" if detail else ""))
    for column in ("institution", "day", "count", "total ¥", "account ¥", "detail lines"):
        table.add_column(column, justify="left" if column in ("institution", "day") else "right")
    for r in totals:
        n = sum(1 for d in details if (d.institution_id, d.day) == (r.institution_id, r.day))
        assert r.totals.amount_fen is not None
        table.add_row(
            r.institution_id,
            rules.iso_day(r.day),
            str(r.totals.count),
            format_yuan(r.totals.amount_fen),
            format_yuan(r.totals.account_fen),
            str(n),
        )
    return table


# ---------------------------------------------------------------------------- run


def reconcile(settings: Settings, day: int, institution: str | None) -> Report:
    kafka, _url = _servers(settings)
    client = _clickhouse(settings)
    await_jobs(kafka, (*settlement_job.STAGES, (SINK_GROUP, topics.EVENTS.name)))
    try:
        records = read_settlements(kafka)
    except Exception as exc:
        raise fail(f"reading {topics.SETTLEMENTS.name}: {type(exc).__name__}: {exc}") from exc
    settled = reconciliation.settlement_totals(records, day)
    if institution is not None:
        settled = {k: v for k, v in settled.items() if k == institution}
    log_totals, log_lines, flows = log_figures(client, day, institution)
    file_totals, file_lines, with_details = ch.institution_files(client, day, institution)
    rows = reconciliation.compare_totals(settled, log_totals, file_totals)
    diffs = reconciliation.compare_details(log_lines, file_lines, with_details)
    return Report(day, rows, diffs, flows, with_details)


def _default_report(settings: Settings, day: int) -> Path:
    return settings.state_dir / "reports" / f"recon-{rules.iso_day(day)}.html"


DateOpt = Annotated[str | None, typer.Option("--date", help="Beijing day YYYY-MM-DD")]
InstitutionOpt = Annotated[str | None, typer.Option(help="only this institution id")]
ReportOpt = Annotated[
    Path | None,
    typer.Option(help="HTML report path; default .medclear/reports/recon-<day>.html"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the comparison as JSON (fen)")]
XlsxOpt = Annotated[
    Path | None,
    typer.Option(
        "--xlsx", help="also write the comparison as an Excel workbook (yuan)", dir_okay=False
    ),
]
CsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--csv", help="also write institutions.csv and details.csv (yuan) here", file_okay=False
    ),
]


def _run(
    date: str,
    institution: str | None,
    report_path: Path | None,
    as_json: bool = False,
    csv_dir: Path | None = None,
    xlsx: Path | None = None,
) -> None:
    try:
        day = rules.day_number(date)
    except ValueError as exc:
        raise fail(f"--date {date!r} is not YYYY-MM-DD") from exc
    settings = get_settings()
    report = reconcile(settings, day, institution)
    path = report_path or _default_report(settings, day)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    written = write_csv(report, csv_dir) if csv_dir is not None else []
    if xlsx is not None:
        written.append(write_xlsx(report, xlsx))
    if as_json:  # stdout is the JSON alone; what was written goes to stderr
        print(
            json.dumps(
                {
                    "day": date,
                    "differences": report.differences,
                    "institutions": institution_records(report),
                    "details": detail_records(report),
                    "report": str(path),
                },
                ensure_ascii=False,
                indent=2,
            )
        )
        for file in written:
            err.print(f"wrote {file}")
    else:
        print_report(report)
        console.print(f"report: {path}" + "".join(f" · {file}" for file in written))
    if report.differences:
        raise typer.Exit(code=Exit.DIFFERENCES)


@recon_app.callback()
def recon(
    ctx: typer.Context,
    date: DateOpt = None,
    institution: InstitutionOpt = None,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
    csv_dir: CsvOpt = None,
    xlsx: XlsxOpt = None,
) -> None:
    """Reconcile one Beijing day (--date) or run a subcommand (import, run, check).

    Exit code 0: everything matched; 4: differences found (listed, and in the report);
    1: the comparison could not run.
    """
    if ctx.invoked_subcommand is not None:
        return
    if date is None:
        console.print(ctx.get_help())
        raise typer.Exit(code=0)
    _run(date, institution, report, as_json, csv_dir, xlsx)


@recon_app.command("run")
def run(
    date: Annotated[str, typer.Option("--date", help="Beijing day YYYY-MM-DD")],
    institution: InstitutionOpt = None,
    report: ReportOpt = None,
    as_json: JsonOpt = False,
    csv_dir: CsvOpt = None,
    xlsx: XlsxOpt = None,
) -> None:
    """Compare one Beijing day: medclear's settlement, the ClickHouse log and each
    institution's imported file; print matched / mismatched / missing per institution and
    the transactions missing on either side; write a self-contained HTML report with a
    chart of each institution's flow (approved, reversed, refunded, net).

    Settlement's figures for the day include the adjustment lines of later days that name
    it (late reversals and refunds after the cut-off). Its total amount (with cash) is
    not kept by settlement; that column compares the log and the file. --json prints the
    comparison as JSON (amounts in fen); --csv DIR writes it as two CSV files and --xlsx
    FILE as a workbook (yuan)."""
    _run(date, institution, report, as_json, csv_dir, xlsx)


# ---------------------------------------------------------------------------- check


@recon_app.command("check")
def check() -> None:
    """Conservation over all persons and institutions: credits − balances = settled + pending.

    credits: every allocation (拨付) in the events topic; balances: each person's balance
    after their last money event (partition order = decision order); settled / pending:
    the net of the closed / open days on the settlements topic. Each event counts once
    (by id). It first waits (up to 30 s) until the settlement job has counted every event
    on the topic, so a check right after a swipe includes it. Any difference is reported
    (exit 4); under traffic, the swipes still in flight show as one. Per person, the
    log's own arithmetic is also checked against the balance the worker recorded."""
    settings = get_settings()
    kafka, _url = _servers(settings)
    await_jobs(kafka, settlement_job.STAGES)
    try:
        accounts = read_accounts(kafka)
        records = read_settlements(kafka)
    except Exception as exc:
        raise fail(f"reading the topics: {type(exc).__name__}: {exc}") from exc
    settled, pending = rules.settled_and_pending(records)
    result = rules.Conservation(accounts.credits_fen, accounts.balances_fen, settled, pending)
    table = Table(title="conservation: credits − balances = settled + pending")
    table.add_column("figure")
    table.add_column("¥", justify="right")
    for name, fen in (
        ("credits (allocations)", result.credits_fen),
        (f"balances ({accounts.persons:,} persons)", result.balances_fen),
        (
            f"settled ({sum(1 for r in records if r.closed):,} closed institution-days)",
            result.settled_fen,
        ),
        (
            f"pending ({sum(1 for r in records if not r.closed):,} open institution-days)",
            result.pending_fen,
        ),
        ("difference", result.difference_fen),
    ):
        table.add_row(name, format_yuan(fen))
    console.print(table)
    console.print(
        f"{accounts.events:,} money events read once ({accounts.redelivered:,} "
        "redelivered copies skipped)"
    )
    people = accounts.person_differences or []
    for masked, balance, expected in people[:20]:
        console.print(
            f"[red]person {masked}: balance {format_yuan(balance)}, the log's "
            f"arithmetic {format_yuan(expected)}[/]"
        )
    if result.holds and not people:
        console.print("[green]money is conserved[/]")
        return
    err.print(
        f"[bold red]difference:[/] {format_yuan(result.difference_fen)} "
        f"({len(people)} person(s) inconsistent)"
    )
    raise typer.Exit(code=Exit.DIFFERENCES)
