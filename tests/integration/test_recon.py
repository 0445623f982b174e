"""Settlement and reconciliation (对账) on the real stack: swipes, a reversal and a refund
through the gateway; the settlement job's records on `medclear.settlements`; the ClickHouse
log written by the sink job; an institution file made from the truth with three injected
mismatches, which `medclear recon` finds, and nothing else; the conservation check."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openpyxl
import pytest

from clearing import reconciliation
from clearing import settlement as rules
from clearing.calendar import shanghai_day
from clearing.codes import ResultCode
from clearing.money import format_yuan
from medclear import stack
from medclear.cli.recon import log_figures, read_settlements, reconcile
from medclear.cli.recon_report import summary
from medclear.infra.exits import Exit
from medclear.infra.settings import Settings
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc, registry_pb2_grpc
from stream_jobs import ch
from tests.integration.running import running_stack
from tests.integration.test_swipe_e2e import authorize, enrol

pytestmark = [
    pytest.mark.stack,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
    pytest.mark.timeout(240),
]

PHARMACY = "310101P00002"
REPO = Path(__file__).resolve().parents[2]
HOSPITAL = "310101H00002"
CAUGHT_UP_TIMEOUT_S = 40.0


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        state_dir=tmp_path_factory.mktemp("recon") / ".medclear",
        terminal_security=False,
        tls=False,
        command_partitions=2,
        event_partitions=2,
        jobs="clickhouse-sink,settlement",  # the two jobs this test reads (MEDCLEAR_JOBS)
        decision_deadline_ms=15_000,  # a loaded test machine: no TIMEOUT answers
    )


@pytest.fixture(scope="module")
def endpoints(settings: Settings) -> Iterator[stack.Endpoints]:
    with running_stack(settings) as endpoints:
        yield endpoints


def medclear(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MEDCLEAR_STATE_DIR": str(settings.state_dir),
        "MEDCLEAR_EVENT_PARTITIONS": "2",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "medclear", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )


def reverse(
    pos: pos_pb2_grpc.PosServiceStub,
    card: str,
    terminal: str,
    institution: str,
    original_trace: int,
    trace: int,
) -> pos_pb2.ReverseReply:
    reply: pos_pb2.ReverseReply = pos.Reverse(
        pos_pb2.ReverseRequest(
            terminal=common_pb2.TerminalContext(
                terminal_id=terminal, institution_id=institution, trace_number=trace
            ),
            original_trace_number=original_trace,
            card_no=card,
        ),
        timeout=10,
    )
    return reply


def refund(
    pos: pos_pb2_grpc.PosServiceStub,
    card: str,
    terminal: str,
    institution: str,
    original_trace: int,
    trace: int,
    amount_fen: int,
) -> pos_pb2.RefundReply:
    reply: pos_pb2.RefundReply = pos.Refund(
        pos_pb2.RefundRequest(
            terminal=common_pb2.TerminalContext(
                terminal_id=terminal, institution_id=institution, trace_number=trace
            ),
            original_trace_number=original_trace,
            card_no=card,
            amount_fen=amount_fen,
        ),
        timeout=10,
    )
    return reply


def wait_for(what: str, check: object, timeout_s: float = CAUGHT_UP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()  # type: ignore[operator]
        if last is True:
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached within {timeout_s} s: {last}")


def test_recon_finds_exactly_the_injected_mismatches_and_money_is_conserved(
    endpoints: stack.Endpoints, settings: Settings, tmp_path: Path
) -> None:
    started = time.monotonic()
    with grpc.insecure_channel(endpoints.registry) as channel:
        registry = registry_pb2_grpc.CardRegistryServiceStub(channel)
        people = [enrol(registry, 700 + i, 500_00) for i in range(3)]
    day = shanghai_day(time.time_ns() // 1_000_000)
    expected_net = {PHARMACY: 0, HOSPITAL: 0}
    with grpc.insecure_channel(endpoints.gateway) as channel:
        pos = pos_pb2_grpc.PosServiceStub(channel)
        plan = [  # (person, institution, terminal, trace, amount)
            (0, PHARMACY, "TR-P1", 1, 12_50),
            (0, HOSPITAL, "TR-H1", 2, 80_00),
            (1, PHARMACY, "TR-P1", 3, 25_30),
            (1, HOSPITAL, "TR-H1", 4, 40_00),
            (2, PHARMACY, "TR-P1", 5, 7_20),
            (2, HOSPITAL, "TR-H1", 6, 150_00),
            (2, HOSPITAL, "TR-H2", 7, 9_90),
        ]
        for person, institution, terminal, trace, amount in plan:
            reply = authorize(pos, people[person][1], amount, trace, institution, terminal)
            assert ResultCode(reply.result) == ResultCode.OK, reply.message
            expected_net[institution] += amount
        # a reversal (冲正) of a hospital swipe, a partial refund (退费) of a pharmacy one
        undo = reverse(pos, people[1][1], "TR-H1", HOSPITAL, 4, 104)
        assert ResultCode(undo.result) == ResultCode.OK and undo.reversed_amount_fen == 40_00
        back = refund(pos, people[1][1], "TR-P1", PHARMACY, 3, 103, 5_30)
        assert ResultCode(back.result) == ResultCode.OK and back.refunded_amount_fen == 5_30
        expected_net[HOSPITAL] -= 40_00
        expected_net[PHARMACY] -= 5_30
        # a repeat of a swipe is answered from memory: no second event, nothing settles twice
        assert authorize(pos, people[0][1], 12_50, 1, PHARMACY, "TR-P1").replayed
    if shanghai_day(time.time_ns() // 1_000_000) != day:
        pytest.skip("the run straddled Beijing midnight")

    # settlement (Kafka state) and the ClickHouse log (sink) both catch up
    def settled() -> object:
        totals = reconciliation.settlement_totals(read_settlements(endpoints.kafka()), day)
        got = {inst: t.account_fen for inst, t in totals.items()}
        return got == expected_net or got

    wait_for("settlement records", settled)
    client = ch.connect(endpoints.clickhouse_url, settings.clickhouse_database)

    def logged() -> object:
        got = {t.institution_id: t.net_fen for t in ch.daily_totals(client, day)}
        return got == expected_net or got

    wait_for("the ClickHouse log", logged)
    records = {r.institution_id: r for r in read_settlements(endpoints.kafka()) if r.day == day}
    hospital = records[HOSPITAL]
    assert (hospital.approved.count, hospital.reversed, hospital.closed) == (
        4,
        rules.Line(1, 40_00),
        False,
    )
    assert records[PHARMACY].refunded == rules.Line(1, 5_30)

    # the institution files, made from the truth (the log's lines) ...
    truth_totals, truth_lines, flows = log_figures(client, day, None)
    lines = list(truth_lines)
    pharmacy_swipes = [x for x in lines if x.institution_id == PHARMACY and x.kind == "swipe"]
    dropped, changed = pharmacy_swipes[0], pharmacy_swipes[1]
    # ... with three mismatches: a transaction the institution lacks, a changed amount,
    # and an extra line medclear never saw
    lines.remove(dropped)
    lines[lines.index(changed)] = reconciliation.DetailLine(
        changed.institution_id,
        day,
        changed.request_id,
        changed.kind,
        changed.amount_fen + 1_00,
        changed.account_fen + 1_00,
    )
    extra = reconciliation.DetailLine(
        PHARMACY, day, "TR-P9:999", reconciliation.DetailKind.SWIPE, 3_00, 3_00
    )
    lines.append(extra)
    totals_csv, details_csv = tmp_path / "totals.csv", tmp_path / "details.csv"
    totals_csv.write_text(_totals_csv(day, lines), encoding="utf-8")
    details_csv.write_text(_details_csv(lines), encoding="utf-8")
    assert truth_totals[HOSPITAL].account_fen == expected_net[HOSPITAL]

    imported = medclear(settings, "recon", "import", str(totals_csv), "--detail", str(details_csv))
    assert imported.returncode == 0, imported.stdout + imported.stderr

    report = reconcile(settings, day, None)
    status = {r.institution_id: r.status for r in report.rows}
    assert status == {
        HOSPITAL: reconciliation.Status.MATCHED,
        PHARMACY: reconciliation.Status.MISMATCHED,
    }
    found = {(d.request_id, d.issue) for d in report.diffs}
    assert found == {
        (dropped.request_id, reconciliation.DetailIssue.MISSING_IN_FILE),
        (changed.request_id, reconciliation.DetailIssue.AMOUNT_DIFFERS),
        (extra.request_id, reconciliation.DetailIssue.MISSING_IN_MEDCLEAR),
    }, summary(report)

    html_path = tmp_path / "recon.html"
    ran = medclear(settings, "recon", "--date", rules.iso_day(day), "--report", str(html_path))
    assert ran.returncode == Exit.DIFFERENCES, ran.stdout + ran.stderr
    assert "1 matched, 1 mismatched; 3 detail difference(s)" in ran.stdout, ran.stdout
    page = html_path.read_text(encoding="utf-8")
    assert "<svg" in page and dropped.request_id in page and "missing in medclear" in page
    print("\n" + ran.stdout)  # the text summary of the report (pytest -s)
    check_report_in_chromium(html_path, flows, tmp_path)

    # the same comparison for a script (--json, fen) and for a spreadsheet (--csv, yuan)
    as_json = medclear(
        settings,
        "recon",
        "--date",
        rules.iso_day(day),
        "--json",
        "--csv",
        str(tmp_path / "csv"),
        "--xlsx",
        str(tmp_path / "recon.xlsx"),
        "--report",
        str(html_path),
    )
    assert as_json.returncode == Exit.DIFFERENCES, as_json.stderr
    data = json.loads(as_json.stdout)
    assert {i["institution_id"]: i["status"] for i in data["institutions"]} == {
        HOSPITAL: "matched",
        PHARMACY: "mismatched",
    }
    by_id = {d["request_id"]: d for d in data["details"]}
    assert by_id[changed.request_id]["institution_amount_fen"] == changed.amount_fen + 1_00
    assert by_id[changed.request_id]["medclear_amount_fen"] == changed.amount_fen
    assert by_id[extra.request_id]["medclear_amount_fen"] is None
    with (tmp_path / "csv" / "details.csv").open(encoding="utf-8-sig", newline="") as f:
        rows = {r["request_id"]: r for r in csv.DictReader(f)}
    assert rows[changed.request_id]["institution_amount_yuan"] == format_yuan(
        changed.amount_fen + 1_00
    )
    with (tmp_path / "csv" / "institutions.csv").open(encoding="utf-8-sig", newline="") as f:
        assert {r["institution_id"] for r in csv.DictReader(f)} == {HOSPITAL, PHARMACY}
    book = openpyxl.load_workbook(tmp_path / "recon.xlsx")
    details = list(book["details"].iter_rows(values_only=True))
    header, lines_in_book = details[0], {row[1]: row for row in details[1:]}
    changed_row = lines_in_book[changed.request_id]
    assert changed_row[header.index("institution_amount_yuan")] == (changed.amount_fen + 1_00) / 100
    statuses = {
        row[0]: row[1] for row in book["institutions"].iter_rows(min_row=2, values_only=True)
    }
    assert statuses == {HOSPITAL: "matched", PHARMACY: "mismatched"}

    only_hospital = medclear(
        settings,
        "recon",
        "run",
        "--date",
        rules.iso_day(day),
        "--institution",
        HOSPITAL,
        "--report",
        str(tmp_path / "h.html"),
    )
    assert only_hospital.returncode == 0, only_hospital.stdout + only_hospital.stderr

    bad = tmp_path / "bad.csv"
    bad.write_text(
        "institution_id,day,count,total_amount,account_amount\n"
        f"{PHARMACY},{rules.iso_day(day)},2,1.234,1.00\n"
        f"{PHARMACY},2026-02-30,1,1.00,1.00\n"
    )
    refused = medclear(settings, "recon", "import", str(bad))
    assert (
        refused.returncode == 1 and f"{bad}:2:" in refused.stderr and f"{bad}:3:" in refused.stderr
    )

    # a check right after a swipe waits for settlement to count it (it raced before)
    with grpc.insecure_channel(endpoints.gateway) as channel:
        late = authorize(
            pos_pb2_grpc.PosServiceStub(channel), people[0][1], 3_50, 8, HOSPITAL, "TR-H1"
        )
        assert ResultCode(late.result) == ResultCode.OK, late.message
    check = medclear(settings, "recon", "check")
    assert check.returncode == 0 and "money is conserved" in check.stdout, (
        check.stdout + check.stderr
    )
    print(check.stdout)
    assert time.monotonic() - started < 120


def _totals_csv(day: int, lines: list[reconciliation.DetailLine]) -> str:
    """The institution's totals follow its own detail lines (injected changes included)."""
    out = ["institution_id,day,count,total_amount,account_amount"]
    for inst in sorted({x.institution_id for x in lines}):
        mine = [x for x in lines if x.institution_id == inst]
        sign = {reconciliation.DetailKind.SWIPE: 1, reconciliation.DetailKind.REFUND: -1}
        total = sum(sign[x.kind] * x.amount_fen for x in mine)
        account = sum(sign[x.kind] * x.account_fen for x in mine)
        out.append(
            f"{inst},{rules.iso_day(day)},{len(mine)},{format_yuan(total)},{format_yuan(account)}"
        )
    return "\n".join(out) + "\n"


