"""The demo writes each institution's own files from what its terminals were told; they
must parse as `medclear recon import` expects and add up."""

from __future__ import annotations

from pathlib import Path

from clearing import reconciliation
from medclear.sim.demo import DemoStats, Sale, institution_files


def test_institution_files_parse_and_add_up(tmp_path: Path) -> None:
    stats = DemoStats()
    day = "2026-11-23"
    stats.sales += [
        Sale("TP1", 1, "S26000001", "310101P00001", 35_20, 35_20, day),
        Sale(
            "TP1",
            2,
            "S26000002",
            "310101P00001",
            10_00,
            4_00,
            day,
            refunded_fen=1_00,
            refund_trace=9,
        ),
        Sale("TP1", 3, "S26000003", "310101P00001", 99_00, 99_00, day, reversed=True),
        Sale("TH1", 1, "S26000004", "310101H00001", 120_00, 120_00, day),
    ]
    files = institution_files(stats, tmp_path)
    assert len(files) == 2
    by_inst = {}
    for totals_path, detail_path in files:
        totals, errors = reconciliation.parse_totals(totals_path.read_text(), str(totals_path))
        details, detail_errors = reconciliation.parse_details(
            detail_path.read_text(), str(detail_path)
        )
        assert errors == [] and detail_errors == []
        by_inst[totals[0].institution_id] = (totals[0], details)
    pharmacy, lines = by_inst["310101P00001"]
    t = pharmacy.totals
    assert (t.count, t.amount_fen, t.account_fen) == (3, 35_20 + 10_00 - 1_00, 35_20 + 4_00 - 1_00)
    assert sorted(line.request_id for line in lines) == ["TP1:1", "TP1:2", "TP1:9"]
    hospital, _ = by_inst["310101H00001"]
    assert (hospital.totals.count, hospital.totals.account_fen) == (1, 120_00)
