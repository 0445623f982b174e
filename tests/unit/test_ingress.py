"""The ingress checks (clearing/ingress.py) in their order, fed with the HSM's answers as
values the way the gateway feeds them; and the core's answer for a card no one holds."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import replace

import pytest

from clearing import core, ingress, pos
from clearing.codes import ResultCode
from clearing.ingress import Arrival, Ask
from clearing.model import (
    Authorize,
    BalanceInquiry,
    CreditAccount,
    PinOutcome,
    Refund,
    Reverse,
)
from tests.unit.conftest import CARD, HOSPITAL, POLICY, SSN, T0_MS, make_person

Answers = Mapping[Ask, ResultCode | PinOutcome]
CLEAN: Answers = {
    Ask.MAC: ResultCode.OK,
    Ask.CRYPTOGRAM: ResultCode.OK,
    Ask.PIN_FORM: PinOutcome.NOT_VERIFIED,
}
# Each fault: (its group: faults of one group cannot hold at once, the list entry that
# answers it, the answer); a fault is an HSM answer, or the request's form.
FAULTS: dict[str, tuple[str, ResultCode, ResultCode]] = {
    "malformed": ("form", ResultCode.MALFORMED_REQUEST, ResultCode.MALFORMED_REQUEST),
    "mac": ("mac", ResultCode.MAC_INVALID, ResultCode.MAC_INVALID),
    "no keys": ("mac", ResultCode.MAC_INVALID, ResultCode.TERMINAL_UNKNOWN),
    "pin block": ("pin", ResultCode.PIN_BLOCK_INVALID, ResultCode.PIN_BLOCK_INVALID),
    "cryptogram": ("cryptogram", ResultCode.CRYPTOGRAM_INVALID, ResultCode.CRYPTOGRAM_INVALID),
}


def admit(arrival: Arrival, answers: Answers) -> tuple[ResultCode | None, list[Ask]]:
    """The gateway's loop: run the list, answer what it asks, until it decides."""
    asked: list[Ask] = []
    while True:
        said = ingress.verdict(arrival)
        if said is None:
            return None, asked
        if isinstance(said, ingress.Refused):
            return said.code, asked
        assert said not in asked, f"{said} asked twice"
        asked.append(said)
        arrival = arrival.told(said, answers[said])


def with_faults(names: tuple[str, ...]) -> tuple[Arrival, Answers]:
    arrival = Arrival(None, secured=True, swipe=True)
    answers = dict(CLEAN)
    for name in names:
        if name == "malformed":
            arrival = replace(arrival, form_problem="card_no")
        elif name == "mac":
            answers[Ask.MAC] = ResultCode.MAC_INVALID
        elif name == "no keys":
            answers[Ask.MAC] = ResultCode.TERMINAL_UNKNOWN
        elif name == "pin block":
            answers[Ask.PIN_FORM] = PinOutcome.INVALID_BLOCK
        elif name == "cryptogram":
            answers[Ask.CRYPTOGRAM] = ResultCode.CRYPTOGRAM_INVALID
    return arrival, answers


def expected(names: tuple[str, ...]) -> ResultCode | None:
    """The answer of the fault whose list entry comes first; a malformed PIN block alone
    is not the ingress's to answer (the worker checks it against the card's PIN)."""
    counted = [n for n in names if n != "pin block" or "cryptogram" in names]
    if not counted:
        return None
    first = min(counted, key=lambda n: FAULTS[n][1])
    return FAULTS[first][2]


def test_a_clean_swipe_asks_the_mac_and_the_cryptogram_only() -> None:
    arrival, answers = with_faults(())
    assert admit(arrival, answers) == (None, [Ask.MAC, Ask.CRYPTOGRAM])
    not_a_swipe = replace(arrival, swipe=False)
    assert admit(not_a_swipe, answers) == (None, [Ask.MAC])
    unsecured = Arrival(None, secured=False, swipe=True)
    assert admit(unsecured, {}) == (None, [])
    assert admit(replace(unsecured, form_problem="amount_fen"), {}) == (
        ResultCode.MALFORMED_REQUEST,
        [],
    )


def test_each_fault_alone() -> None:
    for name in FAULTS:
        code, _asked = admit(*with_faults((name,)))
        assert code == expected((name,)), name
    assert admit(*with_faults(("pin block",)))[0] is None  # the worker's to decide


