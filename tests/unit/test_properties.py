"""Properties of the core over random command sequences (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from clearing import core
from clearing.model import AccountCredited, Authorize, CreditAccount, PinOutcome, SwipeApproved
from tests.unit.conftest import CARD, HOSPITAL, PHARMACY, POLICY, SSN, T0_MS, make_person

amounts = st.integers(min_value=-10, max_value=2_000_00)
request_ids = st.integers(min_value=1, max_value=25).map(lambda n: f"T9:{n}")
swipes = st.builds(
    lambda rid, amount, inst, partial, pin, minutes: Authorize(
        rid, T0_MS + minutes * 60_000, SSN, CARD, inst, amount, partial, pin
    ),
    request_ids,
    amounts,
    st.sampled_from([PHARMACY, HOSPITAL]),
    st.booleans(),
    st.sampled_from([PinOutcome.CORRECT, PinOutcome.NOT_VERIFIED, PinOutcome.WRONG]),
    st.integers(min_value=0, max_value=4 * 24 * 60),
)
credits = st.builds(
    lambda rid, amount, src: CreditAccount(f"W:{rid}", T0_MS, SSN, amount, f"src-{src}"),
    st.integers(min_value=1, max_value=30),
    amounts,
    st.integers(min_value=1, max_value=5),
)
commands = st.lists(st.one_of(swipes, swipes, swipes, credits), max_size=60)


@settings(max_examples=300, deadline=None)
@given(commands)
def test_balance_is_never_negative_and_money_is_conserved(sequence: list[object]) -> None:
    person = make_person(balance_fen=100_00)
    opening = person.balance_fen
    credited = debited = 0
    for command in sequence:
        new, decision = core.handle(person, command, POLICY)  # type: ignore[arg-type]
        assert new is not None
        assert new.balance_fen >= 0
        for event in decision.events:
            if isinstance(event, SwipeApproved):
                debited += event.paid_from_account_fen
            if isinstance(event, AccountCredited):
                credited += event.amount_fen
        person = new
    assert person.balance_fen == opening + credited - debited


@settings(max_examples=200, deadline=None)
@given(commands)
def test_a_repeated_request_id_never_debits_twice(sequence: list[object]) -> None:
    person = make_person(balance_fen=100_00)
    debited_by_request: dict[str, int] = {}
    first_reply: dict[str, object] = {}
    for command in sequence:
        new, decision = core.handle(person, command, POLICY)  # type: ignore[arg-type]
        assert new is not None
        rid = command.request_id  # type: ignore[attr-defined]
        if rid in first_reply:
            # a command that was decided (made events) is remembered: within the memory
            # bound every repeat is a replay of the original reply and changes nothing
            assert decision.reply.replayed and decision.events == ()
            assert new is person
        elif decision.events:
            first_reply[rid] = decision.reply
        for event in decision.events:
            if isinstance(event, SwipeApproved):
                assert event.request_id not in debited_by_request
                debited_by_request[event.request_id] = event.paid_from_account_fen
        person = new
