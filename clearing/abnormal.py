"""Abnormal transactions (异常交易处理): pure detection over published events.

`Detector.observe(event)` returns the alerts that event raises. Windows are sliding and
bounded; the clock is the events' own `at_ms`. An alert's id derives from the event that
raised it, so a redelivered event raises an alert with the same id, and every sink of
alerts deduplicates by it. Which alerts reach the cardholder by SMS is `cardholder_facing`.

The rules (limits are the named constants below):
- BLOCKED_CARD_USED: a swipe attempted on a card that is lost, pre-lost, frozen, locked,
  cancelled or superseded (someone holds a card that must not pay);
- WRONG_PINS_ACROSS_TERMINALS: wrong PINs for one card from several terminals within a
  window (guessing at several counters);
- DISTANT_INSTITUTIONS: one card paying at institutions in two different cities within
  minutes (the city is the first four digits of the institution's region code);
- TERMINAL_BURST: one terminal sending more swipes than a counter could in a minute.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from clearing.codes import CardState, ResultCode
from clearing.model import CardStateChanged, Event, SwipeApproved, SwipeDeclined

# the events Detector and BlockWatch read; any other leaves them as they were
EVENTS_READ = (SwipeApproved, SwipeDeclined, CardStateChanged)

BLOCKED_RESULTS = frozenset(
    {
        ResultCode.CARD_PRE_LOST,
        ResultCode.CARD_LOST,
        ResultCode.CARD_LOCKED,
        ResultCode.CARD_FROZEN,
        ResultCode.CARD_CANCELLED,
        ResultCode.CARD_SUPERSEDED,
    }
)
WRONG_PIN_WINDOW_MS = 10 * 60_000
WRONG_PIN_TERMINALS_MIN = 2  # distinct terminals with a wrong PIN in the window
DISTANT_WINDOW_MS = 30 * 60_000
CITY_PREFIX_CHARS = 4  # GB/T 2260: province (2) + city (2)
TERMINAL_BURST_WINDOW_MS = 60_000
TERMINAL_BURST_SWIPES_MAX = 30  # more than this per window at one terminal is a burst
TRACKED_KEYS_MAX = 100_000  # per rule: the oldest keys are forgotten beyond it


class AlertKind(StrEnum):
    BLOCKED_CARD_USED = "blocked_card_used"
    WRONG_PINS_ACROSS_TERMINALS = "wrong_pins_across_terminals"
    DISTANT_INSTITUTIONS = "distant_institutions"
    TERMINAL_BURST = "terminal_burst"


CARDHOLDER_FACING = frozenset(
    {
        AlertKind.BLOCKED_CARD_USED,
        AlertKind.WRONG_PINS_ACROSS_TERMINALS,
        AlertKind.DISTANT_INSTITUTIONS,
    }
)


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str  # "<event id>/<kind>": stable under redelivery
    kind: AlertKind
    at_ms: int
    person_ref: str  # the person's token (published events carry no ssn)
    card_ref: str
    card_masked: str
    institution_id: str
    terminal_id: str
    detail: str

    @property
    def cardholder_facing(self) -> bool:
        return self.kind in CARDHOLDER_FACING


def city_of(institution_id: str) -> str:
    return institution_id[:CITY_PREFIX_CHARS]


@dataclass(slots=True)
class _Windows:
    """Per key, the recent (at_ms, value) pairs; keys kept in first-seen order, bounded."""

    span_ms: int
    items: dict[str, deque[tuple[int, str]]] = field(default_factory=dict)
    alerted_until: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, at_ms: int, value: str) -> deque[tuple[int, str]]:
        window = self.items.get(key)
        if window is None:
            if len(self.items) >= TRACKED_KEYS_MAX:
                oldest = next(iter(self.items))
                del self.items[oldest]
                self.alerted_until.pop(oldest, None)
            window = self.items[key] = deque()
        window.append((at_ms, value))
        while window and window[0][0] <= at_ms - self.span_ms:
            window.popleft()
        return window

    def first_alert(self, key: str, at_ms: int) -> bool:
        """True once per window and key: repeats within the window raise nothing."""
        if self.alerted_until.get(key, -1) >= at_ms:
            return False
        self.alerted_until[key] = at_ms + self.span_ms
        return True


@dataclass(slots=True)
class Detector:
    wrong_pins: _Windows = field(default_factory=lambda: _Windows(WRONG_PIN_WINDOW_MS))
    payments: _Windows = field(default_factory=lambda: _Windows(DISTANT_WINDOW_MS))
    terminals: _Windows = field(default_factory=lambda: _Windows(TERMINAL_BURST_WINDOW_MS))
    seen: set[str] = field(default_factory=set)
    seen_order: deque[str] = field(default_factory=deque)

    def observe(self, event: Event) -> list[Alert]:
        if not isinstance(event, SwipeApproved | SwipeDeclined):
            return []
        if event.event_id in self.seen:
            return []  # a redelivery: windows already hold it
        self._remember(event.event_id)
        alerts: list[Alert] = []
        card = event.card_ref or event.card_masked

        def alert(kind: AlertKind, detail: str) -> None:
            alerts.append(
                Alert(
                    f"{event.event_id}/{kind.value}",
                    kind,
                    event.at_ms,
                    event.person_ref,
                    event.card_ref,
                    event.card_masked,
                    event.institution_id,
                    event.terminal_id,
                    detail,
                )
            )

        if event.terminal_id:
            burst = self.terminals.add(event.terminal_id, event.at_ms, event.event_id)
            if len(burst) > TERMINAL_BURST_SWIPES_MAX and self.terminals.first_alert(
                event.terminal_id, event.at_ms
            ):
                alert(AlertKind.TERMINAL_BURST, f"{len(burst)} swipes within 60 s")
        if isinstance(event, SwipeDeclined):
            if event.result in BLOCKED_RESULTS:
                alert(AlertKind.BLOCKED_CARD_USED, event.result.name)
            if event.pin_wrong and card:
                window = self.wrong_pins.add(card, event.at_ms, event.terminal_id)
                terminals = {t for _, t in window if t}
                if len(terminals) >= WRONG_PIN_TERMINALS_MIN and self.wrong_pins.first_alert(
                    card, event.at_ms
                ):
                    alert(
                        AlertKind.WRONG_PINS_ACROSS_TERMINALS,
                        f"wrong PINs at {len(terminals)} terminals",
                    )
        elif card:
            window = self.payments.add(card, event.at_ms, event.institution_id)
            cities = {city_of(i) for _, i in window}
            if len(cities) > 1 and self.payments.first_alert(card, event.at_ms):
                alert(AlertKind.DISTANT_INSTITUTIONS, "paid in cities " + ", ".join(sorted(cities)))
        return alerts

    def _remember(self, event_id: str) -> None:
        self.seen.add(event_id)
        self.seen_order.append(event_id)
        if len(self.seen_order) > TRACKED_KEYS_MAX:
            self.seen.discard(self.seen_order.popleft())


BLOCKING_STATES = frozenset(
    {CardState.PRE_LOST, CardState.LOST, CardState.FROZEN, CardState.LOCKED}
)


@dataclass(slots=True)
class BlockWatch:
    """For the operators' card-status propagation figure: how long after a card was
    blocked (reported lost, frozen, locked) its first swipe was refused."""

    blocked_at: dict[str, int] = field(default_factory=dict)  # card token → at_ms

    def observe(self, event: Event) -> int | None:
        """Milliseconds from the block to this first refused swipe; None otherwise."""
        if isinstance(event, CardStateChanged) and event.card_ref:
            if event.new_state in BLOCKING_STATES and event.old_state not in BLOCKING_STATES:
                if len(self.blocked_at) >= TRACKED_KEYS_MAX:
                    del self.blocked_at[next(iter(self.blocked_at))]
                self.blocked_at[event.card_ref] = event.at_ms
            elif event.new_state not in BLOCKING_STATES:
                self.blocked_at.pop(event.card_ref, None)
        elif isinstance(event, SwipeDeclined) and event.result in BLOCKED_RESULTS:
            since = self.blocked_at.pop(event.card_ref, None)
            if since is not None:
                return max(0, event.at_ms - since)
        return None
