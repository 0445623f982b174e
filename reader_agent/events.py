"""Reader events through pyscard's monitors: card inserted, card removed, reader added,
reader unplugged. Observers run on pyscard's threads; events go into a queue the agent
(or `medclear agent watch`) reads."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smartcard.CardMonitoring import CardMonitor, CardObserver
from smartcard.ReaderMonitoring import ReaderMonitor, ReaderObserver

EVENTS_QUEUED_MAX = 1_000


@dataclass(frozen=True)
class ReaderEvent:
    kind: str  # "card inserted", "card removed", "reader added", "reader unplugged"
    reader: str
    atr: str = ""


class _Cards(CardObserver):  # type: ignore[misc]
    """Cards inserted and removed, as events."""

    def __init__(self, put: Callable[[ReaderEvent], None]) -> None:
        self._put = put

    def update(self, observable: Any, handlers: Any) -> None:
        added, removed = handlers
        for card in added:
            self._put(ReaderEvent("card inserted", str(card.reader), bytes(card.atr).hex().upper()))
        for card in removed:
            self._put(ReaderEvent("card removed", str(card.reader)))


class _Readers(ReaderObserver):  # type: ignore[misc]
    """Readers plugged in and unplugged, as events."""

    def __init__(self, put: Callable[[ReaderEvent], None]) -> None:
        self._put = put

    def update(self, observable: Any, handlers: Any) -> None:
        added, removed = handlers
        for reader in added:
            self._put(ReaderEvent("reader added", str(reader)))
        for reader in removed:
            self._put(ReaderEvent("reader unplugged", str(reader)))


class ReaderEvents:
    """Start with `start()`, read `events` (a queue), stop with `stop()`."""

    def __init__(self) -> None:
        self.events: queue.Queue[ReaderEvent] = queue.Queue(maxsize=EVENTS_QUEUED_MAX)
        self._card_monitor: Any = None
        self._reader_monitor: Any = None
        self._card_observer: Any = None
        self._reader_observer: Any = None

    def _put(self, event: ReaderEvent) -> None:
        with contextlib.suppress(queue.Full):  # nobody reading: drop rather than block pyscard
            self.events.put_nowait(event)

    def start(self) -> ReaderEvents:
        self._reader_monitor = ReaderMonitor()
        self._reader_observer = _Readers(self._put)
        self._reader_monitor.addObserver(self._reader_observer)
        self._card_monitor = CardMonitor()
        self._card_observer = _Cards(self._put)
        self._card_monitor.addObserver(self._card_observer)
        return self

    def wait(self, kind: str, timeout_s: float) -> ReaderEvent:
        """The next event of `kind` (others are dropped); TimeoutError if none comes."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no '{kind}' event within {timeout_s} s")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty as exc:
                raise TimeoutError(f"no '{kind}' event within {timeout_s} s") from exc
            if event.kind == kind:
                return event

    def stop(self) -> None:
        if self._card_monitor is not None:
            self._card_monitor.deleteObserver(self._card_observer)
            self._card_monitor = None
        if self._reader_monitor is not None:
            self._reader_monitor.deleteObserver(self._reader_observer)
            self._reader_monitor = None
