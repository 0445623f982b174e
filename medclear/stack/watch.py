"""The stack's watcher: `medclear up` runs it (role "watch", MEDCLEAR_RESTART_ON_EXIT) to
restart a component that exits on its own — a stream job that ended with 75 after a
write the broker lost, a process that crashed — with the back-off and the bound of
medclear/stack/restarts.py.

Every second it reads the stack's record and looks for recorded processes that are not
running. It restarts one through `restart_component` (the same path as `medclear
restart`, under the stack's lock, so `down` and a manual restart never race it), and
leaves a component running if someone else restarted it first. While
`<state_dir>/watch.paused` exists (the drills and benchmarks break things on purpose) it
restarts nothing. Its metrics: `medclear_component_up`, `_restarts_total`, `_gave_up`;
`medclear status` shows the restarts.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import structlog

from medclear.infra.settings import Settings
from medclear.infra.stack_state import StackError, state_dir
from medclear.stack.restarts import RestartPolicy
from medclear.stack.supervisor import (
    WATCH_PAUSE_FILE,
    exited,
    mark_gave_up,
    restart_component,
    status,
)
from monitoring import metrics

WATCH_INTERVAL_S = 1.0

log = structlog.get_logger()


class Watcher:
    """One pass per interval; the policies live as long as the watcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policies: dict[str, RestartPolicy] = {}

    def paused(self) -> bool:
        return (state_dir(self.settings) / WATCH_PAUSE_FILE).exists()

    def once(self, now: float) -> None:
        down = set(exited(self.settings))
        for name, policy in self.policies.items():
            if name not in down:
                policy.seen_up()
                metrics.COMPONENT_UP.labels(name).set(1)
                metrics.COMPONENT_GAVE_UP.labels(name).set(0)
        if self.paused():
            return
        for name in sorted(down):
            metrics.COMPONENT_UP.labels(name).set(0)
            policy = self.policies.setdefault(name, RestartPolicy())
            was_given_up = policy.gave_up
            if policy.seen_down(now):
                self.restart(name, policy, now)
            elif policy.gave_up and not was_given_up:
                log.error(
                    "component keeps exiting; not restarted again",
                    component=name,
                    restarts=len(policy.restarts),
                )
                metrics.COMPONENT_GAVE_UP.labels(name).set(1)
                mark_gave_up(self.settings, name)

    def restart(self, name: str, policy: RestartPolicy, now: float) -> None:
        log.warning("component exited; restarting", component=name)
        policy.restarted(now)
        metrics.COMPONENT_RESTARTS.labels(name).inc()  # counted when made, ready or not
        metrics.COMPONENT_GAVE_UP.labels(name).set(0)
        try:
            restart_component(self.settings, name, only_if_exited=True)
        except StackError as exc:  # not ready in time, the lock held by `down`, …
            log.error("restart failed", component=name, error=str(exc).splitlines()[0])


def run(settings: Settings) -> None:
    """Watch until SIGTERM or SIGINT."""
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    watcher = Watcher(settings)
    for row in status(settings):
        watcher.policies[row.name] = RestartPolicy()
    metrics.READY.set(1)
    log.info("watching", components=sorted(watcher.policies))
    while not stopping.wait(WATCH_INTERVAL_S):
        watcher.once(time.monotonic())
    log.info("watcher stopped")