def test_every_pair_and_triple_of_faults_is_answered_in_the_lists_order() -> None:
    cases = [
        names
        for size in (2, 3)
        for names in itertools.combinations(FAULTS, size)
        if len({FAULTS[n][0] for n in names}) == size
    ]
    assert len(cases) >= 14
    wrong = [
        (names, got) for names in cases if (got := admit(*with_faults(names))[0]) != expected(names)
    ]
    assert wrong == []


def test_the_pin_form_is_asked_only_when_the_cryptogram_fails() -> None:
    _code, asked = admit(*with_faults(("cryptogram",)))
    assert asked == [Ask.MAC, Ask.CRYPTOGRAM, Ask.PIN_FORM]
    arrival, answers = with_faults(())
    answers = {**answers, Ask.CRYPTOGRAM: ResultCode.UNAVAILABLE}
    assert admit(arrival, answers) == (ResultCode.UNAVAILABLE, [Ask.MAC, Ask.CRYPTOGRAM])


def test_the_ingress_and_the_persons_lists_are_one_order() -> None:
    order = ingress.SWIPE_ORDER
    assert list(order) == sorted(order)
    assert order[: len(ingress.INGRESS_ORDER)] == ingress.INGRESS_ORDER
    assert set(order) == set(ingress.INGRESS_ORDER) | set(pos.SWIPE_ORDER)
    with pytest.raises(AssertionError, match="out of result-code order"):
        pos.in_code_order((ResultCode.CRYPTOGRAM_INVALID, ResultCode.MAC_INVALID), "backwards")


# ---------------------------------------------------------------------------- unrouted


def swipe(**changes: object) -> Authorize:
    base = Authorize("T1:9", T0_MS, "", "Z99999999", HOSPITAL, 10_00)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_card_no_one_holds_is_decided_by_the_persons_list_on_no_person() -> None:
    assert ingress.decide_unrouted(swipe(), POLICY).result == ResultCode.CARD_UNKNOWN
    assert ingress.decide_unrouted(swipe(institution_id="NOWHERE1"), POLICY).result == (
        ResultCode.INSTITUTION_UNKNOWN
    )
    assert ingress.decide_unrouted(
        swipe(pin=PinOutcome.INVALID_BLOCK, institution_id="NOWHERE1"), POLICY
    ).result == (ResultCode.PIN_BLOCK_INVALID)
    assert ingress.decide_unrouted(swipe(card_no="x"), POLICY).result == (
        ResultCode.MALFORMED_REQUEST
    )
    enquiry = BalanceInquiry("T1:10", T0_MS, "", "Z99999999", HOSPITAL)
    assert ingress.decide_unrouted(enquiry, POLICY).result == ResultCode.CARD_UNKNOWN


def test_an_unrouted_reversal_or_refund_finds_no_original() -> None:
    reverse = Reverse("T1:11", T0_MS, "", "T1:9", "Z99999999")
    refund = Refund("T1:12", T0_MS, "", "T1:9", "Z99999999", 1_00)
    for command in (reverse, refund):
        reply = ingress.decide_unrouted(command, POLICY)
        assert reply.result == ResultCode.ORIGINAL_NOT_FOUND, type(command).__name__
        assert reply.version == 0 and reply.balance_fen == 0
    assert ingress.decide_unrouted(replace(reverse, original_request_id=""), POLICY).result == (
        ResultCode.MALFORMED_REQUEST
    )
    credit = CreditAccount("W1:1", T0_MS, "", 1_00, "src")
    assert ingress.decide_unrouted(credit, POLICY).result == ResultCode.CARD_UNKNOWN


def test_a_pin_check_the_hsm_did_not_answer_decides_nothing() -> None:
    """UNAVAILABLE, no event, nothing remembered: the same request asked again once the
    HSM answers is decided as if it were the first time."""
    person = make_person()
    silent = Authorize("T1:20", T0_MS + 1, SSN, CARD, HOSPITAL, 10_00, pin=PinOutcome.UNAVAILABLE)
    after, decision = core.handle(person, silent, POLICY)
    assert decision.reply.result == ResultCode.UNAVAILABLE
    assert decision.events == () and after is person
    answered = replace(silent, pin=PinOutcome.CORRECT)
    _after, again = core.handle(after, answered, POLICY)
    assert again.reply.result == ResultCode.OK and not again.reply.replayed
    enquiry = BalanceInquiry("T1:21", T0_MS + 1, SSN, CARD, HOSPITAL, pin=PinOutcome.UNAVAILABLE)
    after, decision = core.handle(person, enquiry, POLICY)
    assert decision.reply.result == ResultCode.UNAVAILABLE
    assert decision.events == () and after is person and decision.reply.balance_fen == 0
