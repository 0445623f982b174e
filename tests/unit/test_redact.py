"""Published events name cards and persons by token: no full card number, social
security number, name or phone in any field of any event; names and phones are sealed
for the sms job, a pre-loss report's ssn for the timer."""

from __future__ import annotations

import pytest

from clearing import codec, core
from clearing.codes import CardState, InsuranceCategory, ResultCode
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
from clearing.redact import (
    CONTACT,
    PERSON,
    CardTokens,
    Redaction,
    Sealer,
    SealError,
    card_index_owner,
    card_index_record,
    published,
)
from tests.unit.conftest import CARD, POLICY, SSN, T0_MS, make_person, rid, swipe

NEW_CARD = "A00000002"
TOKENS = CardTokens(b"k" * 32)
REDACTION = Redaction(TOKENS, Sealer(CONTACT, b"c" * 32), Sealer(PERSON, b"p" * 32))


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
    assert {
        "SwipeApproved",
        "SwipeDeclined",
        "SwipeReversed",
        "ReversalUnmatched",
        "Refunded",
        "PharmacyLimitSet",
        "CardStateChanged",
        "CardIssued",
    } <= kinds
    assert any(CARD.encode() in codec.encode(e) for e in events)  # the core's own events do
    for event in events:
        raw = codec.encode(published(event, REDACTION))
        assert CARD.encode() not in raw and NEW_CARD.encode() not in raw, raw


def test_tokens_are_stable_keyed_and_masks_keep_the_last_four() -> None:
    events = [published(e, REDACTION) for e in _lifecycle()]
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


def test_no_published_event_carries_the_ssn_a_name_or_a_phone() -> None:
    from clearing.model import PersonRegistered, PhoneSet, RegisterPerson, SetPhone

    events = _lifecycle()
    person, first = core.handle(
        None,
        RegisterPerson(rid(), T0_MS, SSN, "欧阳娜娜", InsuranceCategory.EMPLOYEE, "13912345678"),
        POLICY,
    )
    _, second = core.handle(person, SetPhone(rid(), T0_MS, SSN, "13787654321"), POLICY)
    events += [*first.events, *second.events]
    for event in events:
        out = published(event, REDACTION)
        raw = codec.encode(out)
        for secret in (SSN, SSN[6:14], "欧阳娜娜", "娜娜", "13912345678", "13787654321"):
            assert secret.encode() not in raw, (type(event).__name__, secret)
        assert out.person_ref == TOKENS.person_ref(SSN) and out.ssn_masked == "110105********002X"
        assert published(out, REDACTION) == out  # publishing twice changes nothing
        assert published(event, REDACTION) == out  # a redelivery publishes the same bytes
    registered = published(first.events[0], REDACTION)
    assert isinstance(registered, PersonRegistered)
    assert (registered.name_masked, registered.phone_masked) == ("欧***", "139****5678")
    assert REDACTION.contact.open(registered.sealed) == {"name": "欧阳娜娜", "phone": "13912345678"}
    phone = published(second.events[0], REDACTION)
    assert isinstance(phone, PhoneSet) and REDACTION.contact.open(phone.sealed) == {
        "phone": "13787654321"
    }


def test_sealed_values_open_only_under_their_key_and_unchanged() -> None:
    contact = REDACTION.contact
    sealed = contact.seal({"phone": "13912345678"}, "T1:1@5#0")
    assert sealed.startswith(contact.key_id + ":") and contact.key_id.startswith("contact-")
    assert contact.seal({"phone": "13912345678"}, "T1:1@5#0") == sealed  # deterministic
    assert contact.seal({"phone": "13912345678"}, "T1:2@5#0") != sealed  # another nonce
    with pytest.raises(SealError):
        REDACTION.person.open(sealed)  # another purpose's key
    with pytest.raises(SealError):
        Sealer(CONTACT, b"d" * 32).open(sealed)  # another key of the same purpose
    key_id, nonce, body = sealed.split(":")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(SealError):
        contact.open(f"{key_id}:{nonce}:{flipped}")


def test_a_pre_loss_report_carries_the_ssn_sealed_for_the_timer_and_the_index_too() -> None:
    person: Person | None = make_person()
    person, decision = core.handle(
        person, CardCommand(rid(), T0_MS, SSN, CARD, "report_pre_loss"), POLICY
    )
    (report,) = [published(e, REDACTION) for e in decision.events]
    assert REDACTION.person.open(report.sealed) == {"ssn": SSN}  # type: ignore[union-attr]
    key, value = card_index_record(CARD, SSN, REDACTION)
    assert key == TOKENS.card_ref(CARD).encode() and SSN.encode() not in value
    assert card_index_owner(value, REDACTION.person) == SSN
    with pytest.raises(SealError):
        card_index_owner(SSN.encode(), REDACTION.person)  # a clear ssn is no record of ours
