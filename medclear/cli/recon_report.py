"""What `medclear recon` shows and writes: the terminal table, the CSV and xlsx files and
the self-contained HTML report (an inline SVG of each institution's flow). The comparison
itself is clearing/reconciliation.py's; reading the sources is medclear/cli/recon.py's.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clearing import reconciliation
from clearing import settlement as rules
from clearing.money import format_yuan

console = Console()  # `medclear recon` prints here too (the demo captures it)


@dataclass
class Report:
    day: int
    rows: list[reconciliation.ReconRow]
    diffs: list[reconciliation.DetailDiff]
    flows: dict[str, Any]  # institution → stream_jobs.ch.DailyTotals
    detail_institutions: set[str]

    @property
    def differences(self) -> int:
        return sum(1 for r in self.rows if r.status != reconciliation.Status.MATCHED) + len(
            self.diffs
        )


def _money(totals: reconciliation.Totals | None, what: str) -> str:
    if totals is None:
        return "—"
    value = totals.account_fen if what == "account" else totals.amount_fen
    return "n/a" if value is None else format_yuan(value)


STATUS_STYLE = {
    reconciliation.Status.MATCHED: "green",
    reconciliation.Status.MISMATCHED: "red",
    reconciliation.Status.MISSING_IN_FILE: "yellow",
    reconciliation.Status.MISSING_IN_MEDCLEAR: "yellow",
}


def print_report(report: Report) -> None:
    table = Table(title=f"reconciliation {rules.iso_day(report.day)} (Beijing)")
    table.add_column("institution")
    table.add_column("status")
    table.add_column("count\nsettle / log / file", justify="right")
    table.add_column("account ¥\nsettle / log / file", justify="right")
    table.add_column("total ¥\nlog / file", justify="right")
    table.add_column("notes")
    for r in report.rows:
        counts = " / ".join(
            "—" if t is None else str(t.count) for t in (r.settlement, r.log, r.file)
        )
        account = " / ".join(_money(t, "account") for t in (r.settlement, r.log, r.file))
        total = " / ".join(_money(t, "total") for t in (r.log, r.file))
        style = STATUS_STYLE[r.status]
        table.add_row(
            r.institution_id,
            f"[{style}]{r.status.value}[/]",
            counts,
            account,
            total,
            escape("; ".join(r.notes)),
        )
    console.print(table)
    if report.diffs:
        detail = Table(title="detail differences (transaction by transaction)")
        for column in ("institution", "request id", "kind", "issue", "medclear ¥", "institution ¥"):
            detail.add_column(column)
        for d in report.diffs:
            detail.add_row(*_diff_fields(d))
        console.print(detail)
    console.print(summary(report))


def summary(report: Report) -> str:
    """`2 matched, 1 mismatched; 3 detail difference(s)`."""
    by_status = {s: sum(1 for r in report.rows if r.status == s) for s in reconciliation.Status}
    head = ", ".join(f"{n} {s.value}" for s, n in by_status.items() if n) or "no institutions"
    return f"{head}; {len(report.diffs)} detail difference(s)"


def _diff_fields(d: reconciliation.DetailDiff) -> tuple[str, ...]:
    """A detail difference as the report's columns (terminal and HTML alike)."""
    return (
        d.institution_id,
        d.request_id,
        d.kind.value,
        d.issue.value,
        _line_money(d.medclear),
        _line_money(d.institution),
    )


def _line_money(line: reconciliation.DetailLine | None) -> str:
    if line is None:
        return "—"
    return f"{format_yuan(line.amount_fen)} (account {format_yuan(line.account_fen)})"


def _totals_fields(prefix: str, totals: reconciliation.Totals | None) -> dict[str, int | None]:
    if totals is None:
        return {
            f"{prefix}_count": None,
            f"{prefix}_amount_fen": None,
            f"{prefix}_account_fen": None,
        }
    return {
        f"{prefix}_count": totals.count,
        f"{prefix}_amount_fen": totals.amount_fen,
        f"{prefix}_account_fen": totals.account_fen,
    }


def institution_records(report: Report) -> list[dict[str, Any]]:
    """One record per institution: its status and the three views' figures (fen)."""
    return [
        {
            "institution_id": r.institution_id,
            "status": r.status.value,
            **_totals_fields("settlement", r.settlement),
            **_totals_fields("log", r.log),
            **_totals_fields("file", r.file),
            "notes": list(r.notes),
        }
        for r in report.rows
    ]


