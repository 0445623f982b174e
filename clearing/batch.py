"""The clearing worker's step for one batch of commands, pure: (persons, commands, PIN
answers) → (events, persons, replies).

The worker (stream_jobs/worker.py) asks the HSM about every PIN block of the batch at
once, before deciding, against the cards as they were before the batch. A command whose
card had its PIN changed earlier in the same batch cannot use that answer: the step stops
there (`BatchStep.recheck_from`), the worker asks the HSM again for the rest of the batch
on the persons the step left, and calls the step again with them.

Commands are decided in order; a person's second command sees what the first left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from clearing import core
from clearing.codes import ResultCode
from clearing.model import (
    Authorize,
    BalanceInquiry,
    Card,
    Command,
    Event,
    Person,
    PinOutcome,
    Policy,
    Reply,
    checked,
)


@dataclass(frozen=True, slots=True)
class CheckedPin:
    """The HSM's answer about a command's PIN block, and the card PVV it was checked
    against ("" when there was no card or no PIN to check against: the form only)."""

    outcome: PinOutcome
    pvv: str


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """One command of a batch with the core's Decision of it."""

    index: int  # the command's place in the batch
    key: bytes  # the person's key (the ssn)
    reply: Reply
    events: tuple[Event, ...]
    command: Command


@dataclass
class BatchStep:
    """What `step` did with a batch: its decisions, the persons they changed, and where it
    stopped if a PIN must be checked again."""

    decided: list[BatchDecision] = field(default_factory=list)
    persons: dict[bytes, Person | None] = field(default_factory=dict)  # changed ones only
    recheck_from: int | None = None  # stopped here: a PIN must be checked again


def pin_card(person: Person | None, command: Command) -> Card | None:
    """The card whose PIN a swipe or balance enquiry names (None: unknown)."""
    if person is None or not isinstance(command, Authorize | BalanceInquiry):
        return None
    return person.card(command.card_no)


def needs_pin(person: Person | None, command: Command) -> bool:
    """A swipe or balance enquiry the HSM must look at: not a repeat, which is answered
    from the remembered reply."""
    if not isinstance(command, Authorize | BalanceInquiry):
        return False
    return person is None or person.reply_to(command.request_id) is None


def step(
    persons: Mapping[bytes, Person | None],
    commands: Sequence[tuple[bytes, Command]],
    pins: Mapping[int, CheckedPin],
    policy: Policy,
    first: int = 0,
) -> BatchStep:
    """Decide commands[first:] in order. `pins[i]` answers command i's PIN block when it
    `needs_pin` (the worker asks the HSM only with terminal security on; without it there
    is no answer and the command keeps PinOutcome.NOT_VERIFIED)."""
    result = BatchStep()
    current: dict[bytes, Person | None] = dict(persons)
    for index in range(first, len(commands)):
        key, command = commands[index]
        person = current.get(key)
        answer = pins.get(index)
        if (
            answer is not None
            and isinstance(command, Authorize | BalanceInquiry)
            and needs_pin(person, command)
        ):
            card = pin_card(person, command)
            if (card.pvv if card is not None else "") != answer.pvv:
                result.recheck_from = index  # the PIN changed earlier in this batch
                return result
            command = checked(command, answer.outcome)
        new_person, decision = core.handle(person, command, policy)
        if new_person is not person:
            current[key] = new_person
            result.persons[key] = new_person
        result.decided.append(BatchDecision(index, key, decision.reply, decision.events, command))
    return result


def malformed(request_id: str = "", at_ms: int = 0) -> Reply:
    """The reply to a record that is no command, or one routed by another person's key."""
    return Reply(request_id, ResultCode.MALFORMED_REQUEST, at_ms=at_ms)
