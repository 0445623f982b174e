"""A deterministic simulation of a city's terminals, cards and service windows, run
against the pure core with a simulated clock: across midnights, weekends and holidays.

`medclear simulate --seed S --persons N --days D` runs it on a seeded city from
2026-09-28 (a Monday), through National Day and its adjusted workday. Everything random
comes from one seeded generator, so a seed replays a run exactly. The simulator also
injects the faults the real system meets: commands delivered twice (redelivery after a
crash), reversals sent before or instead of their swipe, swipes of lost cards, wrong
PINs.

After every step it checks: the balance is ≥ 0; money is conserved per person (credits −
approved + returned = balance); no approval on a card that could not pay (`may_pay`, an
oracle restated from DOMAIN.md rather than reusing the core's code); the daily pharmacy
limit holds; a repeat changes nothing. The first violation stops the run with a
SimulationFailure that names the seed and the step, and prints the command that replays
it.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from clearing import core
from clearing.calendar import day_start_ms
from clearing.codes import CardKind, CardState, InstitutionType, InsuranceCategory
from clearing.errors import ClearingError
from clearing.limits import DAY_MS
from clearing.model import (
    AccountCredited,
    Authorize,
    CardCommand,
    Command,
    CreditAccount,
    ExpirePreLoss,
    IssueCard,
    Person,
    PinOutcome,
    Policy,
    Refund,
    Refunded,
    RegisterPerson,
    ReplaceCard,
    Reverse,
    SetPharmacyLimit,
    SwipeApproved,
    SwipeReversed,
)
from clearing.validate import ssn_check_char

MINUTE_MS = 60_000
SWIPES_PER_PERSON_DAY = 0.6  # a city's average: most people do not see a doctor daily
WINDOW_OPS_PER_PERSON_DAY = 0.02
REDELIVERY_RATE = 0.02  # commands delivered a second time
START_DATE = dt.date(2026, 9, 28)  # a Monday before National Day (Oct 1-7, 调休 Oct 10)
START_DAY = (START_DATE - dt.date(1970, 1, 1)).days


def may_pay(person: Person, card_no: str, at_ms: int) -> bool:
    """The oracle: may this card pay at this instant? Restated from DOMAIN.md on its own,
    not through the core's code, so that a bug there cannot hide itself here."""
    card = person.card(card_no)
    if card is None or person.cancelled:
        return False
    if card.expires_at_ms and at_ms >= card.expires_at_ms:
        return False  # a temporary card after its year
    if card.state == CardState.ACTIVE:
        return True
    lapsed = card.state == CardState.PRE_LOST and 0 < card.pre_loss_deadline_ms <= at_ms
    return lapsed and card.state_before_pre_loss == CardState.ACTIVE


class SimulationFailure(ClearingError, AssertionError):
    def __init__(self, seed: int, step: int, message: str) -> None:
        super().__init__(
            f"seed {seed}, step {step}: {message} (replay: medclear simulate --seed {seed})"
        )
        self.seed = seed
        self.step = step


@dataclass
class Summary:
    seed: int
    persons: int
    days: int
    decisions: int = 0
    events: int = 0
    redeliveries: int = 0
    results: Counter[str] = field(default_factory=Counter)
    commands: Counter[str] = field(default_factory=Counter)
    approved_fen: int = 0
    returned_fen: int = 0
    credited_fen: int = 0
    core_seconds: float = 0.0  # time inside core.handle only
    wall_seconds: float = 0.0

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.core_seconds if self.core_seconds else 0.0


@dataclass
class _Holder:
    """What the simulator knows of one person (the 'outside world' view)."""

    ssn: str
    cards: list[str]
    credited: int = 0
    debited: int = 0
    returned: int = 0
    approved: list[str] = field(default_factory=list)


