"""The timer job's pure part: which expiry commands are due, and when they are resent."""

from __future__ import annotations

from clearing.codes import CardState
from clearing.model import CardStateChanged
from stream_jobs.pre_loss import RESEND_AFTER_MS, Pending, due, expiry_request_id, track
from tests.unit.conftest import SSN

REF = "ct_0123456789abcdef01234567"  # published events carry the card token, not the number


def changed(new: CardState, deadline_ms: int = 0) -> CardStateChanged:
    return CardStateChanged(
        "e#0", 1, SSN, "", "op", CardState.ACTIVE, new, "", deadline_ms, card_ref=REF
    )


def test_a_report_is_tracked_and_any_other_change_ends_it() -> None:
    assert track(changed(CardState.PRE_LOST, 5_000)) == Pending(SSN, REF, 5_000)
    for state in (CardState.LOST, CardState.ACTIVE, CardState.REPLACED):
        assert track(changed(state)) is None


def test_due_sends_passed_deadlines_once_per_resend_window() -> None:
    pending = [Pending(SSN, REF, 1_000), Pending(SSN, "ct_other", 10**9)]
    sent: dict[str, int] = {}
    first = due(pending, sent, now_ms=2_000)
    assert [(c.card_ref, c.card_no, c.deadline_ms, c.at_ms) for c in first] == [
        (REF, "", 1_000, 2_000)
    ]
    assert first[0].request_id == expiry_request_id(pending[0])
    sent[first[0].request_id] = 2_000
    assert due(pending, sent, now_ms=2_000 + RESEND_AFTER_MS - 1) == []
    again = due(pending, sent, now_ms=2_000 + RESEND_AFTER_MS)
    assert [c.card_ref for c in again] == [REF]
