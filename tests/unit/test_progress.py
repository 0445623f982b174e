"""Progress when nobody watches a terminal: a plain line every few seconds, and the last
state at the end (medclear/infra/progress.py)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from medclear.infra.progress import LineProgress, progress_bar


def test_a_log_gets_lines_with_counts_and_the_final_state() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with progress_bar(console) as progress:
        assert isinstance(progress, LineProgress)
        progress.every_s = 0.0  # a line at every step, for the test
        task = progress.add_task("seeding persons", total=3, info="")
        progress.advance(task)
        progress.update(task, completed=3, info="done")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("seeding persons: 1/3 in ")
    assert lines[-1].startswith("seeding persons: 3/3 in ") and lines[-1].endswith("· done")


def test_lines_are_spaced_by_the_interval() -> None:
    out = io.StringIO()
    progress = LineProgress(Console(file=out, force_terminal=False), every_s=3600)
    task = progress.add_task("swipes", total=None)
    for _ in range(1000):
        progress.advance(task)
    assert out.getvalue() == ""  # within the hour: nothing yet
    progress.print_all()
    assert out.getvalue().startswith("swipes: 1,000 in ")


def test_a_terminal_gets_the_rich_bar() -> None:
    console = Console(file=io.StringIO(), force_terminal=True)
    with progress_bar(console) as progress:
        assert isinstance(progress, Progress)
