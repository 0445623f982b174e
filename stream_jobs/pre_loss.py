"""Which pre-losses are pending and when to send their expiry: pure, no I/O, no clock.

The timer job feeds it every CardStateChanged event and asks it, on each tick, which
expiry commands are due. The core decides each expiry (an expiry arriving after a formal
loss, a release or a newer report changes nothing), so a command sent twice, or late,
is harmless; its request id is derived from card and deadline, so a repeat is a replay.
The events name the card by its token, so the expiry does too; the core finds the card
by its pre-loss deadline. They name the person by token as well: the pre-loss report
carries the ssn sealed for this job (clearing/redact.py), which keeps it sealed in its
table and opens it only to address an expiry command to the person.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clearing.codes import CardState
from clearing.model import CardStateChanged, ExpirePreLoss

RESEND_AFTER_MS = 60_000  # an expiry not yet seen applied is sent again after this
DUE_PER_TICK_MAX = 1_000  # expiry commands sent per tick at most


@dataclass(frozen=True, slots=True)
class Pending:
    sealed_ssn: str  # the person, sealed under the person data key
    card_ref: str  # published events name cards by token only
    deadline_ms: int


def track(event: CardStateChanged) -> Pending | None:
    """The pending pre-loss after this event: a new one, or None if the card left it."""
    if event.new_state == CardState.PRE_LOST and event.deadline_ms > 0:
        return Pending(event.sealed, event.card_ref, event.deadline_ms)
    return None


def expiry_request_id(pending: Pending) -> str:
    return f"expiry:{pending.card_ref}:{pending.deadline_ms}"


def due(
    pending: list[Pending],
    sent_at_ms: dict[str, int],
    now_ms: int,
    open_ssn: Callable[[str], str],
) -> list[ExpirePreLoss]:
    """Expiry commands for deadlines that have passed and were not sent in the last
    RESEND_AFTER_MS, oldest deadline first, at most DUE_PER_TICK_MAX. `open_ssn` opens
    a pending pre-loss's sealed ssn."""
    commands: list[ExpirePreLoss] = []
    for p in sorted(pending, key=lambda p: p.deadline_ms):
        if p.deadline_ms > now_ms or len(commands) >= DUE_PER_TICK_MAX:
            break
        request_id = expiry_request_id(p)
        if now_ms - sent_at_ms.get(request_id, -RESEND_AFTER_MS) < RESEND_AFTER_MS:
            continue
        ssn = open_ssn(p.sealed_ssn)
        commands.append(
            ExpirePreLoss(request_id, now_ms, ssn, "", p.deadline_ms, card_ref=p.card_ref)
        )
    return commands
