"""Progress of long work, for a person watching or a log: a rich bar on a terminal, a
plain line every few seconds otherwise (a CI log, `make demo > file`, a pipe), so that
minutes of seeding never look like a hang.

`progress_bar()` returns either; both take `add_task`, `advance`, `update` as rich's
Progress does, and print the last state when the block ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

PLAIN_LINE_EVERY_S = 5.0


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    info: str = ""
    started: float = field(default_factory=time.monotonic)


class LineProgress:
    """Rich Progress's methods, printed as a line per task every `every_s` seconds."""

    def __init__(self, console: Console, every_s: float = PLAIN_LINE_EVERY_S) -> None:
        self.console = console
        self.every_s = every_s
        self.tasks: list[_Task] = []
        self._last_line = time.monotonic()

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> TaskID:
        self.tasks.append(_Task(description, total, info=str(fields.get("info", ""))))
        return TaskID(len(self.tasks) - 1)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.tasks[task_id].completed += advance
        self._maybe_print()

    def update(self, task_id: TaskID, **changes: Any) -> None:
        task = self.tasks[task_id]
        if "completed" in changes:
            task.completed = float(changes["completed"])
        if "advance" in changes:
            task.completed += float(changes["advance"])
        if "total" in changes:
            task.total = changes["total"]
        if "info" in changes:
            task.info = str(changes["info"])
        self._maybe_print()

    def line(self, task: _Task) -> str:
        elapsed = time.monotonic() - task.started
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        done = f"{task.completed:,.0f}" + (f"/{task.total:,.0f}" if task.total else "")
        extra = f" · {task.info}" if task.info else ""
        return f"{task.description}: {done} in {elapsed:.0f} s ({rate:,.0f}/s){extra}"

    def print_all(self) -> None:
        for task in self.tasks:
            self.console.print(self.line(task), highlight=False, soft_wrap=True)
        self._last_line = time.monotonic()

    def _maybe_print(self) -> None:
        if time.monotonic() - self._last_line >= self.every_s:
            self.print_all()


@contextmanager
def progress_bar(console: Console) -> Iterator[Progress | LineProgress]:
    """A rich bar on a terminal, LineProgress otherwise; the final state printed at the end."""
    if console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, console=console) as progress:
            yield progress
        return
    plain = LineProgress(console)
    try:
        yield plain
    finally:
        plain.print_all()
