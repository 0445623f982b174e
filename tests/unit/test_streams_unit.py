"""The stream runtime's pure part: the per-partition store."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_runtime.store import OFFSET_KEY, PartitionStore, StoreError


def test_a_store_keeps_its_values_and_changelog_offset_together(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "t" / "0")
    assert store.next_offset == 0 and store.get(b"a") is None
    store.apply({b"a": b"1", b"b": b"2"}, 2)
    store.apply({b"a": None, b"c": b"3"}, 4)
    assert (store.get(b"a"), store.get(b"b"), store.get(b"c")) == (None, b"2", b"3")
    assert sorted(store.items()) == [(b"b", b"2"), (b"c", b"3")]  # the offset is no item
    store.close()
    again = PartitionStore(tmp_path / "t" / "0")
    assert again.next_offset == 4 and again.get(b"c") == b"3"
    with pytest.raises(StoreError):
        again.apply({OFFSET_KEY: b"99"}, 5)  # the reserved key cannot be written as state
    assert again.next_offset == 4
    again.close()


def test_a_store_held_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    first = PartitionStore(tmp_path / "t" / "0")
    with pytest.raises(StoreError):
        PartitionStore(tmp_path / "t" / "0")  # RocksDB's lock: one owner at a time
    first.close()
