"""EnrolPerson: one command for register → issue → activate → change PIN → credit, decided
by the same per-step rules, all or nothing, idempotent by its request id."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing import codec, core
from clearing.codes import CardKind, CardState, InsuranceCategory, ResultCode
from clearing.limits import AMOUNT_FEN_MAX
from clearing.model import (
    AccountCredited,
    CancelPerson,
    CardCommand,
    CardIssued,
    CardStateChanged,
    Command,
    CreditAccount,
    Decision,
    EnrolPerson,
    Event,
    IssueCard,
    Person,
    PersonRegistered,
    PinChanged,
    PinOutcome,
    Policy,
    RegisterPerson,
)
from tests.unit.conftest import CARD, POLICY, SSN, T0_MS, make_person, rid, run, swipe

PVV = "0123456789abcdef"


def enrol(
    request_id: str | None = None,
    *,
    category: InsuranceCategory = InsuranceCategory.EMPLOYEE,
    balance_fen: int = 250_00,
    **changes: object,
) -> EnrolPerson:
    command = EnrolPerson(
        request_id or rid(),
        T0_MS,
        SSN,
        "张三",
        category,
        "13800000000",
        "310101",
        CARD,
        CardKind.SOCIAL_SECURITY,
        PVV,
        balance_fen,
        "opening-1",
    )
    return replace(command, **changes)  # type: ignore[arg-type]


def separately(
    c: EnrolPerson, person: Person | None = None
) -> tuple[Person | None, list[Event], ResultCode]:
    """The five window commands, each with its own request id, as seeding used to send
    (written out here, not taken from the core's own list)."""
    steps: list[Command] = [
        RegisterPerson(rid(), c.at_ms, c.ssn, c.name, c.category, c.phone, c.region),
        IssueCard(rid(), c.at_ms, c.ssn, c.card_no, c.kind),
        CardCommand(rid(), c.at_ms, c.ssn, c.card_no, "activate"),
        CardCommand(rid(), c.at_ms, c.ssn, c.card_no, "change_pin", pvv=c.pvv),
    ]
    if c.opening_balance_fen:
        steps.append(CreditAccount(rid(), c.at_ms, c.ssn, c.opening_balance_fen, c.source_id))
    events: list[Event] = []
    for step in steps:
        person, decision = core.handle(person, step, POLICY)
        if decision.reply.result != ResultCode.OK:
            return person, events, decision.reply.result
        events.extend(decision.events)
    return person, events, ResultCode.OK


def without_ids(events: list[Event] | tuple[Event, ...]) -> list[Event]:
    return [replace(e, event_id="") for e in events]


def at_once(c: Command, person: Person | None = None) -> tuple[Person | None, Decision]:
    return core.handle(person, c, POLICY)


@pytest.mark.parametrize(
    ("category", "balance_fen", "kinds"),
    [
        (
            InsuranceCategory.EMPLOYEE,
            250_00,
            [PersonRegistered, CardIssued, CardStateChanged, PinChanged, AccountCredited],
        ),
        (
            InsuranceCategory.EMPLOYEE,
            0,
            [PersonRegistered, CardIssued, CardStateChanged, PinChanged],
        ),
        (
            InsuranceCategory.RESIDENT,
            0,
            [PersonRegistered, CardIssued, CardStateChanged, PinChanged],
        ),
    ],
)
def test_one_command_leaves_the_person_the_five_commands_leave(
    category: InsuranceCategory, balance_fen: int, kinds: list[type]
) -> None:
    command = enrol(category=category, balance_fen=balance_fen)
    expected, expected_events, code = separately(command)
    assert code == ResultCode.OK and expected is not None
    person, decision = at_once(command)
    assert decision.reply.result == ResultCode.OK and person is not None
    assert [type(e) for e in decision.events] == kinds
    assert without_ids(decision.events) == without_ids(expected_events)
    # the same aggregate; only the remembered replies differ (one instead of five)
    assert replace(person, replies=()) == replace(expected, replies=())
    assert [r.request_id for r in person.replies] == [command.request_id]
    (card,) = person.cards
    assert card.state == CardState.ACTIVE and not card.initial_pin and card.pvv == PVV
    reply = decision.reply
    assert reply.version == person.version == len(kinds)
    assert reply.balance_fen == person.balance_fen == balance_fen
    assert (reply.card_no, reply.card_state) == (CARD, CardState.ACTIVE)


def test_event_ids_derive_from_the_request_id_and_never_collide() -> None:
    command = enrol("W1:enrol-7")
    _, decision = at_once(command)
    ids = [e.event_id for e in decision.events]
    assert ids == [f"W1:enrol-7@{T0_MS}#{n}" for n in range(5)]
    redelivered = core.handle(None, codec.decode(codec.encode(command)), POLICY)[1]
    assert [e.event_id for e in redelivered.events] == ids  # a redelivery: the same ids


def test_an_enrolled_person_can_pay_with_the_pin_at_once() -> None:
    person, _ = at_once(enrol())
    _, code = run(person, swipe(12_50, pin=PinOutcome.CORRECT))
    assert code == ResultCode.OK


def test_a_repeat_is_answered_with_the_original_reply_and_changes_nothing() -> None:
    command = enrol()
    person, first = at_once(command)
    again, second = at_once(command, person)
    assert again is person and second.events == ()
    assert second.reply.replayed and replace(second.reply, replayed=False) == first.reply
    paid, _ = run(person, swipe(10_00))  # later commands do not make it forget
    later, third = at_once(command, paid)
    assert later is paid and third.events == () and third.reply.replayed


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"ssn": "110105194912310021"}, ResultCode.MALFORMED_REQUEST),  # check digit
        ({"request_id": "has space"}, ResultCode.MALFORMED_REQUEST),
        ({"at_ms": 0}, ResultCode.MALFORMED_REQUEST),
        ({"name": ""}, ResultCode.MALFORMED_REQUEST),
        ({"name": " 张三"}, ResultCode.MALFORMED_REQUEST),
        ({"phone": "12345"}, ResultCode.MALFORMED_REQUEST),
        ({"region": "x" * 33}, ResultCode.MALFORMED_REQUEST),
        (
            {"category": InsuranceCategory.INSURANCE_CATEGORY_UNSPECIFIED},
            ResultCode.MALFORMED_REQUEST,
        ),
        # refused after the person would have been registered: still nothing at all
        ({"card_no": "a0000001"}, ResultCode.MALFORMED_REQUEST),
        ({"card_no": ""}, ResultCode.MALFORMED_REQUEST),
        ({"kind": CardKind.TEMPORARY}, ResultCode.MALFORMED_REQUEST),
        ({"opening_balance_fen": -1}, ResultCode.MALFORMED_REQUEST),
        ({"opening_balance_fen": AMOUNT_FEN_MAX + 1}, ResultCode.MALFORMED_REQUEST),
        ({"source_id": ""}, ResultCode.MALFORMED_REQUEST),
        ({"category": InsuranceCategory.RESIDENT}, ResultCode.COLOUR_NOT_ALLOWED),
    ],
)
def test_invalid_enrolments_are_refused_with_nothing_made(
    changes: dict[str, object], code: ResultCode
) -> None:
    person, decision = at_once(enrol(**changes))  # type: ignore[arg-type]
    assert decision.reply.result == code
    assert person is None and decision.events == ()


