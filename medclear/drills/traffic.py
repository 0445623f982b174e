"""A drill's POS traffic: a client thread sends swipes at a fixed rate (open loop),
whatever the stack does, and keeps every reply.

A swipe that gets no definite answer (TIMEOUT, UNAVAILABLE, a transport error) is asked
again after the traffic has stopped — the same request with the same trace number, until
it gets one (what a terminal does before it gives up and reverses). So the client's set
of approvals is exact, and a repeat decided before is answered from the person's memory
(`replayed`). Not during the fault: every resend is one more command on the broker, and
resending at once while a worker is away only builds the backlog it must work off.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from clearing.codes import ResultCode
from clearing.model import Institution
from medclear.drills.bounds import (
    ANSWER_WAIT_S,
    APPROVED,
    IN_FLIGHT_MAX,
    RESEND_LANES,
    RETRY_PAUSE_MAX_S,
    RETRY_PAUSE_S,
    RPC_TIMEOUT_S,
    SWIPE_FEN_MAX,
    SWIPE_FEN_MIN,
    SWIPES_PER_PERSON_CAP,
    UNDECIDED,
    DrillError,
)
from medclear.infra.pki import Role
from medclear.infra.rpc import aio_channel, pb_enum
from medclear.infra.terminals import Keyring
from medclear.sim.city import Resident
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc


@dataclass
class SwipeRecord:
    """One swipe as the terminal saw it. Times are time.monotonic()."""

    request_id: str
    ssn: str
    phone: str
    amount_fen: int
    first_sent: float
    last_sent: float = 0.0
    answered_at: float | None = None
    result: ResultCode | None = None  # None: no definite answer (yet, or given up)
    paid_from_account_fen: int = 0
    balance_after_fen: int = 0
    replayed: bool = False
    attempts: int = 0
    request: pos_pb2.AuthorizeRequest | None = field(default=None, repr=False)

    @property
    def approved(self) -> bool:
        return self.result in APPROVED


class SteadyTraffic:
    """Swipes at a fixed rate from a thread with its own event loop, whatever the stack
    does (open loop); each is resent until it gets a definite answer."""

    def __init__(
        self,
        gateway: str,
        pki_dir: Path | None,
        keyring: Keyring | None,
        persons: Sequence[Resident],
        terminals: Sequence[tuple[str, Institution]],
        rate_per_s: float,
        seed: int = 7,
    ) -> None:
        if not persons or not terminals or rate_per_s <= 0:
            raise ValueError("traffic needs persons, terminals and a positive rate")
        self.gateway = gateway
        self.pki_dir = pki_dir
        self.keyring = keyring
        self.persons = list(persons)
        self.terminals = list(terminals)
        self.rate_per_s = rate_per_s
        self.rng = random.Random(seed)
        self.trace_base = time.time_ns() // 1000
        self.swipes: list[SwipeRecord] = []
        self.not_sent = 0
        self.undecided_answers: Counter[str] = Counter()
        self._stop = threading.Event()
        self._give_up_at: float | None = None
        self._lock = threading.Lock()
        self._lanes: asyncio.Semaphore | None = None
        self._thread = threading.Thread(target=self._run, name="drill-traffic", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, answer_wait_s: float = ANSWER_WAIT_S) -> None:
        """No new swipes; wait until every sent swipe has a definite answer (bounded)."""
        self._give_up_at = time.monotonic() + answer_wait_s
        self._stop.set()
        self._thread.join(answer_wait_s + 30)
        if self._thread.is_alive():
            raise DrillError("the traffic thread did not finish")
        if self.error is not None:
            raise DrillError(f"traffic failed: {type(self.error).__name__}: {self.error}")

    def snapshot(self) -> list[SwipeRecord]:
        with self._lock:
            return list(self.swipes)

    def first_approval_after(self, at: float) -> float | None:
        """When the first swipe sent (last attempt) at or after `at` was approved."""
        times = [
            s.answered_at
            for s in self.snapshot()
            if s.approved and s.answered_at is not None and s.last_sent >= at
        ]
        return min(times) if times else None

    def _request(self, i: int) -> tuple[pos_pb2.AuthorizeRequest, Resident]:
        person = self.persons[i % len(self.persons)]
        terminal_id, institution = self.terminals[i % len(self.terminals)]
        request = pos_pb2.AuthorizeRequest(
            terminal=common_pb2.TerminalContext(
                terminal_id=terminal_id,
                institution_id=institution.institution_id,
                trace_number=self.trace_base + i,
                institution_type=pb_enum(institution.type),
            ),
            card_no=person.card_no,
            amount_fen=self.rng.randint(SWIPE_FEN_MIN, SWIPE_FEN_MAX),
        )
        if self.keyring is not None:
            request.pin_block = self.keyring.pin_block(terminal_id, person.pin, person.card_no)
            self.keyring.sign(terminal_id, request)
        return request, person

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def _main(self) -> None:
        async with aio_channel(self.gateway, Role.TERMINAL, self.pki_dir) as channel:
            stub = pos_pb2_grpc.PosServiceStub(channel)
            self._lanes = asyncio.Semaphore(RESEND_LANES)
            tasks: set[asyncio.Task[None]] = set()
            start = time.monotonic()
            i = 0
            while not self._stop.is_set():
                delay = start + i / self.rate_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.05))
                    continue
                if len(tasks) >= IN_FLIGHT_MAX or i // len(self.persons) >= SWIPES_PER_PERSON_CAP:
                    self.not_sent += 1
                else:
                    request, person = self._request(i)
                    task = asyncio.ensure_future(self._swipe(stub, request, person))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.gather(*tasks)

    async def _swipe(
        self, stub: pos_pb2_grpc.PosServiceStub, request: pos_pb2.AuthorizeRequest, p: Resident
    ) -> None:
        t = request.terminal
        record = SwipeRecord(
            f"{t.terminal_id}:{t.trace_number}",
            p.ssn,
            p.phone,
            request.amount_fen,
            time.monotonic(),
            request=request,
        )
        with self._lock:
            self.swipes.append(record)
        pause_s = RETRY_PAUSE_S
        while True:
            code: ResultCode | None = None
            lanes = self._lanes if record.attempts and self._lanes is not None else None
            async with lanes or contextlib.nullcontext():
                record.last_sent = time.monotonic()
                record.attempts += 1
                try:
                    reply = await stub.Authorize(request, timeout=RPC_TIMEOUT_S)
                    code = ResultCode(reply.result)
                except grpc.aio.AioRpcError as exc:
                    self.undecided_answers[f"RPC_{exc.code().name}"] += 1
            if code is not None and code not in UNDECIDED:
                record.paid_from_account_fen = reply.paid_from_account_fen
                record.balance_after_fen = reply.balance_after_fen
                record.replayed = reply.replayed
                record.answered_at = time.monotonic()
                record.result = code  # last: readers take `result` as "answered"
                return
            if code is not None:
                self.undecided_answers[code.name] += 1
            if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                return
            while not self._stop.is_set():  # ask again once the traffic has stopped
                await asyncio.sleep(0.1)
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, RETRY_PAUSE_MAX_S)
