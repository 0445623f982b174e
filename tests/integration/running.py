"""A whole medclear stack for one test module: `medclear up`, then down and wiped."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rich.console import Console

from medclear import stack
from medclear.infra.settings import Settings


@contextlib.contextmanager
def running_stack(settings: Settings) -> Iterator[stack.Endpoints]:
    """The stack of `settings`, up while the block runs. MEDCLEAR_STATE_DIR names its state
    directory meanwhile, so CLI subprocesses the tests start find the same stack."""
    console = Console(stderr=True)
    os.environ["MEDCLEAR_STATE_DIR"] = str(settings.state_dir)
    try:
        yield stack.up(settings, console)
    finally:
        stack.down(settings, console, wipe=True)
        os.environ.pop("MEDCLEAR_STATE_DIR", None)
