"""Running stream runtimes as a process: settings, signals, periodic tasks.

A job is served by a coroutine given the process's stop event (`Served`); a process serves
one job or several (`medclear serve jobs`: every downstream job in one event loop).
SIGTERM / SIGINT stop the process gracefully; SIGUSR1 writes the stack of every asyncio
task to stderr (the component's log), for an operator who sees a job make no progress."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from stream_runtime.batch import StreamFailed
from stream_runtime.runtime import Runtime

log = structlog.get_logger()

EXIT_STREAM_FAILED = 75  # EX_TEMPFAIL: restart me (a batch could not be completed)
Periodic = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
Served = Periodic  # a job: runs until the event is set, then finishes and commits


def dump_tasks() -> None:
    """Every asyncio task and the chain of awaits it is suspended in, to stderr (a task's
    own stack shows only its outermost frame while it is suspended)."""
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} asyncio tasks (SIGUSR1)", file=sys.stderr)
    for task in tasks:
        print(f"--- {task.get_name()}", file=sys.stderr)
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                print(f"    awaiting {awaited!r}"[:300], file=sys.stderr)
                break
            print(
                f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                file=sys.stderr,
            )
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    sys.stderr.flush()


async def serve_runtimes(
    runtimes: Sequence[Runtime], tasks: Sequence[Periodic], stopping: asyncio.Event
) -> None:
    """Run runtimes (and tasks given the stop event) until `stopping` is set; then each
    runtime finishes what is in flight, commits and stops, and the tasks are cancelled."""
    others = [asyncio.create_task(task(stopping)) for task in tasks]
    try:
        await asyncio.gather(*(runtime.run(stopping) for runtime in runtimes))
    finally:
        for other in others:
            other.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await other


def run_until_signal(jobs: Sequence[Served]) -> None:
    """Serve jobs in one event loop until SIGTERM or SIGINT. A job that fails stops the
    others gracefully (they commit what is done), then its error ends the process, so
    whoever runs it (the stack's watcher) starts all of them again: a runtime's
    StreamFailed with EXIT_STREAM_FAILED, anything else as Python ends on an error."""

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        served = [asyncio.create_task(job(stopping)) for job in jobs]
        try:
            await asyncio.wait(served, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            stopping.set()
            await asyncio.wait(served)
        for task in served:
            task.result()  # the first failure, if any, raised here

    try:
        asyncio.run(main())
    except StreamFailed as exc:  # nothing after the failed batch was committed
        log.critical(
            "a stream job failed; exiting to be restarted",
            error=str(exc),
            exit_status=EXIT_STREAM_FAILED,
        )
        sys.exit(EXIT_STREAM_FAILED)


def run_in_foreground(runtimes: Sequence[Runtime], tasks: Sequence[Periodic] = ()) -> None:
    """One job of runtimes and periodic tasks as the whole process (run_until_signal)."""
    run_until_signal([lambda stopping: serve_runtimes(runtimes, tasks, stopping)])
