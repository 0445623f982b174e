"""The timer job's pure part: which expiry commands are due, and when they are resent."""

from __future__ import annotations

from clearing.codes import CardState
from clearing.model import CardStateChanged
from clearing.redact import CONTACT, PERSON, CardTokens, Redaction, Sealer, published
from stream_jobs.pre_loss import RESEND_AFTER_MS, Pending, due, expiry_request_id, track
from tests.unit.conftest import SSN

REF = "ct_0123456789abcdef01234567"  # published events carry the card token, not the number
PERSON_KEY = Sealer(PERSON, b"p" * 32)


def changed(new: CardState, deadline_ms: int = 0) -> CardStateChanged:
    event = CardStateChanged(
        "e#0",
        1,
        SSN,
        "",
        "report_pre_loss",
        CardState.ACTIVE,
        new,
        "",
        deadline_ms,
        card_ref=REF,
    )
    keys = Redaction(CardTokens(b"t" * 32), Sealer(CONTACT, b"c" * 32), PERSON_KEY)
    return published(event, keys)


def test_a_report_is_tracked_and_any_other_change_ends_it() -> None:
    tracked = track(changed(CardState.PRE_LOST, 5_000))
    assert tracked is not None and (tracked.card_ref, tracked.deadline_ms) == (REF, 5_000)
    assert SSN not in tracked.sealed_ssn  # kept sealed in the timer's table
    assert PERSON_KEY.open(tracked.sealed_ssn) == {"ssn": SSN}
    for state in (CardState.LOST, CardState.ACTIVE, CardState.REPLACED):
        assert track(changed(state)) is None


def test_due_sends_passed_deadlines_once_per_resend_window() -> None:
    sealed = PERSON_KEY.seal({"ssn": SSN}, "e#0")
    pending = [Pending(sealed, REF, 1_000), Pending(sealed, "ct_other", 10**9)]
    sent: dict[str, int] = {}

    def open_ssn(value: str) -> str:
        return PERSON_KEY.open(value)["ssn"]

    first = due(pending, sent, now_ms=2_000, open_ssn=open_ssn)
    assert [(c.ssn, c.card_ref, c.card_no, c.deadline_ms, c.at_ms) for c in first] == [
        (SSN, REF, "", 1_000, 2_000)
    ]
    assert first[0].request_id == expiry_request_id(pending[0])
    sent[first[0].request_id] = 2_000
    assert due(pending, sent, now_ms=2_000 + RESEND_AFTER_MS - 1, open_ssn=open_ssn) == []
    again = due(pending, sent, now_ms=2_000 + RESEND_AFTER_MS, open_ssn=open_ssn)
    assert [c.card_ref for c in again] == [REF]
