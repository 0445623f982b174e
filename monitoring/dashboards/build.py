"""Writes the Grafana dashboards (JSON, schema 39) next to this file.

    .venv/bin/python monitoring/dashboards/build.py

The JSON files are the artifact operators import; this script is how they are made, so
every panel has the same datasource, units and layout. tests/integration checks that
every query returns data from the Prometheus of a running test stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel(title: str, exprs: dict[str, str], unit: str = "short", kind: str = "timeseries",
          width: int = 12) -> dict[str, Any]:  # fmt: skip
    return {
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"h": 8, "w": width},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
            }
            for i, (legend, expr) in enumerate(exprs.items())
        ],
    }


def dashboard(uid: str, title: str, panels: list[dict[str, Any]],
              variables: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]  # fmt: skip
    x = y = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        w = p["gridPos"]["w"]
        if x + w > 24:
            x, y = 0, y + 8
        p["gridPos"].update(x=x, y=y)
        x += w
    templating = [{"name": "datasource", "type": "datasource", "query": "prometheus",
                   "label": "Prometheus"}, *variables]  # fmt: skip
    return {
        "uid": uid,
        "title": title,
        "tags": ["medclear"],
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {"list": templating},
        "panels": panels,
    }


INSTITUTION_VAR = {
    "name": "institution",
    "type": "query",
    "label": "Institution",
    "datasource": DATASOURCE,
    "query": "label_values(medclear_institution_swipes_total, institution)",
    "includeAll": True,
    "multi": True,
    "allValue": ".*",
}

OVERVIEW = dashboard("medclear-overview", "medclear — operators' overview", [
    panel("Swipes per second by result", {
        "{{result}}": "sum by (result) (rate(medclear_swipes_total[1m]))"}, "reqps"),
    panel("Decline rate", {
        "declined": 'sum(rate(medclear_swipes_total{result!~"OK|PARTIALLY_APPROVED"}[5m]))'
                    " / sum(rate(medclear_swipes_total[5m]))"}, "percentunit"),
    panel("Swipe latency at the gateway (p50 / p99)", {
        "p50": "histogram_quantile(0.50, sum by (le) (rate("
               'medclear_gateway_request_seconds_bucket{method="Authorize"}[1m])))',
        "p99": "histogram_quantile(0.99, sum by (le) (rate("
               'medclear_gateway_request_seconds_bucket{method="Authorize"}[1m])))'}, "s"),
    panel("Worker time per step (p99)", {
        "{{step}}": "histogram_quantile(0.99, sum by (le, step) (rate("
                    "medclear_worker_step_seconds_bucket[1m])))"}, "s"),
    panel("HSM time per operation (p99)", {
        "{{operation}}": "histogram_quantile(0.99, sum by (le, operation) (rate("
                         "medclear_hsm_operation_seconds_bucket[5m])))"}, "s"),
    panel("Swipes by institution type", {
        "{{institution_type}}": "sum by (institution_type) (rate(medclear_swipes_total[5m]))"},
        "reqps"),
    panel("Consumer lag by stream job", {
        "{{stream_job}}": "sum by (stream_job) (medclear_consumer_lag_records)"}),
    panel("Processes ready", {"{{job}} {{instance}}": "medclear_ready"}, kind="stat", width=24),
    panel("Abnormal transactions (10 min)", {
        "{{kind}}": "sum by (kind) (increase(medclear_abnormal_alerts_total[10m]))"}),
    panel("Loss report to first refused swipe (p50)", {
        "p50": "histogram_quantile(0.5, sum by (le) (rate("
               "medclear_card_block_to_first_refusal_seconds_bucket[1h])))"}, "s"),
])  # fmt: skip

INSTITUTION = dashboard("medclear-institution", "medclear — institutions", [
    panel("Swipes by institution, approved and declined", {
        "{{institution}} {{outcome}}": "sum by (institution, outcome) (rate("
        'medclear_institution_swipes_total{institution=~"$institution"}[5m]))'}, "reqps", width=24),
    panel("Paid from accounts (yuan per minute)", {
        "{{institution}}": "sum by (institution) (rate(medclear_institution_paid_fen_total"
        '{institution=~"$institution"}[5m])) * 60 / 100'}, "currencyCNY"),
    panel("Declined swipes (codes for all institutions: overview)", {
        "{{institution}}": "sum by (institution) (rate(medclear_institution_swipes_total"
        '{institution=~"$institution", outcome="declined"}[5m]))'}, "reqps"),
], [INSTITUTION_VAR])  # fmt: skip

RECONCILIATION = dashboard("medclear-reconciliation", "medclear — reconciliation", [
    panel("Paid from accounts today, by institution (yuan)", {
        "{{institution}}": "sum by (institution) (increase("
        "medclear_institution_paid_fen_total[1d])) / 100"}, "currencyCNY", "bargauge"),
    panel("Returned to accounts (reversals + refunds, yuan per minute)", {
        "returned": "sum(rate(medclear_institution_returned_fen_total[5m])) * 60 / 100"},
        "currencyCNY"),
    panel("Approved swipes today by institution", {
        "{{institution}}": "sum by (institution) (increase("
        'medclear_institution_swipes_total{outcome="approved"}[1d]))'},
        kind="bargauge"),
])  # fmt: skip

DASHBOARDS = {"overview.json": OVERVIEW, "institution.json": INSTITUTION,
              "reconciliation.json": RECONCILIATION}  # fmt: skip


def queries(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


if __name__ == "__main__":
    for name, board in DASHBOARDS.items():
        (HERE / name).write_text(json.dumps(board, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {HERE / name} ({len(board['panels'])} panels)")