class Simulator:
    def __init__(
        self,
        policy: Policy,
        seed: int,
        persons: int,
        days: int,
        on_day: Callable[[int, Summary], None] | None = None,
    ) -> None:
        self.policy = policy
        self.seed = seed
        self.rng = random.Random(seed)
        self.days = days
        self.on_day = on_day
        self.summary = Summary(seed, persons, days)
        self.state: dict[str, Person | None] = {}
        self.holders: list[_Holder] = []
        self.step = 0
        self.serial = 0
        self.pharmacies = [
            i for i in policy.institutions.values() if i.type == InstitutionType.PHARMACY
        ]
        self.hospitals = [
            i for i in policy.institutions.values() if i.type != InstitutionType.PHARMACY
        ]
        self.terminals = max(1, len(policy.institutions)) * 3
        self._enrol(persons)

    # ------------------------------------------------------------------ plumbing
    def _id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}:{self.serial}"

    def _fail(self, message: str) -> SimulationFailure:
        return SimulationFailure(self.seed, self.step, message)

    def send(self, holder: _Holder, command: Command) -> None:
        """Decide one command (and sometimes deliver it twice), checking invariants."""
        self.step += 1
        before = self.state.get(holder.ssn)
        started = time.perf_counter()
        after, decision = core.handle(before, command, self.policy)
        self.summary.core_seconds += time.perf_counter() - started
        self.summary.decisions += 1
        self.summary.events += len(decision.events)
        self.summary.results[decision.reply.result.name] += 1
        self.summary.commands[type(command).__name__] += 1
        for event in decision.events:
            match event:
                case SwipeApproved():
                    card = before.card(event.card_no) if before else None
                    if (
                        card is None
                        or before is None
                        or not may_pay(before, event.card_no, event.at_ms)
                    ):
                        raise self._fail(f"approved {event.request_id} on an invalid card")
                    if (
                        event.institution_type == InstitutionType.PHARMACY
                        and after
                        and (
                            core.pharmacy_swipes_on(after, event.card_no, event.day)
                            > card.pharmacy_swipes_per_day
                        )
                    ):
                        raise self._fail(f"pharmacy limit broken by {event.request_id}")
                    holder.debited += event.paid_from_account_fen
                    holder.approved.append(event.request_id)
                    self.summary.approved_fen += event.paid_from_account_fen
                case AccountCredited():
                    holder.credited += event.amount_fen
                    self.summary.credited_fen += event.amount_fen
                case SwipeReversed() | Refunded():
                    holder.returned += event.amount_fen
                    self.summary.returned_fen += event.amount_fen
        if after is not None:
            if after.balance_fen < 0:
                raise self._fail("negative balance")
            if after.balance_fen != holder.credited - holder.debited + holder.returned:
                raise self._fail(f"money not conserved for {holder.ssn}")
        self.state[holder.ssn] = after
        if after is not None and self.rng.random() < REDELIVERY_RATE:
            self.summary.redeliveries += 1
            again, repeat = core.handle(after, command, self.policy)
            if decision.events and (again is not after or repeat.events):
                raise self._fail(f"redelivery of {command.request_id} changed state")

    # ------------------------------------------------------------------ the city
    def _enrol(self, persons: int) -> None:
        at = day_start_ms(START_DAY) + 8 * 60 * MINUTE_MS
        for index in range(persons):
            born = dt.date(1950, 1, 1) + dt.timedelta(days=index // 1000)  # unique per index
            first17 = f"310101{born:%Y%m%d}{index % 1000:03d}"
            ssn = first17 + ssn_check_char(first17)
            roll = self.rng.random()
            category = (
                InsuranceCategory.EMPLOYEE
                if roll < 0.8
                else InsuranceCategory.RESIDENT
                if roll < 0.95
                else InsuranceCategory.SPECIAL
            )
            holder = _Holder(ssn, [f"S{index:08d}"])
            self.holders.append(holder)
            self.send(
                holder,
                RegisterPerson(
                    self._id("W"), at, ssn, f"居民{index}", category, "13800000000", "310101"
                ),
            )
            self.send(
                holder, IssueCard(self._id("W"), at, ssn, holder.cards[0], CardKind.SOCIAL_SECURITY)
            )
            for op in ("activate", "change_pin"):
                self.send(holder, CardCommand(self._id("W"), at, ssn, holder.cards[0], op))
            if category == InsuranceCategory.EMPLOYEE:
                self.send(
                    holder,
                    CreditAccount(
                        self._id("W"), at, ssn, self.rng.randint(50_00, 3_000_00), f"opening-{ssn}"
                    ),
                )

    def _swipe(self, holder: _Holder, at: int) -> None:
        pharmacy = self.rng.random() < 0.6
        institution = self.rng.choice(self.pharmacies if pharmacy else self.hospitals)
        terminal = f"T{self.rng.randrange(self.terminals)}"
        roll = self.rng.random()
        pin = PinOutcome.WRONG if roll < 0.03 else PinOutcome.CORRECT
        amount = self.rng.choice((self.rng.randint(5_00, 80_00), self.rng.randint(50_00, 900_00)))
        card = holder.cards[-1] if self.rng.random() < 0.97 else holder.cards[0]
        request_id = self._id(terminal)
        if self.rng.random() < 0.003:  # the terminal timed out and reversed first
            self.send(holder, Reverse(self._id(terminal), at, holder.ssn, request_id, card))
        self.send(
            holder,
            Authorize(
                request_id,
                at,
                holder.ssn,
                card,
                institution.institution_id,
                amount,
                self.rng.random() < 0.2,
                pin,
            ),
        )

    def _after_sale(self, holder: _Holder, at: int) -> None:
        if not holder.approved:
            return
        original = self.rng.choice(holder.approved[-10:])
        person = self.state.get(holder.ssn)
        record = person.swipe(original) if person else None
        card = record.card_no if record else holder.cards[-1]
        if self.rng.random() < 0.5:
            self.send(holder, Reverse(self._id("R"), at, holder.ssn, original, card))
        else:
            self.send(
                holder,
                Refund(self._id("F"), at, holder.ssn, original, card, self.rng.randint(1, 100_00)),
            )

    def _window(self, holder: _Holder, at: int) -> None:
        card = holder.cards[-1]
        roll = self.rng.random()
        if roll < 0.35:
            self.send(holder, CardCommand(self._id("W"), at, holder.ssn, card, "report_pre_loss"))
        elif roll < 0.55:
            self.send(holder, CardCommand(self._id("W"), at, holder.ssn, card, "release"))
        elif roll < 0.65:
            for op in ("confirm_loss", "apply_replacement"):
                self.send(holder, CardCommand(self._id("W"), at, holder.ssn, card, op))
            new = f"R{self.serial:08d}"
            self.send(holder, ReplaceCard(self._id("W"), at, holder.ssn, card, new))
            person = self.state.get(holder.ssn)
            if person is not None and person.card(new) is not None:
                holder.cards.append(new)
                for op in ("activate", "change_pin"):
                    self.send(holder, CardCommand(self._id("W"), at, holder.ssn, new, op))
        elif roll < 0.8:
            self.send(holder, CardCommand(self._id("W"), at, holder.ssn, card, "unlock"))
            self.send(holder, CardCommand(self._id("W"), at, holder.ssn, card, "change_pin"))
        elif roll < 0.9:
            self.send(
                holder,
                SetPharmacyLimit(self._id("W"), at, holder.ssn, card, self.rng.randint(1, 4)),
            )
        else:
            self.send(holder, CardCommand(self._id("W"), at, holder.ssn, card, "freeze"))
            self.send(holder, CardCommand(self._id("W"), at, holder.ssn, card, "unfreeze"))

    def _expiries(self, at: int) -> None:
        """What the timer job does: an expiry command for every passed deadline, naming
        the card only by its deadline (the timer sees published events, without numbers)."""
        for holder in self.holders:
            person = self.state.get(holder.ssn)
            for card in person.cards if person else ():
                if card.state == CardState.PRE_LOST and card.pre_loss_deadline_ms <= at:
                    self.send(
                        holder,
                        ExpirePreLoss(
                            f"expiry:{card.card_no}:{card.pre_loss_deadline_ms}",
                            at,
                            holder.ssn,
                            "",
                            card.pre_loss_deadline_ms,
                        ),
                    )

    def run(self) -> Summary:
        started = time.perf_counter()
        for offset in range(self.days):
            day = START_DAY + offset
            opening = day_start_ms(day) + 8 * 60 * MINUTE_MS  # 08:00 Beijing
            if offset == 0 or (self.rng.random() < 0.04):  # a monthly allocation batch
                for holder in self.holders:
                    self.send(
                        holder,
                        CreditAccount(
                            self._id("A"), opening, holder.ssn, 100_00, f"alloc-{day}-{holder.ssn}"
                        ),
                    )
            swipes = int(len(self.holders) * SWIPES_PER_PERSON_DAY)
            windows = max(1, int(len(self.holders) * WINDOW_OPS_PER_PERSON_DAY))
            plan = ["swipe"] * swipes + ["after_sale"] * (swipes // 20) + ["window"] * windows
            self.rng.shuffle(plan)
            span = 14 * 60 * MINUTE_MS  # 08:00 to 22:00
            for i, kind in enumerate(plan):
                at = opening + span * i // max(1, len(plan))
                holder = self.rng.choice(self.holders)
                if kind == "swipe":
                    self._swipe(holder, at)
                elif kind == "after_sale":
                    self._after_sale(holder, at)
                else:
                    self._window(holder, at)
                if i % 500 == 0:
                    self._expiries(at)
            self._expiries(day_start_ms(day) + DAY_MS - MINUTE_MS)
            if self.on_day is not None:
                self.on_day(offset + 1, self.summary)
        self.summary.wall_seconds = time.perf_counter() - started
        return self.summary
