"""Simulated POS and service-window traffic over real gRPC: seeding, swipes, latency stats.

Seeding goes through the card registry as commands, never by writing state: one
EnrolPerson command per resident (register, issue, activate, change the initial PIN,
credit the opening balance, decided as one), sent one per call or in EnrolPersons
batches (the PINs of a batch in one HSM SetPins call). Request ids are derived from the
resident, so seeding twice changes nothing: the repeats are answered with the original
replies.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from clearing.codes import InsuranceCategory, ResultCode
from clearing.model import Institution
from medclear.errors import MedclearError
from medclear.infra.pki import Role
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel, pb_enum
from medclear.infra.terminals import SEED_WINDOW, Keyring
from medclear.sim.city import Resident
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc, registry_pb2, registry_pb2_grpc

WRONG_PIN_RATE = 0.02  # swipes whose PIN is mistyped
T = TypeVar("T")


SEED_RETRIES = 5  # an enrolment answered TIMEOUT / UNAVAILABLE is sent again this often
RETRIED = (ResultCode.TIMEOUT, ResultCode.UNAVAILABLE)
RETRY_PAUSE_S = 0.5  # times the attempt number
DEFAULT_REGION = "310101"  # the demo city (medclear/data/pre_loss_policy.csv)


class SeedError(MedclearError):
    """A seeding step was refused; the message names the resident and the result."""


@dataclass
class LatencyStats:
    latencies_ms: list[float] = field(default_factory=list)
    results: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0

    def add(self, latency_ms: float, result: str) -> None:
        self.latencies_ms.append(latency_ms)
        self.results[result] += 1

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def count(self) -> int:
        return len(self.latencies_ms)

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    @property
    def rate_per_s(self) -> float:
        return self.count / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _window(request_id: str) -> common_pb2.WindowContext:
    return common_pb2.WindowContext(
        window_id=SEED_WINDOW, operator_id="seed", request_id=request_id
    )


def _enrol_request(
    r: Resident, keyring: Keyring | None, region: str
) -> registry_pb2.EnrolPersonRequest:
    """One resident's EnrolPerson: register, issue and activate the social security card,
    set the PIN (a PIN block under the seeding window's PIN key when terminal security is
    on), credit the opening balance (employees)."""
    request = registry_pb2.EnrolPersonRequest(
        # ssn and card: a resident of another city who shares the ssn (cities are drawn
        # independently) is refused PERSON_EXISTS, not answered with that person's reply
        window=_window(f"seed-{r.ssn}-{r.card_no}"),
        ssn=r.ssn,
        name=r.name,
        category=pb_enum(r.category),
        phone=r.phone,
        region=region,
        card_no=r.card_no,
        new_pin_block=keyring.pin_block(SEED_WINDOW, r.pin, r.card_no) if keyring else b"",
    )
    if r.category == InsuranceCategory.EMPLOYEE and r.opening_balance_fen > 0:
        request.opening_balance_fen = r.opening_balance_fen
        request.source_id = f"opening-{r.ssn}"
    return request


async def _settled(
    stub: registry_pb2_grpc.CardRegistryServiceStub, r: Resident, code: ResultCode
) -> None:
    """An enrolment's final answer: OK, or PERSON_EXISTS for a resident enrolled before;
    anything else is a SeedError."""
    if code == ResultCode.PERSON_EXISTS and await _enrolled_before(stub, r):
        return  # seeded earlier: by the five separate commands, or its reply forgotten
    if code in (ResultCode.CARD_EXISTS, ResultCode.PERSON_EXISTS):
        raise SeedError(
            f"enrol of {r.card_no}: {ResultCode(code).name}: this stack already holds another "
            "person with this card or ssn (a city whose --seed agrees with this one mod 100, "
            "or one seeded by an earlier medclear, whose ssns differ): seed with another "
            "--seed, or start afresh with `medclear down --wipe`"
        )
    if code != ResultCode.OK:
        raise SeedError(f"enrol of {r.card_no}: {ResultCode(code).name}")


async def seed_resident(
    stub: registry_pb2_grpc.CardRegistryServiceStub,
    r: Resident,
    keyring: Keyring | None = None,
    region: str = DEFAULT_REGION,
) -> None:
    """Enrol one resident with ONE EnrolPerson command."""
    request = _enrol_request(r, keyring, region)
    for attempt in range(SEED_RETRIES + 1):
        # The same request id again is safe: a decided enrolment is answered from the
        # aggregate's memory (replayed), an undecided one is decided once.
        reply = await stub.EnrolPerson(request, timeout=CALL_TIMEOUT_S)
        if reply.result not in RETRIED:
            break
        await asyncio.sleep(RETRY_PAUSE_S * (attempt + 1))
    await _settled(stub, r, ResultCode(reply.result))


async def seed_batch(
    stub: registry_pb2_grpc.CardRegistryServiceStub,
    chunk: Sequence[tuple[Resident, str]],
    keyring: Keyring | None = None,
) -> None:
    """Enrol (resident, region) pairs with one EnrolPersons call; the persons answered
    TIMEOUT or UNAVAILABLE are sent again (the same request ids: safe, as above)."""
    pending = [(r, _enrol_request(r, keyring, region)) for r, region in chunk]
    for attempt in range(SEED_RETRIES + 1):
        reply = await stub.EnrolPersons(
            registry_pb2.EnrolPersonsRequest(persons=[request for _r, request in pending]),
            timeout=CALL_TIMEOUT_S,
        )
        again = []
        for (r, request), answer in zip(pending, reply.replies, strict=True):
            if answer.result in RETRIED and attempt < SEED_RETRIES:
                again.append((r, request))
            else:
                await _settled(stub, r, ResultCode(answer.result))
        if not again:
            return
        pending = again
        await asyncio.sleep(RETRY_PAUSE_S * (attempt + 1))


async def _enrolled_before(stub: registry_pb2_grpc.CardRegistryServiceStub, r: Resident) -> bool:
    """Whether the person under this resident's ssn holds this resident's card: a city
    seeded before EnrolPerson existed (five commands, other request ids), or one whose
    enrolment reply the aggregate no longer remembers, is seeded again without error."""
    view = await stub.GetPerson(
        registry_pb2.GetPersonRequest(window=_window(f"seed-{r.ssn}-check"), ssn=r.ssn),
        timeout=CALL_TIMEOUT_S,
    )
    return view.result == ResultCode.OK and any(c.card_no == r.card_no for c in view.cards)


async def in_flight(
    items: Sequence[T], concurrency: int, handle: Callable[[T], Awaitable[None]]
) -> None:
    """Handle every item, at most `concurrency` at a time (1: strictly in order)."""
    pending = iter(items)

    async def lane() -> None:
        for item in pending:  # lanes share one iterator: each item is taken once
            await handle(item)

    await asyncio.gather(*(lane() for _ in range(max(1, concurrency))))


async def seed(
    registry: str,
    residents: Sequence[Resident],
    concurrency: int,
    on_done: Callable[[Resident], None],
    keyring: Keyring | None = None,
    pki_dir: Path | None = None,
    region_of: Callable[[int], str] | None = None,
    batch: int = 1,
) -> None:
    """Enrol every resident through the registry, `concurrency` calls in flight, each of
    `batch` residents (1: EnrolPerson each; more: EnrolPersons); `region_of(index)` picks
    a resident's region (default: the demo city's)."""
    regions = [region_of(i) if region_of else DEFAULT_REGION for i in range(len(residents))]
    async with aio_channel(registry, Role.WINDOW, pki_dir) as channel:
        stub = registry_pb2_grpc.CardRegistryServiceStub(channel)
        placed = list(zip(residents, regions, strict=True))
        if batch <= 1:

            async def one(pair: tuple[Resident, str]) -> None:
                await seed_resident(stub, pair[0], keyring, pair[1])
                on_done(pair[0])

            await in_flight(placed, concurrency, one)
            return
        chunks = [placed[i : i + batch] for i in range(0, len(placed), batch)]

        async def chunk_of(chunk: list[tuple[Resident, str]]) -> None:
            await seed_batch(stub, chunk, keyring)
            for r, _region in chunk:
                on_done(r)

        await in_flight(chunks, concurrency, chunk_of)


@dataclass(frozen=True)
class Swipe:
    card_no: str
    institution: Institution
    terminal_id: str
    trace_number: int
    amount_fen: int
    pin: str = ""  # what is typed on the PIN pad (sometimes wrong)


def plan_swipes(
    residents: Sequence[Resident],
    institutions: Sequence[Institution],
    count: int,
    seed: int,
    trace_base: int,
) -> list[Swipe]:
    """A reproducible day of swipes: random residents at random institutions."""
    rng = random.Random(seed)
    plan: list[Swipe] = []
    for i in range(count):
        r = rng.choice(residents)
        inst = rng.choice(institutions)
        amount = rng.choice((rng.randint(5_00, 80_00), rng.randint(20_00, 600_00)))
        pin = r.pin if rng.random() >= WRONG_PIN_RATE else f"{(int(r.pin) + 1) % 10**6:06d}"
        plan.append(Swipe(r.card_no, inst, f"T{inst.institution_id}", trace_base + i, amount, pin))
    return plan


def authorize_request(s: Swipe, keyring: Keyring | None = None) -> pos_pb2.AuthorizeRequest:
    """The terminal's request; with a keyring it carries a PIN block and is MACed."""
    request = pos_pb2.AuthorizeRequest(
        terminal=common_pb2.TerminalContext(
            terminal_id=s.terminal_id,
            institution_id=s.institution.institution_id,
            trace_number=s.trace_number,
            institution_type=pb_enum(s.institution.type),
        ),
        card_no=s.card_no,
        amount_fen=s.amount_fen,
    )
    if keyring is not None:
        request.pin_block = keyring.pin_block(s.terminal_id, s.pin, s.card_no)
        keyring.sign(s.terminal_id, request)
    return request


