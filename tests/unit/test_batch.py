"""The clearing worker's batch step, without a broker: commands decided in order on the
persons the earlier ones left, PIN answers applied, and a stop where a PIN changed
earlier in the same batch (the worker asks the HSM again from there)."""

from __future__ import annotations

from dataclasses import replace

from clearing.batch import CheckedPin, needs_pin, step
from clearing.codes import ResultCode
from clearing.model import Authorize, BalanceInquiry, CardCommand, PinOutcome
from tests.unit.conftest import CARD, HOSPITAL, POLICY, SSN, T0_MS, make_person

KEY = SSN.encode()
SECURED = replace(POLICY, pin_verification_required=True)
PVV_NEW = "fedcba9876543210"


def authorize(n: int, amount_fen: int = 10_00) -> Authorize:
    return Authorize(f"T1:{n}", T0_MS + n, SSN, CARD, HOSPITAL, amount_fen)


def test_commands_are_decided_in_order_on_what_the_earlier_ones_left() -> None:
    person = make_person(balance_fen=25_00)
    commands = [(KEY, authorize(1)), (KEY, authorize(2)), (KEY, authorize(3))]
    result = step({KEY: person}, commands, {}, POLICY)
    codes = [d.reply.result for d in result.decided]
    assert codes == [ResultCode.OK, ResultCode.OK, ResultCode.INSUFFICIENT_BALANCE]
    assert result.recheck_from is None
    assert result.persons[KEY] is not None and result.persons[KEY].balance_fen == 5_00  # type: ignore[union-attr]
    assert [d.index for d in result.decided] == [0, 1, 2]


def test_pin_answers_are_applied_and_a_repeat_needs_none() -> None:
    person = make_person()
    card = person.card(CARD)
    assert card is not None
    answers = {
        0: CheckedPin(PinOutcome.CORRECT, card.pvv),
        1: CheckedPin(PinOutcome.WRONG, card.pvv),
    }
    result = step({KEY: person}, [(KEY, authorize(1)), (KEY, authorize(2))], answers, SECURED)
    assert [d.reply.result for d in result.decided] == [ResultCode.OK, ResultCode.PIN_WRONG]
    after = result.persons[KEY]
    assert not needs_pin(after, authorize(1))  # a repeat is answered from memory
    assert needs_pin(after, BalanceInquiry("T1:9", T0_MS, SSN, CARD, HOSPITAL))


def test_a_pin_changed_earlier_in_the_batch_stops_the_step_for_a_new_answer() -> None:
    person = make_person()
    card = person.card(CARD)
    assert card is not None
    change = CardCommand("W1:1", T0_MS, SSN, CARD, "change_pin", pvv=PVV_NEW)
    commands = [(KEY, change), (KEY, authorize(2))]
    answers = {1: CheckedPin(PinOutcome.CORRECT, card.pvv)}  # asked before the change
    first = step({KEY: person}, commands, answers, SECURED)
    assert first.recheck_from == 1 and [d.index for d in first.decided] == [0]
    persons = {KEY: first.persons[KEY]}
    second = step(persons, commands, {1: CheckedPin(PinOutcome.WRONG, PVV_NEW)}, SECURED, first=1)
    assert [d.reply.result for d in second.decided] == [ResultCode.PIN_WRONG]
