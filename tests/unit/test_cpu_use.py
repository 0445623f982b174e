"""CPU accounting of the swipe benchmark, against this very process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from medclear.bench import cpu_use


def test_a_busy_process_shows_its_cpu_seconds_and_a_gone_one_none() -> None:
    before = cpu_use.cpu_seconds(os.getpid())
    assert before is not None
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = cpu_use.cpu_seconds(os.getpid())
    assert after is not None and after - before >= 0.1
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert cpu_use.cpu_seconds(child.pid) is None


def test_cpu_per_swipe_is_the_difference_over_the_swipes_of_processes_seen_twice() -> None:
    before = {"gateway": 1.0, "worker-0": 2.0, "sms": 0.5}
    after = {"gateway": 3.0, "worker-0": 2.5}  # sms exited in between
    assert cpu_use.per_unit_ms(before, after, 1000) == {"gateway": 2.0, "worker-0": 0.5}
    assert cpu_use.per_unit_ms(before, after, 0) == {}
