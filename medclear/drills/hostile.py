"""Hostile requests at the gateway, one at a time: a FuzzCase (a request with chosen
fields, or raw bytes that are no protobuf), sent over a raw generic gRPC call
(FuzzTarget), and its answer judged (fuzz_problem): a clear one is a result code other
than UNSPECIFIED and never an approval, or INVALID_ARGUMENT / PERMISSION_DENIED with
details. Also the seeded victim whose state (Snapshot) must not change, and the gateway's
health. The generator of cases (hypothesis) is in medclear.drills.fuzz."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clearing import codec
from clearing.codes import ResultCode
from clearing.model import SwipeApproved
from medclear.drills.access import StackAccess
from medclear.drills.bounds import APPROVED, PERSON_SPACE, RPC_TIMEOUT_S, UNDECIDED
from medclear.drills.persons import drill_persons, person_views, seed_and_read
from medclear.infra import topics
from medclear.infra.kafka_admin import read_topic
from medclear.infra.pki import Role
from medclear.infra.rpc import sync_channel
from medclear.infra.terminals import SEED_WINDOW, Keyring
from medclear.sim.city import Resident
from medclear.v1 import pos_pb2

FUZZ_TERMINAL = "TFUZZ1"
FUZZ_METHODS: dict[str, tuple[type[Any], type[Any]]] = {
    "Authorize": (pos_pb2.AuthorizeRequest, pos_pb2.AuthorizeReply),
    "Reverse": (pos_pb2.ReverseRequest, pos_pb2.ReverseReply),
    "Refund": (pos_pb2.RefundRequest, pos_pb2.RefundReply),
    "BalanceInquiry": (pos_pb2.BalanceInquiryRequest, pos_pb2.BalanceInquiryReply),
}
ACCEPTED_STATUS = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
)
DESERIALIZE_FAILURE = "deserializ"  # grpc's own answer to bytes that are no protobuf


@dataclass(frozen=True)
class FuzzCase:
    """One hostile request: a message with chosen fields, or raw bytes."""

    method: str
    fields: tuple[tuple[str, Any], ...] = ()
    terminal: tuple[tuple[str, Any], ...] = ()
    mac: str = "none"  # none | garbage | signed (a provisioned terminal's real MAC)
    raw: bytes | None = None


def fuzz_message(case: FuzzCase, keyring: Keyring | None) -> bytes:
    """The bytes sent for a case."""
    if case.raw is not None:
        return case.raw
    request_type = FUZZ_METHODS[case.method][0]
    request = request_type()
    for name, value in case.terminal:
        setattr(request.terminal, name, value)
    for name, value in case.fields:
        setattr(request, name, value)
    if case.mac == "signed" and keyring is not None:
        request.terminal.terminal_id = FUZZ_TERMINAL
        keyring.sign(FUZZ_TERMINAL, request)
    data: bytes = request.SerializeToString()
    return data


@dataclass(frozen=True)
class FuzzAnswer:
    status: grpc.StatusCode
    details: str
    result: int | None  # the reply's ResultCode number; None without a reply


def fuzz_problem(case: FuzzCase, answer: FuzzAnswer) -> str | None:
    """Why an answer is not acceptable, or None (pure)."""
    if answer.status not in ACCEPTED_STATUS:
        undecodable = case.raw is not None or DESERIALIZE_FAILURE in answer.details.lower()
        if answer.status == grpc.StatusCode.INTERNAL and undecodable:
            return None  # bytes that are no protobuf: grpc refuses them before medclear
        return f"gRPC {answer.status.name}: {answer.details}"
    if answer.status != grpc.StatusCode.OK:
        return None if answer.details else f"gRPC {answer.status.name} without details"
    if answer.result is None or answer.result == 0:
        return "reply without a result code (UNSPECIFIED)"
    try:
        code = ResultCode(answer.result)
    except ValueError:
        return f"reply with an unknown result code {answer.result}"
    if code in APPROVED:
        return f"a hostile request was approved ({code.name})"
    if code in UNDECIDED:
        return f"no clear answer ({code.name})"
    return None


class FuzzTarget:
    """Sends fuzz cases to a gateway over one synchronous channel."""

    def __init__(self, a: StackAccess) -> None:
        self.a = a
        self.channel = sync_channel(a.endpoints.gateway, Role.TERMINAL, a.pki_dir)
        self.results: Counter[str] = Counter()

    def close(self) -> None:
        self.channel.close()

    def send(self, case: FuzzCase) -> FuzzAnswer:
        _request_type, reply_type = FUZZ_METHODS[case.method]
        call = self.channel.unary_unary(f"/medclear.v1.PosService/{case.method}")
        try:
            data = call(fuzz_message(case, self.a.keyring), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            self.results[f"gRPC {exc.code().name}"] += 1
            return FuzzAnswer(exc.code(), exc.details() or "", None)
        reply = reply_type.FromString(data)
        name = ResultCode(reply.result).name if reply.result in _CODES else str(reply.result)
        self.results[name] += 1
        return FuzzAnswer(grpc.StatusCode.OK, "", int(reply.result))

    def check(self, case: FuzzCase) -> None:
        problem = fuzz_problem(case, self.send(case))
        if problem is not None:
            raise AssertionError(f"{problem}\ncase: {case!r}")


_CODES = frozenset(int(c) for c in ResultCode)


@dataclass(frozen=True)
class Snapshot:
    balance_fen: int
    version: int
    swipes_approved: int  # SwipeApproved events on the events topic


def snapshot(a: StackAccess, victim_ssn: str) -> Snapshot:
    """The victim's balance and state version, and the approvals on the events topic."""
    view = asyncio.run(person_views(a, [victim_ssn]))[victim_ssn]
    approvals = 0
    for _key, raw in asyncio.run(read_topic(a.endpoints.kafka(), topics.EVENTS.name)):
        with contextlib.suppress(codec.CodecError):
            if raw is not None and isinstance(codec.decode(raw), SwipeApproved):
                approvals += 1
    return Snapshot(view.balance_fen, view.state.version, approvals)


def fuzz_victim(a: StackAccess) -> Resident:
    """A seeded person the fuzz run must leave untouched (terminal keys provisioned)."""
    if a.keyring is not None:
        asyncio.run(a.keyring.provision(a.endpoints.hsm, [SEED_WINDOW, FUZZ_TERMINAL], a.pki_dir))
    base = random.SystemRandom().randrange(PERSON_SPACE // 1000 - 1) * 1000
    victim = drill_persons(1, base)[0]
    asyncio.run(seed_and_read(a, [victim]))
    return victim


def gateway_healthy(a: StackAccess) -> bool:
    """Whether the gateway answers its health check with SERVING."""
    with sync_channel(a.endpoints.gateway, Role.TERMINAL, a.pki_dir) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="medclear.v1.PosService"), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
