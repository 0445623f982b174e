"""The agent's local journal: trace numbers and open reversals, surviving a crash.

One SQLite database per terminal (stdlib sqlite3, WAL, synchronous=FULL): every change is
one transaction, on disk (fsynced) before the agent acts on it.

    sent(trace, ...)      before an Authorize is sent: the swipe and the trace its
                          reversal will use; the outcome is unknown until ...
    done(trace)           a decision arrived: nothing to undo;
    reversed(trace, r)    the reversal was acknowledged.

A swipe that is `sent` and neither `done` nor `reversed` is an open reversal (deadline
passed, link lost, gateway TIMEOUT, a reply without a valid MAC, or the agent died
waiting): the agent sends a Reverse with its own reversal trace, before the next swipe
and with `medclear agent reversals`, until one is answered (reversals are idempotent by
that trace, so sending one again is harmless). Bounded: OPEN_REVERSALS_MAX (1,000) open
reversals stop the terminal until they settle. Trace numbers never go back: a new one is
above every trace ever used (the highest is kept) and at least the clock in milliseconds.

Why SQLite and not appended lines: a crash in the middle of a line left it without its
newline, the next entry was glued onto it, and the next start skipped both, so an open
swipe could be forgotten and never reversed. SQLite's WAL frames are checksummed: a
transaction cut short by a crash is discarded whole at the next open, and a new one never
lands on its remains (tests/unit/test_journal.py cuts the file at every byte of the last
entry). Closed swipes are deleted, so the file stays small without compaction.

The database holds full card numbers, as the terminal's own memory would: owner-readable
only (SQLite gives its -wal and -shm files the database file's permissions), never logged.
A journal in the earlier line format is read once and carried over.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

from reader_agent.errors import ReaderAgentError

OPEN_REVERSALS_MAX = 1_000  # a terminal with this many unsettled swipes must stop
PAGE_BYTES = 1024  # small rows; a small page keeps each transaction's WAL frames small
BUSY_TIMEOUT_S = 5.0  # another process of the same terminal holding the write lock
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS open_swipes (
    trace INTEGER PRIMARY KEY,
    card_no TEXT NOT NULL,
    ssn TEXT NOT NULL,
    amount_fen INTEGER NOT NULL,
    reversal_trace INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS high_water (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_trace INTEGER NOT NULL
);
INSERT OR IGNORE INTO high_water (id, last_trace) VALUES (1, 0);
"""


class JournalFull(ReaderAgentError):
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
        path.parent.mkdir(parents=True, exist_ok=True)
        legacy = _legacy_lines(path)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self._db.execute(f"PRAGMA page_size = {PAGE_BYTES}")  # only while it is empty
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")  # fsync at every commit
        self._db.executescript(_SCHEMA)
        if legacy is not None:
            self._carry_over(legacy)
        self.open: dict[int, OpenSwipe] = {
            row[0]: OpenSwipe(*row)
            for row in self._db.execute(
                "SELECT trace, card_no, ssn, amount_fen, reversal_trace FROM open_swipes"
            )
        }
        row = self._db.execute("SELECT last_trace FROM high_water").fetchone()
        self.last_trace: int = int(row[0])

    def _carry_over(self, legacy: tuple[dict[int, OpenSwipe], int]) -> None:
        swipes, last_trace = legacy
        with self._transaction():
            for swipe in swipes.values():
                self._db.execute(
                    "INSERT OR REPLACE INTO open_swipes VALUES (?, ?, ?, ?, ?)", astuple(swipe)
                )
            self._raise_high_water(last_trace)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")  # with synchronous=FULL: on disk when this returns

    def _raise_high_water(self, trace: int) -> None:
        self._db.execute("UPDATE high_water SET last_trace = MAX(last_trace, ?)", (trace,))

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
        with self._transaction():
            self._db.execute("INSERT INTO open_swipes VALUES (?, ?, ?, ?, ?)", astuple(swipe))
            self._raise_high_water(swipe.reversal_trace)
        self.open[trace] = swipe
        return swipe

    def done(self, trace: int) -> None:
        self._close(trace)

    def reversed(self, trace: int, result: str) -> None:
        """The reversal of `trace` was answered with `result` (logged by the agent)."""
        self._close(trace)

    def _close(self, trace: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM open_swipes WHERE trace = ?", (trace,))
        self.open.pop(trace, None)

    def close(self) -> None:
        self._db.close()


def _legacy_lines(path: Path) -> tuple[dict[int, OpenSwipe], int] | None:
    """The open swipes and highest trace of a journal in the earlier JSON-lines format
    (whose file is then replaced by the database); None when there is none."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open("rb") as f:
        if f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC:
            return None
    swipes: dict[int, OpenSwipe] = {}
    last_trace = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            trace = int(entry.get("trace", 0))
            last_trace = max(last_trace, trace, int(entry.get("reversal_trace", 0)))
            if entry.get("op") == "sent":
                swipes[trace] = OpenSwipe(
                    trace,
                    str(entry["card_no"]),
                    str(entry["ssn"]),
                    int(entry["amount_fen"]),
                    int(entry["reversal_trace"]),
                )
            elif entry.get("op") in ("done", "reversed"):
                swipes.pop(trace, None)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # the torn lines this format could leave
    path.rename(path.with_name(path.name + ".lines-carried-over"))
    return swipes, last_trace
