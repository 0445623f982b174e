"""A state directory of its own for a benchmark's stack: a temporary directory, removed at
the end, so a benchmark never reuses (and then wipes) the stack a user has running in
.medclear/ (`up` on a running stack reports it and returns)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medclear.infra.settings import Settings


@contextmanager
def own_state_dir(settings: Settings, purpose: str) -> Iterator[Settings]:
    """`settings` with state_dir in a new temporary directory, deleted afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"medclear-bench-{purpose}-"))
    try:
        yield settings.model_copy(update={"state_dir": root / ".medclear"})
    finally:
        shutil.rmtree(root, ignore_errors=True)
