"""PIN pads: where the cardholder types the PIN. The clear PIN goes from the pad straight
into a PIN block under the terminal's PIN key; it is never echoed, logged or kept."""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from typing import Protocol

from reader_agent.errors import ReaderAgentError


class PinEntryCancelled(ReaderAgentError):
    """The cardholder cancelled or the pad has nothing more to give."""


class PinPad(Protocol):
    def read_pin(self, prompt: str) -> str: ...


class ConsolePinPad:
    """Development: the PIN typed at the console, not echoed (getpass)."""

    def read_pin(self, prompt: str) -> str:
        try:
            return getpass.getpass(f"{prompt}: ")
        except (EOFError, KeyboardInterrupt) as exc:
            raise PinEntryCancelled("PIN entry cancelled") from exc


class ScriptedPinPad:
    """Tests and benchmarks: PINs given in advance, one per entry; `repeat` reuses the
    last one for ever (a cardholder who always types the same PIN)."""

    def __init__(self, pins: Iterable[str], repeat: bool = False) -> None:
        self._pins = list(pins)
        self._repeat = repeat
        self.prompts: list[str] = []

    def read_pin(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self._pins:
            raise PinEntryCancelled("no PIN scripted")
        return self._pins[0] if self._repeat and len(self._pins) == 1 else self._pins.pop(0)
