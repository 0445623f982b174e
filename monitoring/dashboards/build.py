"""Writes the Grafana dashboards (JSON, schema 39) next to this file.

    .venv/bin/python monitoring/dashboards/build.py

The JSON files are the artifact operators import; this script is how they are made, so
every panel has the same datasource, units and layout. tests/integration checks that
every query returns data from the Prometheus of a running test stack.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel(
    title: str,
    exprs: dict[str, str],
    unit: str = "short",
    kind: str = "timeseries",
    width: int = 12,
    today: bool = False,
) -> dict[str, Any]:
    """A panel; `today`: the Beijing calendar day so far (the dashboard's time zone is
    Asia/Shanghai; its queries use $__range, instant)."""
    extra: dict[str, Any] = {"timeFrom": "now/d", "hideTimeOverride": False} if today else {}
    return extra | {
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
                **({"instant": True, "range": False} if today else {}),
            }
            for i, (legend, expr) in enumerate(exprs.items())
        ],
    }


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], variables: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    x = y = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        w = p["gridPos"]["w"]
        if x + w > 24:
            x, y = 0, y + 8
        p["gridPos"].update(x=x, y=y)
        x += w
    templating = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        *variables,
    ]
    return {
        "uid": uid,
        "title": title,
        "tags": ["medclear"],
        "schemaVersion": 39,
        "timezone": "Asia/Shanghai",  # "today" is the Beijing calendar day
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

OVERVIEW = dashboard(
    "medclear-overview",
    "medclear — operators' overview",
    [
        panel(
            "Swipes per second by result",
            {"{{result}}": "sum by (result) (rate(medclear_swipes_total[$__rate_interval]))"},
            "reqps",
        ),
        panel(
            "Decline rate",
            {
                "declined": 'sum(rate(medclear_swipes_total{result!~"OK|PARTIALLY_APPROVED"}'
                "[$__rate_interval]))"
                " / sum(rate(medclear_swipes_total[$__rate_interval]))"
            },
            "percentunit",
        ),
        panel(
            "Swipe latency at the gateway (p50 / p99)",
            {
                "p50": "histogram_quantile(0.50, sum by (le) (rate("
                'medclear_gateway_request_seconds_bucket{method="Authorize"}[$__rate_interval])))',
                "p99": "histogram_quantile(0.99, sum by (le) (rate("
                'medclear_gateway_request_seconds_bucket{method="Authorize"}'
                "[$__rate_interval])))",
            },
            "s",
        ),
        panel(
            "Worker time per step (p99)",
            {
                "{{step}}": "histogram_quantile(0.99, sum by (le, step) (rate("
                "medclear_worker_step_seconds_bucket[$__rate_interval])))"
            },
            "s",
        ),
        panel(
            "HSM time per operation (p99)",
            {
                "{{operation}}": "histogram_quantile(0.99, sum by (le, operation) (rate("
                "medclear_hsm_operation_seconds_bucket[$__rate_interval])))"
            },
            "s",
        ),
        panel(
            "Swipes by institution type",
            {
                "{{institution_type}}": "sum by (institution_type) (rate("
                "medclear_swipes_total[$__rate_interval]))"
            },
            "reqps",
        ),
        panel(
            "Consumer lag by stream job",
            {"{{stream_job}}": "sum by (stream_job) (medclear_consumer_lag_records)"},
        ),
        panel("Processes ready", {"{{job}} {{instance}}": "medclear_ready"}, kind="stat", width=24),
        panel(
            "SMS sent, failed and retried per minute",
            {
                "sent": "sum(rate(medclear_sms_sent_total[$__rate_interval])) * 60",
                "failed": "sum(rate(medclear_sms_failed_total[$__rate_interval])) * 60"
                " or vector(0)",
                "retried": "sum(rate(medclear_sms_retries_total[$__rate_interval])) * 60",
            },
        ),
        panel("ClickHouse sink lag", {"lag": "max(medclear_clickhouse_sink_lag_seconds)"}, "s"),
        panel(
            "Component restarts (watcher, 1 h)",
            {
                "{{component}}": "sum by (component)"
                " (increase(medclear_component_restarts_total[1h])) or vector(0)"
            },
        ),
        panel(
            "Abnormal transactions (10 min)",
            {"{{kind}}": "sum by (kind) (increase(medclear_abnormal_alerts_total[10m]))"},
        ),
        panel(
            "Loss report to first refused swipe (p50)",
            {
                "p50": "histogram_quantile(0.5, sum by (le) (rate("
                "medclear_card_block_to_first_refusal_seconds_bucket[1h])))"
            },
            "s",
        ),
    ],
)

INSTITUTION = dashboard(
    "medclear-institution",
    "medclear — institutions",
    [
        panel(
            "Swipes by institution, approved and declined",
            {
                "{{institution}} {{outcome}}": "sum by (institution, outcome) (rate("
                'medclear_institution_swipes_total{institution=~"$institution"}[$__rate_interval]))'
            },
            "reqps",
            width=24,
        ),
        panel(
            "Paid from accounts (yuan per minute)",
            {
                "{{institution}}": "sum by (institution) (rate(medclear_institution_paid_fen_total"
                '{institution=~"$institution"}[$__rate_interval])) * 60 / 100'
            },
            "currencyCNY",
        ),
        panel(
            "Declined swipes (codes for all institutions: overview)",
            {
                "{{institution}}": "sum by (institution) (rate(medclear_institution_swipes_total"
                '{institution=~"$institution", outcome="declined"}[$__rate_interval]))'
            },
            "reqps",
        ),
    ],
    [INSTITUTION_VAR],
)

RECONCILIATION = dashboard(
    "medclear-reconciliation",
    "medclear — reconciliation",
    [
        panel(
            "Paid from accounts today (Beijing day), by institution (yuan)",
            {
                "{{institution}}": "sum by (institution) (increase("
                "medclear_institution_paid_fen_total[$__range])) / 100"
            },
            "currencyCNY",
            "bargauge",
            today=True,
        ),
        panel(
            "Returned to accounts (reversals + refunds, yuan per minute)",
            {
                "returned": "sum(rate(medclear_institution_returned_fen_total[$__rate_interval]))"
                " * 60 / 100"
            },
            "currencyCNY",
        ),
        panel(
            "Approved swipes today (Beijing day) by institution",
            {
                "{{institution}}": "sum by (institution) (increase("
                'medclear_institution_swipes_total{outcome="approved"}[$__range]))'
            },
            kind="bargauge",
            today=True,
        ),
        panel(
            "Institutions with an open settlement day",
            {"open": "max(medclear_settlement_open_institutions)"},
        ),
        panel(
            "Settlement events applied per second",
            {"applied": "sum(rate(medclear_settlement_events_total[$__rate_interval]))"},
            "reqps",
        ),
    ],
)

DASHBOARDS = {
    "overview.json": OVERVIEW,
    "institution.json": INSTITUTION,
    "reconciliation.json": RECONCILIATION,
}


def queries(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


if __name__ == "__main__":
    for name, board in DASHBOARDS.items():
        (HERE / name).write_text(json.dumps(board, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {HERE / name} ({len(board['panels'])} panels)")
