"""How the core's deciders build their decisions: event ids, replies, decisions that
change nothing.

Shared by `clearing.core` (window operations, reversals, refunds) and `clearing.pos`
(swipes and balance enquiries). Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

from clearing.codes import CardState, ResultCode
from clearing.errors import ClearingError
from clearing.model import (
    Card,
    CardStateChanged,
    Command,
    Decision,
    Event,
    Person,
    PersonRegistered,
    Reply,
)


class Told(TypedDict, total=False):
    """What a reply tells beyond its result and version: Reply's optional fields."""

    amount_fen: int
    paid_from_account_fen: int
    paid_in_cash_fen: int
    balance_fen: int  # the person's balance unless said otherwise
    pin_tries_remaining: int
    pharmacy_swipes_today: int
    pharmacy_swipes_per_day: int
    card_no: str
    card_state: CardState
    snapshot: Person | None


# The states in which a card is still the person's (not lost, replaced or cancelled).
LIVE_STATES = frozenset({CardState.ISSUED, CardState.ACTIVE, CardState.LOCKED, CardState.FROZEN})


class InvariantError(ClearingError, AssertionError):
    """A broken invariant of the core: a programmer error, never a user's."""


def effective_state(card: Card, at_ms: int) -> CardState:
    """The state a card is in at `at_ms`: a lapsed pre-loss is the state it restores, an
    expired temporary card is EXPIRED, before any timer has recorded either."""
    if card.state == CardState.PRE_LOST and at_ms >= card.pre_loss_deadline_ms > 0:
        return card.state_before_pre_loss
    if card.expires_at_ms and at_ms >= card.expires_at_ms and card.state in LIVE_STATES:
        return CardState.EXPIRED
    return card.state


def event_id(c: Command, index: int) -> str:
    """`<request id>@<ingress ms>#<n>`: the same for a redelivered command (same bytes), and
    distinct for two commands that share a request id (a terminal's trace numbers wrap;
    a repeat sent later is answered from the remembered reply and makes no events)."""
    return f"{c.request_id}@{c.at_ms}#{index}"


def reply(
    person: Person | None,
    request_id: str,
    result: ResultCode,
    at_ms: int,
    events: int,
    **told: Unpack[Told],
) -> Reply:
    """The reply to a request decided on `person` with `events` new events."""
    version = (person.version if person else 0) + events
    told.setdefault("balance_fen", person.balance_fen if person else 0)
    return Reply(request_id=request_id, result=result, version=version, at_ms=at_ms, **told)


def unchanged(
    person: Person | None, request_id: str, result: ResultCode, at_ms: int, **told: Unpack[Told]
) -> Decision:
    """A decision that changes nothing and makes no event: a refusal, or an answer that
    only tells (a balance, a person's record)."""
    return Decision((), reply(person, request_id, result, at_ms, 0, **told))


def with_events(
    person: Person | None,
    command: Command,
    events: list[Event],
    result: ResultCode = ResultCode.OK,
    /,
    **told: Unpack[Told],
) -> Decision:
    """A decision with events (counted into the reply's version)."""
    counted = (
        len(events)
        if person is not None or (events and isinstance(events[0], PersonRegistered))
        else 0
    )
    return Decision(
        tuple(events), reply(person, command.request_id, result, command.at_ms, counted, **told)
    )


def state_change(
    c: Command,
    card: Card,
    index: int,
    op: str,
    new_state: CardState,
    reason: str = "",
    deadline_ms: int = 0,
) -> Event:
    return CardStateChanged(
        event_id(c, index),
        c.at_ms,
        c.ssn,
        card.card_no,
        op,
        card.state,
        new_state,
        reason,
        deadline_ms,
    )
