"""When the stack's watcher restarts a component that exited on its own: a pure policy
with an injected clock (no I/O), so its back-off and its bound are unit-tested.

A component that exits is restarted after a back-off that doubles with each restart in
a row (1 s, 2 s, 4 s … at most 30 s). More than RESTARTS_PER_WINDOW_MAX restarts within
RESTART_WINDOW_S means restarting does not help (a bad setting, a disk full, a broker
that refuses it): the watcher gives up on it, says so in `medclear status`, and the alert
`MedclearComponentGaveUp` pages. A component that stayed up for a whole window starts
afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
RESTART_WINDOW_S = 600.0
RESTARTS_PER_WINDOW_MAX = 5


@dataclass
class RestartPolicy:
    """The restarts of one component, and when the next one may happen."""

    backoff_first_s: float = BACKOFF_FIRST_S
    backoff_max_s: float = BACKOFF_MAX_S
    window_s: float = RESTART_WINDOW_S
    per_window_max: int = RESTARTS_PER_WINDOW_MAX
    restarts: list[float] = field(default_factory=list)  # when each restart was made
    down_since: float | None = None  # first seen exited
    gave_up: bool = False

    def _recent(self, now: float) -> list[float]:
        return [t for t in self.restarts if now - t < self.window_s]

    def backoff_s(self, now: float) -> float:
        """The wait before the next restart: doubling with each restart in the window."""
        recent = len(self._recent(now))
        return min(self.backoff_max_s, self.backoff_first_s * float(2**recent))

    def seen_down(self, now: float) -> bool:
        """The component was found exited at `now`: True when it should be restarted now
        (its back-off has passed), False to wait (or after giving up)."""
        if self.gave_up:
            return False
        if self.down_since is None:
            self.down_since = now
        if len(self._recent(now)) >= self.per_window_max:
            self.gave_up = True
            return False
        return now - self.down_since >= self.backoff_s(now)

    def restarted(self, now: float) -> None:
        self.restarts = [*self._recent(now), now]
        self.down_since = None

    def seen_up(self) -> None:
        """Running (restarted by anyone): no back-off is pending; one given up on and
        started again by an operator is watched afresh."""
        self.down_since = None
        if self.gave_up:
            self.gave_up = False
            self.restarts = []
