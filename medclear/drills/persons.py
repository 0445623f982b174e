"""Who swipes in a drill, and where. Each drill seeds its own persons (fresh social
security numbers, cards and phones, so an earlier drill's swipes and SMS cannot blur this
one's figures) through the card registry, reads their balances back (GetPerson) and swipes
at its own hospital terminals."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import grpc

from clearing.codes import InstitutionType, InsuranceCategory, ResultCode
from clearing.model import Institution
from clearing.validate import ssn_check_char
from medclear.drills.access import StackAccess
from medclear.drills.bounds import (
    DRILL_TERMINALS,
    LOOKUP_PAUSE_S,
    OPENING_BALANCE_FEN,
    PERSON_SPACE,
    PERSONS_MIN,
    RPC_TIMEOUT_S,
    SEED_ATTEMPTS,
    SWIPES_PER_PERSON_MAX,
    UNDECIDED,
    DrillError,
)
from medclear.infra.pki import Role
from medclear.infra.policy import load_institutions
from medclear.infra.rpc import aio_channel
from medclear.infra.settings import Settings
from medclear.sim import traffic as sim_traffic
from medclear.sim.city import REGION_CODE, Resident
from medclear.v1 import registry_pb2, registry_pb2_grpc


def drill_ssn(n: int) -> str:
    """The n-th drill social security number (0 ≤ n < PERSON_SPACE), all distinct:
    born 1950–1999 on day 1–28, sequence 000–999, valid check character."""
    if not 0 <= n < PERSON_SPACE:
        raise ValueError(f"person number {n} outside 0..{PERSON_SPACE - 1}")
    seq, rest = n % 1000, n // 1000
    day, rest = rest % 28 + 1, rest // 28
    month, rest = rest % 12 + 1, rest // 12
    first17 = f"{REGION_CODE}{1950 + rest:04d}{month:02d}{day:02d}{seq:03d}"
    return first17 + ssn_check_char(first17)


def drill_persons(count: int, base: int) -> list[Resident]:
    """`count` employees (personal account) numbered from `base`: card D + 8 digits,
    phone 19 + 9 digits, a PIN of their own, OPENING_BALANCE_FEN."""
    if count < 1 or base < 0 or base + count > PERSON_SPACE:
        raise ValueError(f"{count} persons from {base} do not fit {PERSON_SPACE}")
    out = []
    for n in range(base, base + count):
        pin = f"{(n * 7919) % 10**6:06d}"
        out.append(
            Resident(
                drill_ssn(n),
                "演练",
                InsuranceCategory.EMPLOYEE,
                f"19{n:09d}",
                f"D{n:08d}",
                OPENING_BALANCE_FEN,
                pin,
            )
        )
    return out


def persons_needed(rate_per_s: float, traffic_s: float, minimum: int = PERSONS_MIN) -> int:
    """Enough persons that none gets more than SWIPES_PER_PERSON_MAX swipes."""
    return max(minimum, math.ceil(rate_per_s * traffic_s / SWIPES_PER_PERSON_MAX))


def drill_terminals(settings: Settings) -> list[tuple[str, Institution]]:
    """Drill terminals at hospitals (no daily pharmacy limit to decline swipes)."""
    hospitals = [
        i
        for i in load_institutions(settings.institutions_file).values()
        if i.type == InstitutionType.HOSPITAL and i.designated
    ]
    if not hospitals:
        raise DrillError("no designated hospital in the institutions file")
    return [(f"TDRILL{n}", hospitals[n % len(hospitals)]) for n in range(DRILL_TERMINALS)]


async def seed_and_read(
    a: StackAccess, persons: Sequence[Resident], concurrency: int = 8
) -> dict[str, int]:
    """Seed the persons through the registry (again while a step times out: seeding
    requests are idempotent); their balances before any swipe."""
    for attempt in range(SEED_ATTEMPTS):
        try:
            await sim_traffic.seed(
                a.endpoints.registry, persons, concurrency, lambda _r: None, a.keyring, a.pki_dir
            )
            break
        except (sim_traffic.SeedError, grpc.aio.AioRpcError) as exc:
            undecided = any(code.name in str(exc) for code in UNDECIDED)
            if isinstance(exc, sim_traffic.SeedError) and not undecided:
                raise DrillError(f"seeding: {exc}") from exc
            if attempt == SEED_ATTEMPTS - 1:
                raise DrillError(f"seeding did not finish: {exc}") from exc
    views = await person_views(a, [p.ssn for p in persons])
    for attempt in range(1, SEED_ATTEMPTS):  # a lookup not decided in time is asked again
        again = [ssn for ssn, view in views.items() if ResultCode(view.result) in UNDECIDED]
        if not again:
            break
        await asyncio.sleep(attempt * LOOKUP_PAUSE_S)
        views.update(await person_views(a, again))
    before = {}
    for ssn, view in views.items():
        if ResultCode(view.result) != ResultCode.OK:
            raise DrillError(f"person {ssn[:6]}… after seeding: {ResultCode(view.result).name}")
        if any(t.kind == "consumption" for t in view.transactions):
            raise DrillError(f"person {ssn[:6]}… already swiped: a drill person reused")
        before[ssn] = view.balance_fen
    return before


async def person_views(a: StackAccess, ssns: Sequence[str]) -> dict[str, Any]:
    """Each person's GetPerson reply (balance, state, latest records), by ssn."""
    async with aio_channel(a.endpoints.registry, Role.WINDOW, a.pki_dir) as channel:
        stub = registry_pb2_grpc.CardRegistryServiceStub(channel)
        lanes = asyncio.Semaphore(32)

        async def one(ssn: str) -> tuple[str, Any]:
            async with lanes:
                view = await stub.GetPerson(
                    registry_pb2.GetPersonRequest(ssn=ssn), timeout=RPC_TIMEOUT_S
                )
                return ssn, view

        return dict(await asyncio.gather(*(one(s) for s in ssns)))
