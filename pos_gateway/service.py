"""The POS gateway: gRPC PosService → commands on the person's partition → reply.

Adapter only: every POS request goes through the ingress checks (clearing/ingress.py:
its form, and with terminal security its MAC and chip cryptogram, asked of the HSM as the
list asks), is routed by card or social security number, stamped with the ingress time,
and decided by the person's worker; a card the index does not know is decided by the core
on no person (`ingress.decide_unrouted`). The core's Reply becomes the proto reply, which
is MACed. The roles table of medclear/infra/pki.py lets only role `terminal` call the POS
service.

Bounds first. Every string and bytes field of every POS and registry request has a named
bound (medclear/infra/bounds.py; a unit test walks every request type of both services),
checked before any HSM call: a 1 MB card number is MALFORMED_REQUEST naming `card_no`,
not whatever the HSM's own size limit made of it. An empty terminal id is 10 at every
POS call.

Terminal security (MEDCLEAR_TERMINAL_SECURITY, on by default): request and reply MACs,
chip cryptograms and PIN blocks through the HSM, in pos_gateway/security.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from clearing import ingress, model
from clearing.codes import ResultCode
from clearing.model import PinOutcome, Policy, Reply
from medclear.infra import bounds, status
from medclear.infra.card_index import CardIndex
from medclear.infra.hsm_client import HsmClient
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.policy import load_policy
from medclear.infra.replies import Requester
from medclear.infra.rpc import (
    Clock,
    message,
    result_pb,
    shanghai_iso,
    state_of,
    system_clock_ms,
)
from medclear.infra.serving import serve_commands
from medclear.infra.settings import get_settings
from medclear.v1 import pos_pb2, pos_pb2_grpc
from monitoring import metrics
from pos_gateway.security import TerminalSecurity

R = TypeVar("R", bound=Message)


def request_id_of(terminal_id: str, trace_number: int) -> str:
    return f"{terminal_id}:{trace_number}"


@dataclass(frozen=True, slots=True)
class Routed:
    """What the gateway tells a terminal: the decision, the person it was routed to ("" if
    none), and for a malformed request the field that made it so."""

    reply: Reply
    ssn: str = ""
    detail: str = ""


class PosGateway(pos_pb2_grpc.PosServiceServicer):
    """The ingress checks (clearing/ingress.py gives their order with the person's), then
    the person's worker, or the core on no person, decides the rest."""

    def __init__(
        self,
        requests: Requester,
        cards: CardIndex,
        deadline_ms: int,
        policy: Policy,
        clock: Clock = system_clock_ms,
        security: TerminalSecurity | None = None,
    ):
        self.requests = requests
        self.cards = cards
        self.deadline_s = deadline_ms / 1000
        self.policy = policy
        self.clock = clock
        self.security = security  # None: terminal security off (no HSM on the path)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        budget = self.deadline_s if remaining is None else min(self.deadline_s, remaining - 0.05)
        return max(0.01, budget)

    async def _refusal(self, request: Any, request_id: str, swipe: bool) -> Routed | None:
        """The ingress list's refusal of a request (clearing/ingress.py), asking the HSM
        what its checks ask; None: the request goes on to its person."""
        arrival = ingress.Arrival(bounds.pos_problem(request), self.security is not None, swipe)
        while True:
            said = ingress.verdict(arrival)
            if said is None:
                return None
            if isinstance(said, ingress.Refused):
                return Routed(Reply(request_id, said.code), detail=said.detail)
            assert self.security is not None  # only a secured arrival asks the HSM
            arrival = arrival.told(said, await self.security.ask(said, request))

    async def _person_of(self, request: Any) -> tuple[str, ResultCode]:
        """The social security number a request is routed by: its own, or the card
        index's for its card (CardIndex.owner_of)."""
        if request.ssn:
            return str(request.ssn), ResultCode.OK
        return await self.cards.owner_of(request.card_no)

    async def _unrouted(self, command: model.Command, request: Any) -> Reply:
        """A card the index does not know: decided by the core on no person, with the PIN
        block's form for a swipe or an enquiry (its first check after the form)."""
        if self.security is not None and isinstance(
            command, model.Authorize | model.BalanceInquiry
        ):
            command = model.checked(command, await self.security.pin_form(request))
        return ingress.decide_unrouted(command, self.policy)

    async def _decided(
        self,
        request: Any,
        request_id: str,
        context: grpc.aio.ServicerContext,
        make: Callable[[str], model.Command],
    ) -> Routed:
        """Every POS request: the ingress checks, the route, then the person's worker (or
        the core on no person) decides."""
        refused = await self._refusal(
            request, request_id, isinstance(request, pos_pb2.AuthorizeRequest)
        )
        if refused is not None:
            return refused
        ssn, found = await self._person_of(request)
        if found == ResultCode.UNAVAILABLE:
            return Routed(Reply(request_id, found))
        if not ssn:
            return Routed(await self._unrouted(make(""), request))
        return Routed(await self.requests.ask(make(ssn), self._timeout(context)), ssn)

    async def Authorize(
        self, request: pos_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.AuthorizeReply:
        started = time.perf_counter()
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        answer = await self._decided(
            request,
            request_id,
            context,
            lambda ssn: model.Authorize(
                request_id=request_id,
                at_ms=self.clock(),
                ssn=ssn,
                card_no=request.card_no,
                institution_id=t.institution_id,
                amount_fen=request.amount_fen,
                allow_partial=request.allow_partial,
                pin=PinOutcome.NOT_VERIFIED,
                terminal_id=t.terminal_id,
                pin_block=request.pin_block.hex(),
            ),
        )
        reply = answer.reply
        out = pos_pb2.AuthorizeReply(
            result=result_pb(reply.result),
            message=message(reply.result, answer.detail),
            request_id=request_id,
            amount_fen=request.amount_fen,
            paid_from_account_fen=reply.paid_from_account_fen,
            paid_in_cash_fen=reply.paid_in_cash_fen,
            balance_after_fen=reply.balance_fen,
            pin_tries_remaining=reply.pin_tries_remaining,
            pharmacy_swipes_today=reply.pharmacy_swipes_today,
            pharmacy_swipes_per_day=reply.pharmacy_swipes_per_day,
            replayed=reply.replayed,
            state=state_of(answer.ssn, reply),
            decided_at=shanghai_iso(reply.at_ms) if reply.at_ms else "",
        )
        return await self._sent("Authorize", t.terminal_id, out, started)

    async def BalanceInquiry(
        self, request: pos_pb2.BalanceInquiryRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.BalanceInquiryReply:
        started = time.perf_counter()
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        answer = await self._decided(
            request,
            request_id,
            context,
            lambda ssn: model.BalanceInquiry(
                request_id,
                self.clock(),
                ssn,
                request.card_no,
                t.institution_id,
                terminal_id=t.terminal_id,
                pin_block=request.pin_block.hex(),
            ),
        )
        reply = answer.reply
        out = pos_pb2.BalanceInquiryReply(
            result=result_pb(reply.result),
            message=message(reply.result, answer.detail),
            request_id=request_id,
            balance_fen=reply.balance_fen if reply.result == ResultCode.OK else 0,
            pin_tries_remaining=reply.pin_tries_remaining,
            state=state_of(answer.ssn, reply),
        )
        return await self._sent("BalanceInquiry", t.terminal_id, out, started)

    async def _sent(self, method: str, terminal_id: str, out: R, started: float) -> R:
        """The reply as it leaves: MACed, counted."""
        if self.security is not None:
            await self.security.sign(terminal_id, out)
        metrics.GATEWAY_SECONDS.labels(method).observe(time.perf_counter() - started)
        metrics.GATEWAY_RESULTS.labels(method, ResultCode(out.result).name).inc()  # type: ignore[attr-defined]
        return out

    async def Reverse(
        self, request: pos_pb2.ReverseRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.ReverseReply:
        """冲正 of this terminal's swipe `original_trace_number`; retried by the terminal
        with the same trace number until it gets an answer."""
        started = time.perf_counter()
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        original = request_id_of(t.terminal_id, request.original_trace_number)
        answer = await self._decided(
            request,
            request_id,
            context,
            lambda ssn: model.Reverse(
                request_id, self.clock(), ssn, original, request.card_no, request.amount_fen
            ),
        )
        reply = answer.reply
        out = pos_pb2.ReverseReply(
            result=result_pb(reply.result),
            message=message(reply.result, answer.detail),
            request_id=request_id,
            reversed_amount_fen=reply.amount_fen if reply.result == ResultCode.OK else 0,
            balance_after_fen=reply.balance_fen,
            replayed=reply.replayed,
            state=state_of(answer.ssn, reply),
        )
        return await self._sent("Reverse", t.terminal_id, out, started)

    async def Refund(
        self, request: pos_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.RefundReply:
        """退费 of a completed swipe (of this terminal unless original_terminal_id says)."""
        started = time.perf_counter()
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        original = request_id_of(
            request.original_terminal_id or t.terminal_id, request.original_trace_number
        )
        answer = await self._decided(
            request,
            request_id,
            context,
            lambda ssn: model.Refund(
                request_id, self.clock(), ssn, original, request.card_no, request.amount_fen
            ),
        )
        reply = answer.reply
        approved = reply.result == ResultCode.OK
        out = pos_pb2.RefundReply(
            result=result_pb(reply.result),
            message=message(reply.result, answer.detail),
            request_id=request_id,
            refunded_amount_fen=reply.amount_fen if approved else 0,
            refundable_left_fen=reply.paid_from_account_fen if approved else reply.amount_fen,
            balance_after_fen=reply.balance_fen,
            replayed=reply.replayed,
            state=state_of(answer.ssn, reply),
        )
        return await self._sent("Refund", t.terminal_id, out, started)


def add_pos_service(servicer: PosGateway, server: grpc.aio.Server) -> None:
    """PosService as the generated add_PosServiceServicer_to_server registers it, except
    that bytes which are no valid request are refused with INVALID_ARGUMENT and a reason
    (grpc's own answer is UNKNOWN "Unexpected DecodeError"; found by the gateway fuzz)."""
    service = pos_pb2.DESCRIPTOR.services_by_name["PosService"]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _decoding(getattr(servicer, method.name), getattr(pos_pb2, method.input_type.name)),
            request_deserializer=None,  # the handler gets the bytes and decodes them itself
            response_serializer=getattr(pos_pb2, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _decoding(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], Any], request_type: Any
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = request_type.FromString(data)
        except DecodeError as exc:
            await status.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"not a valid {request_type.DESCRIPTOR.full_name}: {exc}",
                status.Reason.REQUEST_UNDECODABLE,
                metadata={"message": request_type.DESCRIPTOR.full_name},
            )
        return await behaviour(request, context)

    return handle


def run(
    kafka: KafkaAccess,
    host: str,
    port: int,
    deadline_ms: int,
    instance_id: str,
    hsm_address: str = "",
    pki_dir: Path | None = None,
) -> None:
    """Serve PosService on host:port until terminated; with an HSM address every request's
    MAC and chip cryptogram is verified, and every reply MACed, through it (terminal
    security); with a PKI, mutual TLS and roles."""
    settings = get_settings()
    policy = load_policy(settings)

    def gateway(requests: Requester, cards: CardIndex) -> PosGateway:  # in the server's loop
        if not hsm_address:
            return PosGateway(requests, cards, deadline_ms, policy)
        security = TerminalSecurity(
            HsmClient(hsm_address, pki_dir), settings.card_cryptogram_required
        )
        return PosGateway(requests, cards, deadline_ms, policy, security=security)

    asyncio.run(
        serve_commands(
            "gateway",
            kafka,
            instance_id,
            f"{host}:{port}",
            pos_pb2.DESCRIPTOR.services_by_name["PosService"].full_name,
            lambda requests, cards, server: add_pos_service(gateway(requests, cards), server),
            pki_dir,
        )
    )