def test_an_existing_person_is_refused_and_unchanged() -> None:
    existing = make_person()
    for command in (enrol(), enrol(card_no="B00000002"), enrol(card_no=CARD)):
        after, decision = at_once(command, existing)
        assert decision.reply.result == ResultCode.PERSON_EXISTS
        assert after is existing and decision.events == ()


def test_a_cancelled_person_is_refused_and_unchanged() -> None:
    cancelled, code = run(make_person(), CancelPerson(rid(), T0_MS, SSN, "death"))
    assert code == ResultCode.OK and cancelled is not None
    after, decision = at_once(enrol(card_no="B00000002"), cancelled)
    assert decision.reply.result == ResultCode.PERSON_EXISTS
    assert after is cancelled and decision.events == ()


def test_a_refusal_is_not_remembered_so_the_corrected_request_can_follow() -> None:
    command = enrol(phone="12345")
    _, refused = at_once(command)
    assert refused.reply.result == ResultCode.MALFORMED_REQUEST
    person, decision = at_once(replace(command, phone="13800000000"))
    assert decision.reply.result == ResultCode.OK and person is not None


def test_the_command_survives_the_codec() -> None:
    command = enrol()
    assert codec.decode(codec.encode(command)) == command


# a valid enrolment, varied, with at most two fields spoiled
valid = st.builds(
    lambda name, category, phone, card_no, balance, source: replace(
        enrol(balance_fen=balance if category == InsuranceCategory.EMPLOYEE else 0),
        name=name,
        category=category,
        phone=phone,
        card_no=card_no,
        source_id=source,
    ),
    st.sampled_from(["张三", "李四光", "赵"]),
    st.sampled_from(
        [InsuranceCategory.EMPLOYEE, InsuranceCategory.RESIDENT, InsuranceCategory.SPECIAL]
    ),
    st.sampled_from(["13800000000", "", "19912345678"]),
    st.sampled_from([CARD, "B00000002"]),
    st.one_of(st.just(0), st.integers(min_value=1, max_value=AMOUNT_FEN_MAX)),
    st.sampled_from(["opening-1", "alloc/2026:1"]),
)
SPOILS: list[dict[str, object]] = [
    {"name": ""},
    {"name": " 王"},
    {"name": "X" * 31},
    {"phone": "12345"},
    {"card_no": "a0000001"},
    {"card_no": "A000000012"},
    {"region": "r" * 33},
    {"category": InsuranceCategory.INSURANCE_CATEGORY_UNSPECIFIED},
    {"category": InsuranceCategory.RESIDENT},
    {"category": InsuranceCategory.SPECIAL},
    {"kind": CardKind.CARD_KIND_UNSPECIFIED},
    {"opening_balance_fen": -1},
    {"opening_balance_fen": AMOUNT_FEN_MAX + 1},
    {"opening_balance_fen": 1},
    {"source_id": ""},
    {"source_id": "bad id"},
]


