"""Reader events through pyscard's monitors: card inserted, card removed, reader added,
reader unplugged. Observers run on pyscard's threads; events go into a queue the agent
(or `medclear agent watch`) reads."""

from __future__ import annotations

import contextlib
import queue
from dataclasses import dataclass
from typing import Any

EVENTS_QUEUED_MAX = 1_000


@dataclass(frozen=True)
class ReaderEvent:
    kind: str  # "card inserted", "card removed", "reader added", "reader unplugged"
    reader: str
    atr: str = ""


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
        from smartcard.CardMonitoring import CardMonitor, CardObserver
        from smartcard.ReaderMonitoring import ReaderMonitor, ReaderObserver

        outer = self

        class Cards(CardObserver):  # type: ignore[misc]
            def update(self, observable: Any, handlers: Any) -> None:
                added, removed = handlers
                for card in added:
                    atr = bytes(card.atr).hex().upper()
                    outer._put(ReaderEvent("card inserted", str(card.reader), atr))
                for card in removed:
                    outer._put(ReaderEvent("card removed", str(card.reader)))

        class Readers(ReaderObserver):  # type: ignore[misc]
            def update(self, observable: Any, handlers: Any) -> None:
                added, removed = handlers
                for reader in added:
                    outer._put(ReaderEvent("reader added", str(reader)))
                for reader in removed:
                    outer._put(ReaderEvent("reader unplugged", str(reader)))

        self._reader_monitor = ReaderMonitor()
        self._reader_observer = Readers()
        self._reader_monitor.addObserver(self._reader_observer)
        self._card_monitor = CardMonitor()
        self._card_observer = Cards()
        self._card_monitor.addObserver(self._card_observer)
        return self

    def wait(self, kind: str, timeout_s: float) -> ReaderEvent:
        """The next event of `kind` (others are dropped); TimeoutError if none comes."""
        import time

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
