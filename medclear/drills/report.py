"""A drill's result and how it is judged and shown: DrillResult holds the figures a drill
gathered, verdicts turns them into failed checks, results_table into one table for every
drill run. Among the figures, the time to recover: fault injected → the first approval of
a swipe sent after it, and fault injected → the pipeline drained (ClickHouse, SMS and
settlement caught up)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from clearing.money import format_yuan
from medclear.drills.bounds import SECONDS_LISTED_MAX, SMS_DOUBLES_ALLOWED
from medclear.drills.checks import SmsCount


@dataclass
class DrillResult:
    name: str
    fault: str
    injected: int = 0
    recovery_s: list[float] = field(default_factory=list)  # injected → first approval after
    repair_s: list[float] = field(default_factory=list)  # injected → repaired (ready again)
    drained_s: float | None = None  # (last) injected → ClickHouse, SMS, settlement caught up
    sent: int = 0
    approved: int = 0
    results: Counter[str] = field(default_factory=Counter)
    undecided_answers: Counter[str] = field(default_factory=Counter)
    verified_in_state: int = 0
    in_clickhouse_once: int = 0
    clickhouse_duplicate_rows: int = 0  # physical rows ReplacingMergeTree has not merged yet
    sms: SmsCount | None = None
    conservation_ok: bool = False
    conservation_difference_fen: int = 0
    # swipes sent while a fault lasted (injected → repaired and a swipe approved again):
    # how many, how many got no definite answer at the first attempt (asked again after
    # the traffic stopped), and the latency of those answered at once
    fault_sent: int = 0
    fault_retried: int = 0
    fault_latencies_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""
    sms_doubles_allowed: int = SMS_DOUBLES_ALLOWED

    @property
    def ok(self) -> bool:
        return not self.problems

    def fault_percentile_ms(self, q: float) -> float | None:
        """A percentile of the latencies of the swipes answered at once during a fault."""
        values = sorted(self.fault_latencies_ms)
        if not values:
            return None
        return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


Swipe = tuple[float, float | None, int]  # first sent, answered at (monotonic), attempts


def during_faults(
    windows: Sequence[tuple[float, float]], swipes: Sequence[Swipe]
) -> tuple[int, int, list[float]]:
    """Of swipes (first sent, answered at, attempts) those first sent inside a window:
    (how many, how many needed another attempt, the latencies in ms of the others)."""
    inside = [s for s in swipes if any(start <= s[0] <= end for start, end in windows)]
    retried = [s for s in inside if s[2] > 1 or s[1] is None]
    latencies = [(s[1] - s[0]) * 1000 for s in inside if s[2] == 1 and s[1] is not None]
    return len(inside), len(retried), latencies


def verdicts(r: DrillResult) -> list[str]:
    """The drill's failed checks (pure: from the figures it gathered)."""
    out: list[str] = []
    if r.skipped:
        return out
    if r.approved == 0:
        out.append("no swipe was approved")
    if r.verified_in_state != r.approved:
        out.append(f"{r.approved - r.verified_in_state} approved swipes not found in state")
    if r.in_clickhouse_once != r.approved:
        out.append(
            f"{r.approved - r.in_clickhouse_once} approved swipes not exactly once in "
            "ClickHouse (events FINAL)"
        )
    if r.sms is not None and r.sms.doubled > r.sms_doubles_allowed:
        out.append(f"{r.sms.doubled} SMS doubled")
    if r.sms is not None and r.sms.missing:
        out.append(f"{r.sms.missing} approved swipes got no SMS")
    if not r.conservation_ok:
        out.append(f"conservation: difference {format_yuan(r.conservation_difference_fen)}")
    if len(r.recovery_s) < r.injected:
        out.append("no swipe was approved after a fault")
    if r.drained_s is None:
        out.append("the pipeline did not drain")
    return out


def format_seconds(values: Sequence[float]) -> str:
    """Repair or recovery times: one, a few listed, or the max and median of many."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} s"
    if len(values) <= SECONDS_LISTED_MAX:
        return f"max {max(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"
    return f"max {max(values):.1f} s, median {statistics.median(values):.1f} s of {len(values)}"


def _fault_p99(r: DrillResult) -> str:
    p99 = r.fault_percentile_ms(0.99)
    if p99 is None:
        return "-"
    again = f", {r.fault_retried} asked again" if r.fault_retried else ""
    return f"{p99:,.0f} ms ({r.fault_sent}{again})"


def results_table(results: Sequence[DrillResult]) -> Table:
    table = Table(title="fault drills", title_justify="left")
    for column, justify in (
        ("drill", "left"),
        ("fault", "left"),
        ("repaired after", "right"),
        ("recovered after", "right"),
        ("drained after", "right"),
        ("p99 in fault", "right"),
        ("approved", "right"),
        ("in state", "right"),
        ("ClickHouse once", "right"),
        ("SMS doubled", "right"),
        ("conservation", "center"),
        ("verdict", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        if r.skipped:
            table.add_row(r.name, escape(r.fault), *["-"] * 9, f"[yellow]skipped[/]: {r.skipped}")
            continue
        sms = "n/a" if r.sms is None else f"{r.sms.doubled} of {r.sms.expected}"
        table.add_row(
            r.name,
            escape(r.fault),
            format_seconds(r.repair_s),
            format_seconds(r.recovery_s),
            f"{r.drained_s:.1f} s" if r.drained_s is not None else "-",
            _fault_p99(r),
            f"{r.approved:,} of {r.sent:,}",
            f"{r.verified_in_state:,}",
            f"{r.in_clickhouse_once:,}",
            sms,
            "[green]ok[/]" if r.conservation_ok else "[red]FAILED[/]",
            "[green]passed[/]" if r.ok else "[red]" + escape("; ".join(r.problems)) + "[/]",
        )
    return table