@settings(max_examples=300, deadline=None)
@given(valid, st.lists(st.sampled_from(SPOILS), max_size=2), st.sampled_from([False] * 4 + [True]))
def test_enrolment_decides_exactly_as_its_steps_would(
    command: EnrolPerson, spoils: list[dict[str, object]], exists: bool
) -> None:
    """Whatever the input: OK with the steps' events and person, or the first refused
    step's code with no event and the person unchanged."""
    for spoil in spoils:
        command = replace(command, **spoil)  # type: ignore[arg-type]
    before = make_person() if exists else None
    person, decision = at_once(command, before)
    if command.opening_balance_fen < 0 or command.kind != CardKind.SOCIAL_SECURITY:
        # the separate commands have no such input to refuse: checked before the steps
        assert decision.reply.result == ResultCode.MALFORMED_REQUEST
        assert person is before and decision.events == ()
        return
    expected, expected_events, code = separately(command, before)
    assert decision.reply.result == code
    if code != ResultCode.OK:
        assert person is before and decision.events == ()
        return
    assert expected is not None and person is not None
    assert without_ids(decision.events) == without_ids(expected_events)
    assert replace(person, replies=()) == replace(expected, replies=())
    assert len({e.event_id for e in decision.events}) == len(decision.events)


@settings(max_examples=300, deadline=None)
@given(valid, st.lists(st.sampled_from(SPOILS), max_size=2))
def test_a_malformed_enrolment_names_its_field_and_only_a_malformed_one(
    command: EnrolPerson, spoils: list[dict[str, object]]
) -> None:
    """The window is told which field to correct: `enrolment_fault` names one exactly when
    the deciders refuse the enrolment of a new person as malformed."""
    for spoil in spoils:
        command = replace(command, **spoil)  # type: ignore[arg-type]
    _, decision = at_once(command)
    fault = core.enrolment_fault(command)
    assert (decision.reply.result == ResultCode.MALFORMED_REQUEST) == (fault is not None), fault


NOT_IDS = ["", "bad id", "x" * 200]
NOT_SSNS = ["", "31010119900101001", "X" * 18]


@settings(max_examples=400, deadline=None)
@given(
    valid,
    st.lists(st.sampled_from(SPOILS), max_size=2),
    st.sampled_from([None, *NOT_IDS]),
    st.sampled_from([None, *NOT_SSNS]),
    st.sampled_from([None, 0, -5]),
)
def test_the_registry_check_answers_as_deciding_a_new_person_would(
    command: EnrolPerson,
    spoils: list[dict[str, object]],
    request_id: str | None,
    ssn: str | None,
    at_ms: int | None,
) -> None:
    """The registry checks an enrolment with `new_person_enrolment` instead of deciding it:
    the answer must be the one the deciders give a person not yet registered, under any
    policy (the registry holds none)."""
    for spoil in spoils:
        command = replace(command, **spoil)  # type: ignore[arg-type]
    for name, value in (("request_id", request_id), ("ssn", ssn), ("at_ms", at_ms)):
        if value is not None:
            command = replace(command, **{name: value})  # type: ignore[arg-type]
    expected = core.new_person_enrolment(command)
    for policy in (POLICY, Policy()):
        assert core.decide(None, command, policy).reply.result == expected
