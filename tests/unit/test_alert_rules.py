"""The alert rules load in Prometheus and behave as their unit tests say (`promtool`),
and every alert has a runbook section."""

from __future__ import annotations

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
    done = subprocess.run([PROMTOOL or "", "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    tests = ROOT / "monitoring" / "tests" / "alerts_test.yml"
    done = subprocess.run([PROMTOOL or "", "test", "rules", str(tests)], capture_output=True,
                          text=True, timeout=60, cwd=tests.parent)  # fmt: skip
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
