"""Running stream runtimes as a process: settings, signals, periodic tasks."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from medclear.settings import Settings
from medclear.streams.runtime import Runtime

DECISION_PATH_BACKOFF_MAX_MS = 20.0  # the worker, gateway and registry: latency is the product
DOWNSTREAM_BACKOFF_MAX_MS = 100.0  # the stream jobs after the decision only need to keep up

Periodic = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def idle_backoff_s(settings: Settings, decision_path: bool) -> tuple[float, float]:
    """The first and the longest sleep after an empty poll (medclear/streams/poll.py):
    MEDCLEAR_KAFKA_IDLE_FETCH_BACKOFF_MS, doubling while idle up to
    MEDCLEAR_KAFKA_IDLE_FETCH_BACKOFF_MAX_MS (unset: short on the decision path, longer
    for the jobs after it). 0 for a broker that holds empty fetches (Apache Kafka)."""
    first_ms = settings.kafka_idle_fetch_backoff_ms
    cap_ms = settings.kafka_idle_fetch_backoff_max_ms
    if cap_ms is None:
        cap_ms = DECISION_PATH_BACKOFF_MAX_MS if decision_path else DOWNSTREAM_BACKOFF_MAX_MS
    return first_ms / 1000, max(first_ms, cap_ms) / 1000


def run_in_foreground(runtimes: Sequence[Runtime], tasks: Sequence[Periodic] = ()) -> None:
    """Run runtimes (and tasks given the stop event) until SIGTERM or SIGINT; then each
    runtime finishes what is in flight, commits and stops."""

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        others = [asyncio.create_task(task(stopping)) for task in tasks]
        try:
            await asyncio.gather(*(runtime.run(stopping) for runtime in runtimes))
        finally:
            stopping.set()
            for other in others:
                other.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await other

    asyncio.run(main())
