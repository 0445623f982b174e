"""The reader agent's journal survives a crash at any byte: an open swipe is never
forgotten (it must be reversed), and a later entry never lands on a torn one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reader_agent.journal import Journal

CARD_NO, SSN = "A00000001", "11010519491231002X"


def _crash_copy(src: Path, dst: Path, wal_bytes: int | None = None) -> Path:
    """The journal's files as a kill -9 would leave them, the WAL cut after `wal_bytes`."""
    dst.mkdir()
    shutil.copy(src, dst / src.name)
    wal = src.with_name(src.name + "-wal")
    if wal.exists():
        data = wal.read_bytes()
        (dst / wal.name).write_bytes(data if wal_bytes is None else data[:wal_bytes])
    return dst / src.name


def test_a_journal_cut_at_every_byte_of_its_last_entry_loses_nothing_before_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "live" / "T1.journal"
    live = Journal(path)
    first = live.sent(101, CARD_NO, SSN, 5_00)
    live.sent(102, CARD_NO, SSN, 6_00)
    live.done(102)
    wal = path.with_name(path.name + "-wal")
    before = wal.stat().st_size  # everything up to the last entry
    last = live.sent(103, CARD_NO, SSN, 7_00)  # the last entry: an open swipe
    after = wal.stat().st_size
    assert after > before, "the last entry is in the WAL (not yet checkpointed)"
    outcomes = set()
    for cut in range(before, after + 1):
        copy = _crash_copy(path, tmp_path / f"cut{cut}", cut)
        journal = Journal(copy)
        assert first.trace in journal.open  # never lost, whatever the cut
        assert 102 not in journal.open
        has_last = last.trace in journal.open
        assert journal.last_trace >= (last.reversal_trace if has_last else first.reversal_trace)
        outcomes.add(has_last)
        # the next entry is whole after a restart, wherever the cut was
        nxt = journal.sent(journal.next_trace(), CARD_NO, SSN, 8_00)
        journal.close()
        reopened = Journal(copy)
        assert reopened.open[nxt.trace] == nxt and first.trace in reopened.open
        assert reopened.last_trace >= nxt.reversal_trace
        reopened.close()
        shutil.rmtree(copy.parent)
    assert outcomes == {False, True}  # cut inside the entry: gone whole; after it: there
    live.close()


def test_the_journal_is_owner_readable_only_and_closed_swipes_leave_it(tmp_path: Path) -> None:
    path = tmp_path / "T1.journal"
    journal = Journal(path)
    for trace in range(1, 50):
        journal.sent(trace * 10, CARD_NO, SSN, 1_00)
        journal.done(trace * 10)
    journal.close()
    again = Journal(path)
    assert again.open == {} and again.last_trace >= 490
    for f in path.parent.iterdir():
        assert oct(f.stat().st_mode & 0o777) == "0o600", f.name
    again.close()


def test_a_journal_in_the_earlier_line_format_is_carried_over(tmp_path: Path) -> None:
    path = tmp_path / "T1.journal"
    lines = [
        {
            "op": "sent",
            "trace": 7,
            "card_no": CARD_NO,
            "ssn": SSN,
            "amount_fen": 100,
            "reversal_trace": 8,
        },
        {
            "op": "sent",
            "trace": 9,
            "card_no": CARD_NO,
            "ssn": SSN,
            "amount_fen": 200,
            "reversal_trace": 10,
        },
        {"op": "done", "trace": 9},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"op": "sent", "tr')
    journal = Journal(path)
    assert list(journal.open) == [7] and journal.open[7].reversal_trace == 8
    assert journal.last_trace >= 10
    journal.close()
    assert list(Journal(path).open) == [7]
