"""The alert rules load in Prometheus and behave as their unit tests say (`promtool`),
and every alert has a runbook section."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "alerts.yml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt prometheus)"
)


@needs_promtool
def test_rules_are_valid() -> None:
    done = subprocess.run(
        [PROMTOOL or "", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    tests = ROOT / "monitoring" / "tests" / "alerts_test.yml"
    done = subprocess.run(
        [PROMTOOL or "", "test", "rules", str(tests)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tests.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_and_has_a_runbook_section() -> None:
    alerts = re.findall(r"- alert: (\w+)", RULES.read_text())
    tested = set(
        re.findall(r"alertname: (\w+)", (RULES.parent / "tests" / "alerts_test.yml").read_text())
    )
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^## (\w+)", runbook, re.M)}
    assert len(alerts) >= 8
    assert set(alerts) <= tested, set(alerts) - tested
    assert {a.lower() for a in alerts} <= headings, {a.lower() for a in alerts} - headings


def test_every_alert_has_a_summary_a_description_and_its_runbook_url() -> None:
    """Prometheus's conventions: `summary` (one line, may template), `description` (what
    it means for the cardholders or the operators), `runbook_url` (its section)."""
    blocks = re.split(r"(?m)^\s+- alert: ", RULES.read_text())[1:]
    assert len(blocks) >= 8
    for block in blocks:
        name = block.split("\n")[0].strip()
        annotations = block.split("annotations:", 1)[1]
        for key in ("summary", "description", "runbook_url"):
            assert re.search(rf"(?m)^\s+{key}: \S", annotations), (name, key)
        assert f"runbook_url: docs/RUNBOOK.md#{name.lower()}\n" in annotations, name


def test_the_dashboards_keep_beijing_time_and_grafana_rate_windows() -> None:
    """Grafana conventions of monitoring/dashboards: the time zone is Asia/Shanghai (so
    "today" is the Beijing day), short rates use $__rate_interval, and "today" panels
    read $__range from the start of the day."""
    for path in sorted((ROOT / "monitoring" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        assert board["timezone"] == "Asia/Shanghai", path.name
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                # a short fixed window is Grafana's job ($__rate_interval); an hour or a day
                # is a deliberate span (a rare event's quantile)
                assert not re.search(r"\brate\([^)]*\[\d+[sm]\]", expr), (path.name, expr)
                if "$__range" in expr:
                    assert panel.get("timeFrom") == "now/d", (path.name, panel["title"])
