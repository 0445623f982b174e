"""Builders for pure-core tests: a policy, a person with an active blue card, commands."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from clearing import core, simulator
from clearing.codes import CardKind, InstitutionType, InsuranceCategory, ResultCode
from clearing.model import (
    Authorize,
    CardCommand,
    Command,
    CreditAccount,
    Institution,
    IssueCard,
    Person,
    Policy,
    RegisterPerson,
)

SSN = "11010519491231002X"
CARD = "A00000001"
PHARMACY = "310101P00001"
HOSPITAL = "310101H00001"
CLOSED = "310101P99999"
T0_MS = 1_795_000_000_000  # 2026-11-19 (an instant; tests add to it)

POLICY = Policy(
    institutions={
        PHARMACY: Institution(PHARMACY, "药房", InstitutionType.PHARMACY),
        HOSPITAL: Institution(HOSPITAL, "医院", InstitutionType.HOSPITAL),
        CLOSED: Institution(CLOSED, "停业药房", InstitutionType.PHARMACY, designated=False),
    }
)

_ids = itertools.count(1)


def rid() -> str:
    return f"req-{next(_ids)}"


def run(person: Person | None, command: Command) -> tuple[Person | None, ResultCode]:
    new, decision = core.handle(person, command, POLICY)
    return new, decision.reply.result


def make_person(
    balance_fen: int = 100_00,
    category: InsuranceCategory = InsuranceCategory.EMPLOYEE,
    activate: bool = True,
    change_pin: bool = True,
) -> Person:
    person: Person | None = None
    person, code = run(person, RegisterPerson(rid(), T0_MS, SSN, "张三", category, "13800000000"))
    assert code == ResultCode.OK
    person, code = run(person, IssueCard(rid(), T0_MS, SSN, CARD, CardKind.SOCIAL_SECURITY))
    assert code == ResultCode.OK
    if activate:
        person, code = run(person, CardCommand(rid(), T0_MS, SSN, CARD, "activate"))
        assert code == ResultCode.OK
    if change_pin:
        person, code = run(person, CardCommand(rid(), T0_MS, SSN, CARD, "change_pin"))
        assert code == ResultCode.OK
    if balance_fen:
        person, code = run(person, CreditAccount(rid(), T0_MS, SSN, balance_fen, f"src-{rid()}"))
        assert code == ResultCode.OK
    assert person is not None
    return person


def swipe(
    amount_fen: int = 10_00,
    at_ms: int = T0_MS,
    institution: str = PHARMACY,
    request_id: str | None = None,
    card_no: str = CARD,
    **kw: object,
) -> Authorize:
    return Authorize(request_id or rid(), at_ms, SSN, card_no, institution, amount_fen, **kw)  # type: ignore[arg-type]


@pytest.fixture
def person() -> Person:
    return make_person()


def simulated_records(seed: int, persons: int, days: int) -> list[Any]:
    """Every command, reply and event of a simulated city (clearing.simulator), in order,
    each decision's person after it too: a broad sample of the core's records."""
    records: list[Any] = []
    core_handle = core.handle

    def handle(before: Person | None, command: Command, policy: Policy) -> Any:
        after, decision = core_handle(before, command, policy)
        records.extend((command, decision.reply, *decision.events))
        if after is not None:
            records.append(after)
        return after, decision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "handle", handle)
        simulator.Simulator(POLICY, seed=seed, persons=persons, days=days).run()
    return records
