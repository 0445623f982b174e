"""`medclear demo`, the main job, as a newcomer runs it (output not a terminal): the
counters open while the city is still being enrolled, a line of progress every few
seconds, then the day's reconciliation matches and the stack is stopped (--stop)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIRST_SWIPE_S_MAX = 90.0  # issue 18: swipes flowing within 90 s of the stack being ready


def test_the_demo_serves_while_it_enrols_and_reconciles_its_day(tmp_path: Path) -> None:
    env = {**os.environ, "MEDCLEAR_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medclear",
            "demo",
            "--persons",
            "3000",
            "--minutes",
            "0.3",
            "--concurrency",
            "8",
            "--stop",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    progress = [ln for ln in out.splitlines() if ln.startswith("demo: ")]
    assert len(progress) >= 2, out[-4000:]  # lines, not a panel printed once at the end
    enrolled = re.search(r"enrolled ([\d,]+) of 3,000 persons while the counters served", out)
    assert enrolled is not None and int(enrolled.group(1).replace(",", "")) >= 200, out[-4000:]
    first = re.search(r"the first swipe answered ([\d.]+) s after `medclear demo` started", out)
    ready = re.search(r"stack ready in ([\d.]+) s", out)
    assert first is not None and ready is not None, out[-4000:]
    assert float(first.group(1)) - float(ready.group(1)) < FIRST_SWIPE_S_MAX
    assert re.search(r"reconciliation: \d+ matched; 0 detail difference", out), out[-4000:]
    assert "stopped broker-0" in out + done.stderr
