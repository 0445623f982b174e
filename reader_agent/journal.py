"""The agent's local journal: trace numbers and open reversals, surviving a crash.

JSON lines, appended and fsynced before the agent acts on them:

    {"op": "sent", "trace": T, "card_no": ..., "ssn": ..., "amount_fen": A, "reversal_trace": R}
        written before an Authorize is sent;
    {"op": "done", "trace": T}      a decision arrived: nothing to undo;
    {"op": "reversed", "trace": T, "result": "OK"}   the reversal was acknowledged.

A "sent" entry with neither "done" nor "reversed" after it is an open reversal: the
outcome of that swipe is unknown (timeout, lost connection, or the agent died while
waiting), and the agent sends a Reverse with the entry's own reversal trace until one is
answered. Reversals are idempotent by that trace, so sending one again is harmless.

The file is compacted (open entries and the trace high-water mark, written to a temporary
file, fsynced, renamed over) once it holds `LINES_BEFORE_COMPACTION` lines. It holds full
card numbers, like the terminal's own memory would: owner-readable only, never logged.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LINES_BEFORE_COMPACTION = 10_000
OPEN_REVERSALS_MAX = 1_000  # a terminal with this many unsettled swipes must stop


class JournalFull(RuntimeError):
    """Too many open reversals: the terminal stops taking swipes until they settle."""


@dataclass(frozen=True)
class OpenSwipe:
    trace: int
    card_no: str
    ssn: str
    amount_fen: int
    reversal_trace: int


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.open: dict[int, OpenSwipe] = {}
        self.last_trace = 0
        self._lines = 0
        self._load()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash mid-write: it was never acted on
            self._lines += 1
            self._apply(entry)

    def _apply(self, entry: dict[str, Any]) -> None:
        op = entry.get("op")
        trace = int(entry.get("trace", 0))
        self.last_trace = max(self.last_trace, trace, int(entry.get("reversal_trace", 0)))
        if op == "sent":
            fields = {k: entry[k] for k in ("card_no", "ssn", "amount_fen", "reversal_trace")}
            self.open[trace] = OpenSwipe(trace=trace, **fields)
        elif op in ("done", "reversed"):
            self.open.pop(trace, None)

    def _append(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._lines += 1
        self._apply(entry)

    def next_trace(self) -> int:
        """A trace number never used by this terminal: above every one in the journal and
        at least the clock in milliseconds (so a lost journal still does not reuse one)."""
        trace = max(self.last_trace + 1, time.time_ns() // 1_000_000)
        self.last_trace = trace
        return trace

    def sent(self, trace: int, card_no: str, ssn: str, amount_fen: int) -> OpenSwipe:
        """Record a swipe about to be sent, with the trace its reversal would use."""
        if len(self.open) >= OPEN_REVERSALS_MAX:
            raise JournalFull(f"{len(self.open)} swipes await reversal; settle them first")
        swipe = OpenSwipe(trace, card_no, ssn, amount_fen, self.next_trace())
        self._append({"op": "sent", **asdict(swipe)})
        return swipe

    def done(self, trace: int) -> None:
        self._append({"op": "done", "trace": trace})
        self._maybe_compact()

    def reversed(self, trace: int, result: str) -> None:
        self._append({"op": "reversed", "trace": trace, "result": result})
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if self._lines < LINES_BEFORE_COMPACTION:
            return
        temporary = self.path.with_suffix(".compact")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"op": "mark", "trace": self.last_trace}) + "\n")
            for swipe in self.open.values():
                f.write(json.dumps({"op": "sent", **asdict(swipe)}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._file.close()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._lines = 1 + len(self.open)

    def close(self) -> None:
        self._file.close()