async def run_swipes(
    gateway: str,
    plan: Sequence[Swipe],
    concurrency: int,
    stats: LatencyStats,
    on_done: Callable[[], None],
    keyring: Keyring | None = None,
    pki_dir: Path | None = None,
) -> None:
    async with aio_channel(gateway, Role.TERMINAL, pki_dir) as channel:
        stub = pos_pb2_grpc.PosServiceStub(channel)

        async def one(s: Swipe) -> None:
            started = time.perf_counter()
            reply = await stub.Authorize(authorize_request(s, keyring), timeout=CALL_TIMEOUT_S)
            stats.add((time.perf_counter() - started) * 1000, ResultCode(reply.result).name)
            on_done()

        await in_flight(plan, concurrency, one)
    stats.ended = time.perf_counter()


OPEN_LOOP_IN_FLIGHT_MAX = 4_096  # beyond it a swipe is counted as not sent (client overload)


async def run_open_loop(
    gateway: str,
    plan: Sequence[Swipe],
    rate_per_s: float,
    stats: LatencyStats,
    on_done: Callable[[], None],
    keyring: Keyring | None = None,
    pki_dir: Path | None = None,
) -> None:
    """Send the plan at a fixed rate whatever the replies do (open loop). Each latency is
    measured from the moment the swipe was due, not when the client got round to it, so
    a stall shows in the figures instead of silently lowering the rate. Requests (PIN
    blocks, MACs) are built before the clock starts."""
    requests = [authorize_request(s, keyring) for s in plan]
    async with aio_channel(gateway, Role.TERMINAL, pki_dir) as channel:
        stub = pos_pb2_grpc.PosServiceStub(channel)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pos_pb2.AuthorizeRequest, due: float) -> None:
            try:
                reply = await stub.Authorize(request, timeout=CALL_TIMEOUT_S)
                result = ResultCode(reply.result).name
            except grpc.aio.AioRpcError as exc:
                result = f"RPC_{exc.code().name}"
            stats.add((time.perf_counter() - due) * 1000, result)
            on_done()

        stats.started = start = time.perf_counter()
        for i, request in enumerate(requests):
            due = start + i / rate_per_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= OPEN_LOOP_IN_FLIGHT_MAX:
                stats.results["NOT_SENT_CLIENT_OVERLOAD"] += 1  # no latency to record
                on_done()
                continue
            task = asyncio.ensure_future(one(request, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    stats.ended = time.perf_counter()


def terminal_ids(plan: Sequence[Swipe]) -> list[str]:
    """Every terminal a plan swipes at, plus the seeding window: what to provision."""
    return sorted({s.terminal_id for s in plan} | {SEED_WINDOW})
