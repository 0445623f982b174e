"""What every process's /metrics says about itself, and the bounded per-institution series."""

from __future__ import annotations

import socket
import urllib.request

from clearing.model import Policy
from monitoring import metrics
from stream_jobs.worker import zero_swipe_series


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_build_info_names_the_version_python_and_role() -> None:
    port = free_port()
    metrics.serve(port, "127.0.0.1", "worker-0")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("medclear_build_info{"))
    assert 'role="worker-0"' in line and 'python="3.' in line and 'version="' in line
    assert line.endswith(" 1.0")


def test_the_per_institution_series_have_two_outcomes_not_every_result_code() -> None:
    metrics.INSTITUTION_SWIPES.labels("310101P00001", "declined").inc()
    samples = [s for family in metrics.INSTITUTION_SWIPES.collect() for s in family.samples]
    assert samples and all(set(s.labels) == {"institution", "outcome"} for s in samples)


def test_every_swipe_series_exists_at_zero_before_the_first_swipe() -> None:
    zero_swipe_series(Policy())
    samples = {
        (s.labels["result"], s.labels["institution_type"]): s.value
        for family in metrics.SWIPES.collect()
        for s in family.samples
        if s.name == "medclear_swipes_total"
    }
    assert samples[("CARD_LOST", "pharmacy")] == 0.0
    assert samples[("PIN_TRIES_EXCEEDED", "unknown")] == 0.0
