"""`medclear bench seed` on a real stack of its own: figures on stdout as JSON, every
consumer caught up, nothing killed at `down`, and the stack wiped."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def test_bench_seed_prints_its_figures_and_leaves_nothing_behind() -> None:
    before = set(Path(tempfile.gettempdir()).glob("medclear-bench-seed-*"))
    done = subprocess.run(
        [sys.executable, "-m", "medclear", "bench", "seed", "--persons", "300", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert figures["persons"] == 300 and figures["persons_per_s"] > 0
    assert figures["behind"] == {} and figures["killed"] == []
    assert figures["broker_disk_bytes"] > 0 and 0 < figures["down_s"] < 10
    used = figures["cpu_ms_per_person"]
    assert used["worker-0"] > 0 and used["registry"] > 0
    assert set(Path(tempfile.gettempdir()).glob("medclear-bench-seed-*")) == before