def detail_records(report: Report) -> list[dict[str, Any]]:
    """One record per transaction-level difference (fen)."""

    def fen(line: reconciliation.DetailLine | None, what: str) -> int | None:
        return getattr(line, what) if line is not None else None

    return [
        {
            "institution_id": d.institution_id,
            "request_id": d.request_id,
            "kind": d.kind.value,
            "issue": d.issue.value,
            "medclear_amount_fen": fen(d.medclear, "amount_fen"),
            "medclear_account_fen": fen(d.medclear, "account_fen"),
            "institution_amount_fen": fen(d.institution, "amount_fen"),
            "institution_account_fen": fen(d.institution, "account_fen"),
            "institution_line": d.institution.line_no if d.institution is not None else None,
        }
        for d in report.diffs
    ]


def _as_yuan(record: dict[str, Any]) -> dict[str, Any]:
    """The CSV's columns: every *_fen as yuan with two decimals (Excel reads it)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key.endswith("_fen"):
            out[key.removesuffix("_fen") + "_yuan"] = "" if value is None else format_yuan(value)
        else:
            out[key] = "; ".join(value) if isinstance(value, list) else value
    return out


def write_csv(report: Report, directory: Path) -> list[Path]:
    """institutions.csv and details.csv (UTF-8 with a BOM, for Excel) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records, columns in (
        ("institutions.csv", institution_records(report), INSTITUTION_COLUMNS),
        ("details.csv", detail_records(report), DETAIL_COLUMNS),
    ):
        path = directory / name
        with path.open("w", encoding="utf-8-sig", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=[_yuan_name(c) for c in columns])
            writer.writeheader()
            writer.writerows(_as_yuan(r) for r in records)
        written.append(path)
    return written


def write_xlsx(report: Report, path: Path) -> Path:
    """One workbook, a sheet per view (institutions, details): yuan as numbers formatted
    with two decimals, a header row frozen and filtered."""
    # imported here, when a workbook is written: openpyxl takes ~0.06 s to import, and the
    # commands that reach this module (demo, bench, drill) paid it for their --help
    from openpyxl import Workbook

    book = Workbook()
    sheets = (
        ("institutions", institution_records(report), INSTITUTION_COLUMNS),
        ("details", detail_records(report), DETAIL_COLUMNS),
    )
    for index, (title, records, columns) in enumerate(sheets):
        sheet = book.active if index == 0 else book.create_sheet()
        assert sheet is not None
        sheet.title = title
        sheet.append([_yuan_name(c) for c in columns])
        for record in records:
            sheet.append([_cell(record[c], c) for c in columns])
        for number, column in enumerate(columns, start=1):
            if column.endswith("_fen"):
                for (cell,) in sheet.iter_rows(min_row=2, min_col=number, max_col=number):
                    cell.number_format = "0.00"
        sheet.freeze_panes = "A2"
        sheet.auto_filter.ref = sheet.dimensions
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


def _cell(value: Any, column: str) -> Any:
    """A workbook cell: fen as yuan (a number), notes joined, None left empty."""
    if isinstance(value, list):
        return "; ".join(value)
    if column.endswith("_fen") and value is not None:
        return value / FEN_PER_YUAN
    return value


FEN_PER_YUAN = 100


def _yuan_name(column: str) -> str:
    return column.removesuffix("_fen") + "_yuan" if column.endswith("_fen") else column


INSTITUTION_COLUMNS = (
    "institution_id",
    "status",
    "settlement_count",
    "settlement_amount_fen",
    "settlement_account_fen",
    "log_count",
    "log_amount_fen",
    "log_account_fen",
    "file_count",
    "file_amount_fen",
    "file_account_fen",
    "notes",
)


DETAIL_COLUMNS = (
    "institution_id",
    "request_id",
    "kind",
    "issue",
    "medclear_amount_fen",
    "medclear_account_fen",
    "institution_amount_fen",
    "institution_account_fen",
    "institution_line",
)


CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}
.matched{color:#1a7f37}.mismatched{color:#cf222e;font-weight:bold}.missing{color:#9a6700}
.note{color:#555;text-align:left}
"""


BAR_COLOURS = {
    "approved": "#2da44e",
    "reversed": "#cf222e",
    "refunded": "#bf8700",
    "net": "#0969da",
}


CHART_BAR_PX = 14


CHART_WIDTH_PX = 420


def _flow_chart(flows: dict[str, Any]) -> str:
    """An inline SVG: per institution, horizontal bars for approved, reversed, refunded
    (paid from / returned to accounts) and the net owed."""
    if not flows:
        return "<p>No money moved in the log on this day.</p>"
    series = {
        inst: {
            "approved": t.approved_account_fen,
            "reversed": t.reversed_fen,
            "refunded": t.refunded_fen,
            "net": t.net_fen,
        }
        for inst, t in sorted(flows.items())
    }
    scale = max(1, max(abs(v) for s in series.values() for v in s.values()))
    label_px, row_px = 130, CHART_BAR_PX * 4 + 14
    height = row_px * len(series) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_px + CHART_WIDTH_PX + 120}" '
        f'height="{height}" role="img" aria-label="flow per institution">'
    ]
    for i, (inst, values) in enumerate(series.items()):
        top = i * row_px + 10
        parts.append(
            f'<text x="0" y="{top + 2 * CHART_BAR_PX}" font-size="12">{html.escape(inst)}</text>'
        )
        for j, (name, fen) in enumerate(values.items()):
            y = top + j * CHART_BAR_PX
            width = round(abs(fen) * CHART_WIDTH_PX / scale)
            parts.append(
                f'<rect x="{label_px}" y="{y}" width="{width}" height="{CHART_BAR_PX - 2}" '
                f'fill="{BAR_COLOURS[name]}"><title>{name} ¥{format_yuan(fen)}</title></rect>'
            )
            parts.append(
                f'<text x="{label_px + width + 4}" y="{y + CHART_BAR_PX - 4}" '
                f'font-size="10">{name} ¥{format_yuan(fen)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _cells(*values: str) -> str:
    return "".join(f"<td>{html.escape(v)}</td>" for v in values)


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts)."""
    day = rules.iso_day(report.day)
    rows: list[str] = []
    for r in report.rows:
        css = {"matched": "matched", "mismatched": "mismatched"}.get(r.status.value, "missing")
        rows.append(
            f'<tr><td>{html.escape(r.institution_id)}</td><td class="{css}">'
            f"{html.escape(r.status.value)}</td>"
            + _cells(*("—" if t is None else str(t.count) for t in (r.settlement, r.log, r.file)))
            + _cells(*(_money(t, "account") for t in (r.settlement, r.log, r.file)))
            + _cells(*(_money(t, "total") for t in (r.log, r.file)))
            + f'<td class="note">{html.escape("; ".join(r.notes))}</td></tr>'
        )
    diff_rows = ["<tr>" + _cells(*_diff_fields(d)) + "</tr>" for d in report.diffs]
    details_note = (
        "Detail lines were compared for: " + ", ".join(sorted(report.detail_institutions)) + "."
        if report.detail_institutions
        else "No institution sent detail lines for this day."
    )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!DOCTYPE html>
<html lang="zh-CN"><head><meta charset="utf-8">
<title>medclear reconciliation {day}</title><style>{CSS}</style></head>
<body>
<h1>Reconciliation (对账) {day} (Beijing)</h1>
<p>{html.escape(summary(report))}. Generated {generated}.</p>
<h2>Totals per institution</h2>
<table><tr><th>institution</th><th>status</th><th>count settlement</th><th>count log</th>
<th>count file</th><th>account ¥ settlement</th><th>account ¥ log</th><th>account ¥ file</th>
<th>total ¥ log</th><th>total ¥ file</th><th>notes</th></tr>
{"".join(rows)}</table>
<p>Counts are transactions: swipes that stand (not reversed) plus refunds. Account amounts
are net: paid from personal accounts − reversed − refunded, what the fund owes. Settlement
does not keep the cash part, so total amounts compare the log with the file.</p>
<h2>The day's flow per institution (personal accounts, from the log)</h2>
{_flow_chart(report.flows)}
<h2>Detail differences</h2>
<p>{html.escape(details_note)}</p>
<table><tr><th>institution</th><th>request id</th><th>kind</th><th>issue</th>
<th>medclear</th><th>institution</th></tr>
{"".join(diff_rows) or '<tr><td colspan="6">none</td></tr>'}</table>
</body></html>
"""


def iter_report_lines(report: Report) -> Iterator[str]:
    """A plain-text summary of a report (for logs and notes)."""
    for r in report.rows:
        yield f"{r.institution_id}: {r.status.value}" + (
            f" ({'; '.join(r.notes)})" if r.notes else ""
        )
    for d in report.diffs:
        yield f"{d.institution_id} {d.request_id} {d.kind.value}: {d.issue.value}"
