"""Published events name cards by token: no full card number in any field of any event."""

from __future__ import annotations

from clearing import codec, core
from clearing.codes import CardState, ResultCode
from clearing.model import (
    CardCommand,
    CardIssued,
    Event,
    ExpirePreLoss,
    Person,
    PinOutcome,
    Refund,
    ReplaceCard,
    Reverse,
    SetPharmacyLimit,
)
from clearing.redact import CardTokens, published
from tests.unit.conftest import CARD, POLICY, SSN, T0_MS, make_person, rid, swipe

NEW_CARD = "A00000002"
TOKENS = CardTokens(b"k" * 32)


def _lifecycle() -> list[Event]:
    """Every kind of event that names a card, from one person's history."""
    events: list[Event] = []
    person: Person | None = make_person()

    def run(command: object) -> ResultCode:
        nonlocal person
        person, decision = core.handle(person, command, POLICY)  # type: ignore[arg-type]
        events.extend(decision.events)
        return decision.reply.result

    approved = swipe(amount_fen=5_00)
    assert run(approved) == ResultCode.OK
    assert run(swipe(pin=PinOutcome.WRONG)) == ResultCode.PIN_WRONG  # declined
    assert run(Reverse(rid(), T0_MS, SSN, approved.request_id, CARD)) == ResultCode.OK
    assert run(Reverse(rid(), T0_MS, SSN, "never-sent", CARD)) != ResultCode.OK  # unmatched
    second = swipe(amount_fen=3_00)
    assert run(second) == ResultCode.OK
    assert run(Refund(rid(), T0_MS, SSN, second.request_id, CARD, 1_00)) == ResultCode.OK
    assert run(SetPharmacyLimit(rid(), T0_MS, SSN, CARD, 2)) == ResultCode.OK
    assert run(CardCommand(rid(), T0_MS, SSN, CARD, "confirm_loss")) == ResultCode.OK
    assert run(CardCommand(rid(), T0_MS, SSN, CARD, "apply_replacement")) == ResultCode.OK
    assert run(ReplaceCard(rid(), T0_MS, SSN, CARD, NEW_CARD)) == ResultCode.OK
    return events


def test_no_published_event_carries_a_card_number() -> None:
    events = _lifecycle()
    kinds = {type(e).__name__ for e in events}
    assert {"SwipeApproved", "SwipeDeclined", "SwipeReversed", "ReversalUnmatched", "Refunded",
            "PharmacyLimitSet", "CardStateChanged", "CardIssued"} <= kinds  # fmt: skip
    assert any(CARD.encode() in codec.encode(e) for e in events)  # the core's own events do
    for event in events:
        raw = codec.encode(published(event, TOKENS))
        assert CARD.encode() not in raw and NEW_CARD.encode() not in raw, raw


def test_tokens_are_stable_keyed_and_masks_keep_the_last_four() -> None:
    events = [published(e, TOKENS) for e in _lifecycle()]
    by_card = {e.card_ref for e in events if getattr(e, "card_masked", "").endswith("0001")}
    assert by_card == {TOKENS.card_ref(CARD)}  # one card, one token, joinable
    assert TOKENS.card_ref(CARD) != CardTokens(b"x" * 32).card_ref(CARD)  # keyed
    issued = [e for e in events if isinstance(e, CardIssued) and e.replaces_card_ref]
    assert issued[0].replaces_card_ref == TOKENS.card_ref(CARD)
    assert issued[0].card_ref == TOKENS.card_ref(NEW_CARD)
    assert issued[0].card_masked == "*****0002"


def test_an_expiry_from_the_timer_names_the_card_by_deadline_only() -> None:
    person: Person | None = make_person()
    person, decision = core.handle(
        person, CardCommand(rid(), T0_MS, SSN, CARD, "report_pre_loss"), POLICY
    )
    assert person is not None and decision.reply.result == ResultCode.OK
    deadline = person.cards[0].pre_loss_deadline_ms
    early = ExpirePreLoss(rid(), deadline - 1, SSN, "", deadline, card_ref="ct_x")
    assert core.handle(person, early, POLICY)[1].events == ()
    lapsed, decision = core.handle(
        person, ExpirePreLoss(rid(), deadline, SSN, "", deadline), POLICY
    )
    assert decision.reply.result == ResultCode.OK and lapsed is not None
    assert lapsed.cards[0].state == CardState.ACTIVE
    other = ExpirePreLoss(rid(), deadline, SSN, "", deadline + 1)  # no card has that deadline
    assert core.handle(person, other, POLICY)[1].events == ()
