"""Random sequences of swipes, reversals, refunds and window operations on one person
(hypothesis RuleBasedStateMachine); the invariants are checked after every step:

- the balance never goes below zero;
- balance = credits − debits + refunds + reversal returns;
- no approval on a card that was not valid at that moment;
- pharmacy approvals per card per Beijing day never exceed its limit;
- a repeated request id never changes state.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from clearing import core
from clearing.codes import CardState, InstitutionType, ResultCode
from clearing.model import (
    AccountCredited,
    Authorize,
    CardCommand,
    Command,
    CreditAccount,
    ExpirePreLoss,
    LifetimeUnit,
    Person,
    PinOutcome,
    Policy,
    PreLossLifetime,
    Refund,
    Refunded,
    ReplaceCard,
    Reverse,
    SetPharmacyLimit,
    SwipeApproved,
    SwipeReversed,
)
from clearing.simulator import may_pay
from tests.unit.conftest import CARD, HOSPITAL, PHARMACY, POLICY, SSN, T0_MS, make_person

MACHINE_POLICY = Policy(
    institutions=POLICY.institutions,
    pre_loss_lifetimes={"": PreLossLifetime(24, LifetimeUnit.HOURS)},
)
OPS = [
    "report_pre_loss",
    "confirm_loss",
    "release",
    "apply_replacement",
    "freeze",
    "unfreeze",
    "unlock",
    "change_pin",
    "activate",
]


class PersonMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.person: Person = make_person(balance_fen=300_00)
        self.now = T0_MS
        self.credited = self.person.balance_fen
        self.debited = 0
        self.returned = 0
        self.request_ids: list[str] = []
        self.approved_ids: list[str] = []
        self.cards = [CARD]
        self.serial = 0

    def next_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}:{self.serial}"

    def run(self, command: Command) -> None:
        before = self.person
        new, decision = core.handle(before, command, MACHINE_POLICY)
        assert new is not None
        if decision.reply.replayed:
            assert new is before, "a repeated request id changed state"
        for event in decision.events:
            match event:
                case SwipeApproved():
                    card = before.card(event.card_no)
                    assert card is not None
                    assert may_pay(before, event.card_no, event.at_ms), (
                        f"approved on a card in {card.state.name}"
                    )
                    if event.institution_type == InstitutionType.PHARMACY:
                        today = core.pharmacy_swipes_on(new, event.card_no, event.day)
                        assert today <= card.pharmacy_swipes_per_day
                    self.debited += event.paid_from_account_fen
                    self.approved_ids.append(event.request_id)
                case AccountCredited():
                    self.credited += event.amount_fen
                case Refunded() | SwipeReversed():
                    self.returned += event.amount_fen
        self.person = new
        self.request_ids.append(command.request_id)

    @rule(
        amount=st.integers(min_value=1, max_value=120_00),
        pharmacy=st.booleans(),
        pin=st.sampled_from([PinOutcome.CORRECT, PinOutcome.CORRECT, PinOutcome.WRONG]),
        partial=st.booleans(),
        card_index=st.integers(min_value=0, max_value=3),
    )
    def swipe(self, amount: int, pharmacy: bool, pin: int, partial: bool, card_index: int) -> None:
        card = self.cards[card_index % len(self.cards)]
        self.run(
            Authorize(
                self.next_id("T1"),
                self.now,
                SSN,
                card,
                PHARMACY if pharmacy else HOSPITAL,
                amount,
                partial,
                pin,
            )
        )

    @precondition(lambda self: bool(self.request_ids))
    @rule(data=st.data())
    def repeat_a_request(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.request_ids))
        known = self.person.reply_to(rid)
        if known is None:
            return  # forgotten (bounded memory) or never remembered: not a repeat test
        before = self.person
        _, decision = core.handle(
            before, Authorize(rid, self.now, SSN, CARD, HOSPITAL, 1), MACHINE_POLICY
        )
        assert decision.reply.replayed and decision.events == ()

    @precondition(lambda self: bool(self.approved_ids))
    @rule(data=st.data())
    def reverse(self, data: st.DataObject) -> None:
        original = data.draw(st.sampled_from(self.approved_ids))
        record = self.person.swipe(original)
        card = record.card_no if record else CARD
        self.run(Reverse(self.next_id("R"), self.now, SSN, original, card))

    @precondition(lambda self: bool(self.approved_ids))
    @rule(data=st.data(), amount=st.integers(min_value=1, max_value=60_00))
    def refund(self, data: st.DataObject, amount: int) -> None:
        original = data.draw(st.sampled_from(self.approved_ids))
        record = self.person.swipe(original)
        card = record.card_no if record else CARD
        self.run(Refund(self.next_id("F"), self.now, SSN, original, card, amount))

    @rule(op=st.sampled_from(OPS), card_index=st.integers(min_value=0, max_value=3))
    def window(self, op: str, card_index: int) -> None:
        card = self.cards[card_index % len(self.cards)]
        self.run(CardCommand(self.next_id("W"), self.now, SSN, card, op))

    @rule(mode=st.sampled_from(["replacement", "change"]))
    def new_card(self, mode: str) -> None:
        card_no = f"N{len(self.cards):08d}"
        old = self.cards[-1]
        self.run(ReplaceCard(self.next_id("W"), self.now, SSN, old, card_no, mode))
        if self.person.card(card_no) is not None:
            self.cards.append(card_no)

    @rule(limit=st.integers(min_value=0, max_value=4))
    def set_limit(self, limit: int) -> None:
        self.run(SetPharmacyLimit(self.next_id("W"), self.now, SSN, self.cards[-1], limit))

    @rule(amount=st.integers(min_value=1, max_value=500_00), source=st.integers(0, 5))
    def credit(self, amount: int, source: int) -> None:
        self.run(CreditAccount(self.next_id("C"), self.now, SSN, amount, f"alloc-{source}"))

    @rule(minutes=st.sampled_from([1, 30, 6 * 60, 23 * 60, 25 * 60, 3 * 24 * 60]))
    def time_passes(self, minutes: int) -> None:
        self.now += minutes * 60_000
        for card in self.person.cards:  # the timer job's expiry commands
            if card.state == CardState.PRE_LOST and self.now >= card.pre_loss_deadline_ms:
                self.run(
                    ExpirePreLoss(
                        self.next_id("X"), self.now, SSN, card.card_no, card.pre_loss_deadline_ms
                    )
                )

    @invariant()
    def balance_is_never_negative(self) -> None:
        assert self.person.balance_fen >= 0

    @invariant()
    def money_is_conserved(self) -> None:
        assert self.person.balance_fen == self.credited - self.debited + self.returned

    @invariant()
    def no_result_code_is_unspecified(self) -> None:
        assert all(r.result != ResultCode.RESULT_CODE_UNSPECIFIED for r in self.person.replies)

    @invariant()
    def refunds_never_exceed_payments(self) -> None:
        for s in self.person.swipes:
            assert 0 <= s.refunded_fen <= s.paid_from_account_fen

    @invariant()
    def request_ids_are_unique_among_swipes(self) -> None:
        counts = Counter(s.request_id for s in self.person.swipes)
        assert not [r for r, n in counts.items() if n > 1]


PersonMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestPersonMachine = PersonMachine.TestCase