def _details_csv(lines: list[reconciliation.DetailLine]) -> str:
    out = ["institution_id,day,request_id,kind,amount,account_amount"]
    out += [
        f"{x.institution_id},{rules.iso_day(x.day)},{x.request_id},{x.kind.value},"
        f"{format_yuan(x.amount_fen)},{format_yuan(x.account_fen)}"
        for x in lines
    ]
    return "\n".join(out) + "\n"


def check_report_in_chromium(page: Path, flows: dict[str, Any], tmp_path: Path) -> None:
    """The HTML report as a browser renders it: one chart bar per kind and institution,
    each bar's label the log's own amount, the widest bar the largest amount; a
    screenshot kept in test-artifacts/recon/."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed")
    browser = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1200,1400",
    ]
    dom = subprocess.run(
        [*browser, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    bars = re.findall(r'<rect[^>]*width="(\d+)"[^>]*><title>(\w+) ¥(-?[\d.]+)</title>', dom)
    assert len(bars) == 4 * len(flows), dom[:2000]
    shown = {(kind, amount) for _w, kind, amount in bars}
    for totals in flows.values():
        assert ("approved", format_yuan(totals.approved_account_fen)) in shown
        assert ("net", format_yuan(totals.net_fen)) in shown
    widest = max(bars, key=lambda b: int(b[0]))
    assert abs(float(widest[2])) == max(abs(float(b[2])) for b in bars)
    artifacts = REPO / "test-artifacts" / "recon"
    artifacts.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [*browser, f"--screenshot={artifacts / 'recon-report.png'}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
