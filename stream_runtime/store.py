"""Per-partition state: one RocksDB (rocksdict) per table partition, raw bytes.

The next changelog offset to apply is kept under a reserved key and written in the same
write batch as the values it covers, so the store and its position in the changelog can
never disagree: after a crash a restart reads the changelog from exactly there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from medclear.errors import MedclearError

OFFSET_KEY = b"\x00medclear:next-changelog-offset"  # state keys never start with NUL
WRITE_BUFFER_BYTES = 16 * 1024**2  # per partition: a memtable of this size at most …
WRITE_BUFFERS_MAX = 2  # … and this many of them
BLOCK_CACHE_BYTES = 64 * 1024**2  # shared by every partition store of a process


class StoreError(MedclearError):
    """A store that cannot be opened or a key it cannot hold."""


_cache: Cache | None = None


def _options() -> Options:
    """Bounded memory whatever the table's size: the files hold the rest."""
    global _cache
    if _cache is None:
        _cache = Cache(BLOCK_CACHE_BYTES)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(WRITE_BUFFERS_MAX)
    table = BlockBasedOptions()
    table.set_block_cache(_cache)
    options.set_block_based_table_factory(table)
    return options


class PartitionStore:
    """The state of one table partition."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = Rdict(str(path), _options())
        except Exception as exc:  # rocksdict raises a plain Exception on a locked or bad DB
            raise StoreError(f"{path}: {exc}") from exc
        raw = self._db.get(OFFSET_KEY)
        self.next_offset = int(raw) if raw is not None else 0

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self._db.items():
            if isinstance(key, bytes) and key != OFFSET_KEY:
                yield key, bytes(value)

    def apply(self, changes: Mapping[bytes, bytes | None], next_offset: int) -> None:
        """Write the values (None: delete) and the changelog position, atomically."""
        batch = WriteBatch(raw_mode=True)
        for key, value in changes.items():
            if key.startswith(b"\x00"):
                raise StoreError(f"a state key may not start with NUL: {key[:20]!r}")
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        batch.put(OFFSET_KEY, str(next_offset).encode())
        self._db.write(batch)
        self.next_offset = next_offset

    def close(self) -> None:
        self._db.close()
