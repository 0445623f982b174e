"""Money back to the account: a reversal (冲正) and a refund (退费) of a swipe.

Pure, like the rest of the core; `clearing.core.decide` calls these after its checks of
every command (the request id, the social security number, a repeat), and
`clearing.ingress.decide_unrouted` calls them on no person for a card no one holds.

Reversals and refunds. A reversal is idempotent by its own request id and returns what
the swipe paid from the account and has not been refunded. A reversal of a swipe never
seen is answered ORIGINAL_NOT_FOUND and remembered, so the original arriving later is
refused (ALREADY_REVERSED) rather than approved. Refunds never exceed what was paid; a
reversed swipe cannot be refunded.
"""

from __future__ import annotations

from clearing import validate
from clearing.codes import ResultCode
from clearing.decisions import event_id, unchanged, with_events
from clearing.model import (
    Decision,
    Person,
    Refund,
    Refunded,
    ReversalUnmatched,
    Reverse,
    SwipeReversed,
)


def decide_reverse(person: Person | None, c: Reverse) -> Decision:
    """Idempotent by its own request id; a reversal of an unknown or declined swipe is
    answered (ORIGINAL_NOT_FOUND / ORIGINAL_DECLINED), not an error. It returns what the
    swipe paid from the account and has not been refunded; the swipe stops counting
    towards the daily pharmacy limit."""
    if (
        not validate.is_id(c.original_request_id)
        or not validate.is_card_no(c.card_no)
        or c.amount_fen < 0
    ):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if person is None:
        return unchanged(person, c.request_id, ResultCode.ORIGINAL_NOT_FOUND, c.at_ms)
    record = person.swipe(c.original_request_id)
    if record is None:
        original = person.reply_to(c.original_request_id)
        if original is not None and original.result == ResultCode.ALREADY_REVERSED:
            return unchanged(person, c.request_id, ResultCode.ALREADY_REVERSED, c.at_ms)
        if original is not None and not original.result.approved:
            return unchanged(
                person, c.request_id, ResultCode.ORIGINAL_DECLINED, c.at_ms, card_no=c.card_no
            )
        # Never seen: remember it, so the original arriving late is refused, not approved.
        unmatched = ReversalUnmatched(
            event_id(c, 0), c.at_ms, c.ssn, c.request_id, c.original_request_id, c.card_no
        )
        return with_events(person, c, [unmatched], ResultCode.ORIGINAL_NOT_FOUND, card_no=c.card_no)
    if record.card_no != c.card_no or (c.amount_fen and c.amount_fen != record.amount_fen):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if record.reversed:
        return unchanged(
            person, c.request_id, ResultCode.ALREADY_REVERSED, c.at_ms, card_no=c.card_no
        )
    returned = record.paid_from_account_fen - record.refunded_fen
    balance = person.balance_fen + returned
    event = SwipeReversed(
        event_id(c, 0),
        c.at_ms,
        c.ssn,
        c.request_id,
        c.original_request_id,
        c.card_no,
        record.institution_id,
        returned,
        balance,
        record.day,
    )
    return with_events(
        person, c, [event], amount_fen=returned, balance_fen=balance, card_no=c.card_no
    )


def decide_refund(person: Person | None, c: Refund) -> Decision:
    if (
        not validate.is_id(c.original_request_id)
        or not validate.is_card_no(c.card_no)
        or not validate.is_amount_fen(c.amount_fen)
    ):
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    record = person.swipe(c.original_request_id) if person else None
    if person is None or record is None:
        return unchanged(person, c.request_id, ResultCode.ORIGINAL_NOT_FOUND, c.at_ms)
    if record.card_no != c.card_no:
        return unchanged(person, c.request_id, ResultCode.MALFORMED_REQUEST, c.at_ms)
    if record.reversed:
        return unchanged(person, c.request_id, ResultCode.ALREADY_REVERSED, c.at_ms)
    refundable = record.paid_from_account_fen - record.refunded_fen
    if c.amount_fen > refundable:
        return unchanged(
            person, c.request_id, ResultCode.REFUND_EXCEEDS_PAID, c.at_ms, amount_fen=refundable
        )
    balance = person.balance_fen + c.amount_fen
    event = Refunded(
        event_id(c, 0),
        c.at_ms,
        c.ssn,
        c.request_id,
        c.original_request_id,
        c.card_no,
        record.institution_id,
        c.amount_fen,
        balance,
    )
    return with_events(
        person,
        c,
        [event],
        amount_fen=c.amount_fen,
        balance_fen=balance,
        paid_from_account_fen=refundable - c.amount_fen,
        card_no=c.card_no,
    )
