"""CPU time used by the processes of the local stack, from /proc (Linux).

The swipe benchmark reads it before and after each measurement and divides by the swipes
made: CPU milliseconds per swipe, per process. On a machine with few cores this says which
process holds the throughput, and whether a target is reachable at all on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
LOAD_GENERATOR = "load generator (this process)"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces: count fields after its closing ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / CLOCK_TICKS_PER_S


def snapshot(processes: Iterable[tuple[str, int | None]]) -> dict[str, float]:
    """CPU seconds so far of each named process, and of this process (the load generator)."""
    used: dict[str, float] = {}
    for name, pid in processes:
        seconds = cpu_seconds(pid) if pid is not None else None
        if seconds is not None:
            used[name] = seconds
    times = os.times()
    used[LOAD_GENERATOR] = times.user + times.system
    return used


def per_unit_ms(
    before: Mapping[str, float], after: Mapping[str, float], units: int
) -> dict[str, float]:
    """CPU milliseconds per unit of work of each process seen in both snapshots."""
    if units <= 0:
        return {}
    return {name: (after[name] - before[name]) * 1000 / units for name in before if name in after}
