"""The POS gateway: gRPC PosService → commands on the person's partition → reply.

Adapter only: it checks what it needs to route a request (card number, social security
number), stamps the ingress time, and translates the core's Reply into the proto reply.
Every decision is the clearing worker's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from clearing import model, validate
from clearing.codes import ResultCode
from clearing.model import PinOutcome, Reply
from medclear.bus import BusUnavailable, CommandBus
from medclear.pki import Role
from medclear.rpc import (
    Clock,
    aio_channel,
    message,
    result_pb,
    serve_commands,
    shanghai_iso,
    state_of,
    system_clock_ms,
)
from medclear.settings import get_settings
from medclear.terminals import CMK_ID, mac_input, tak_id
from medclear.v1 import common_pb2, hsm_pb2, hsm_pb2_grpc, pos_pb2, pos_pb2_grpc
from monitoring import metrics

log = structlog.get_logger(process="gateway")


def request_id_of(terminal_id: str, trace_number: int) -> str:
    return f"{terminal_id}:{trace_number}"


class MacChecker:
    """Verifies a POS request's MAC through the HSM under the terminal's MAC key."""

    def __init__(self, hsm_address: str, pki_dir: Path | None) -> None:
        self._stub = hsm_pb2_grpc.HsmServiceStub(aio_channel(hsm_address, Role.SERVICE, pki_dir))

    async def check(self, terminal_id: str, request: Any) -> ResultCode:
        try:
            reply = await self._stub.VerifyMac(
                hsm_pb2.MacRequest(
                    key=hsm_pb2.KeyRef(key_id=tak_id(terminal_id)),
                    data=mac_input(request),
                    mac=request.mac,
                ),
                timeout=2,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return ResultCode.TERMINAL_UNKNOWN  # no MAC key: not a provisioned terminal
            return ResultCode.UNAVAILABLE
        return ResultCode(reply.result)


CHALLENGE_BYTES_MIN = 4  # the terminal's unpredictable number (EMV: 4 bytes)
CHALLENGE_BYTES_MAX = 255
CRYPTOGRAM_BYTES = 8


class CryptogramChecker:
    """Verifies a swipe's chip cryptogram through the HSM under the card key derived from
    the card master key, so a card whose EF05/EF06 were copied without its key is refused.

    A swipe with a cryptogram must carry a valid one. A swipe without one (key-entered or
    simulated traffic: no chip read) passes unless `required`
    (MEDCLEAR_CARD_CRYPTOGRAM_REQUIRED), which a deployment of chip readers should set."""

    def __init__(self, hsm_address: str, pki_dir: Path | None, required: bool) -> None:
        self._stub = hsm_pb2_grpc.HsmServiceStub(aio_channel(hsm_address, Role.SERVICE, pki_dir))
        self.required = required

    async def check(self, request: pos_pb2.AuthorizeRequest) -> ResultCode:
        if not request.card_cryptogram:
            present = request.card_challenge or request.card_counter
            return ResultCode.CRYPTOGRAM_INVALID if self.required or present else ResultCode.OK
        if (
            not CHALLENGE_BYTES_MIN <= len(request.card_challenge) <= CHALLENGE_BYTES_MAX
            or len(request.card_cryptogram) != CRYPTOGRAM_BYTES
        ):
            return ResultCode.CRYPTOGRAM_INVALID
        try:
            reply = await self._stub.VerifyCardCryptogram(
                hsm_pb2.CryptogramRequest(
                    master_key=hsm_pb2.KeyRef(key_id=CMK_ID),
                    card_no=request.card_no,
                    challenge=request.card_challenge,
                    amount_fen=request.amount_fen,
                    terminal_id=request.terminal.terminal_id,
                    counter=request.card_counter,
                    cryptogram=request.card_cryptogram,
                ),
                timeout=2,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return ResultCode.CRYPTOGRAM_INVALID  # no card master key: no genuine card
            return ResultCode.UNAVAILABLE
        return ResultCode(reply.result)


class PosGateway(pos_pb2_grpc.PosServiceServicer):
    def __init__(
        self,
        bus: CommandBus,
        deadline_ms: int,
        clock: Clock = system_clock_ms,
        macs: MacChecker | None = None,
        cryptograms: CryptogramChecker | None = None,
    ):
        self.bus = bus
        self.deadline_s = deadline_ms / 1000
        self.clock = clock
        self.macs = macs  # None: terminal security off (no HSM on the path)
        self.cryptograms = cryptograms  # None: likewise, chip cryptograms are not checked

    async def _admit(self, terminal_id: str, request: Any) -> ResultCode:
        """The terminal's MAC, before anything reaches a person's aggregate."""
        if self.macs is None:
            return ResultCode.OK
        return await self.macs.check(terminal_id, request)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        budget = self.deadline_s if remaining is None else min(self.deadline_s, remaining - 0.05)
        return max(0.01, budget)

    async def _route(self, card_no: str, ssn: str) -> tuple[ResultCode, str]:
        if not validate.is_card_no(card_no) or (ssn and not validate.is_ssn(ssn)):
            return ResultCode.MALFORMED_REQUEST, ""
        if not ssn:
            found = await self.bus.resolve_ssn(card_no)
            if found is None:
                return ResultCode.CARD_UNKNOWN, ""
            ssn = found
        return ResultCode.OK, ssn

    async def Authorize(
        self, request: pos_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.AuthorizeReply:
        started = time.perf_counter()
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        reply = Reply(request_id, ResultCode.MALFORMED_REQUEST, amount_fen=request.amount_fen)
        ssn = ""
        admitted = ResultCode.MALFORMED_REQUEST
        if validate.is_id(t.terminal_id) and t.trace_number > 0:
            admitted = await self._admit(t.terminal_id, request)
            if (
                admitted == ResultCode.OK
                and self.cryptograms is not None
                and validate.is_card_no(request.card_no)  # else MALFORMED_REQUEST (10) first
            ):
                admitted = await self.cryptograms.check(request)
            reply = Reply(request_id, admitted, amount_fen=request.amount_fen)
        if admitted == ResultCode.OK:
            code, ssn = await self._route(request.card_no, request.ssn)
            reply = Reply(request_id, code, amount_fen=request.amount_fen)
            if code == ResultCode.OK:
                command = model.Authorize(
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
                )
                reply = await self._ask(command, context)
        metrics.GATEWAY_SECONDS.labels("Authorize").observe(time.perf_counter() - started)
        metrics.GATEWAY_RESULTS.labels("Authorize", reply.result.name).inc()
        return pos_pb2.AuthorizeReply(
            result=result_pb(reply.result),
            message=message(reply.result),
            request_id=request_id,
            amount_fen=request.amount_fen,
            paid_from_account_fen=reply.paid_from_account_fen,
            paid_in_cash_fen=reply.paid_in_cash_fen,
            balance_after_fen=reply.balance_fen,
            pin_tries_remaining=reply.pin_tries_remaining,
            pharmacy_swipes_today=reply.pharmacy_swipes_today,
            pharmacy_swipes_per_day=reply.pharmacy_swipes_per_day,
            replayed=reply.replayed,
            state=state_of(ssn, reply),
            decided_at=shanghai_iso(reply.at_ms) if reply.at_ms else "",
        )

    async def BalanceInquiry(
        self, request: pos_pb2.BalanceInquiryRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.BalanceInquiryReply:
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        code, ssn = await self._admit(t.terminal_id, request), ""
        if code == ResultCode.OK:
            code, ssn = await self._route(request.card_no, request.ssn)
        reply = Reply(request_id, code)
        if code == ResultCode.OK:
            command = model.BalanceInquiry(
                request_id, self.clock(), ssn, request.card_no, t.institution_id
            )
            reply = await self._ask(command, context)
        metrics.GATEWAY_RESULTS.labels("BalanceInquiry", reply.result.name).inc()
        return pos_pb2.BalanceInquiryReply(
            result=result_pb(reply.result),
            message=message(reply.result),
            request_id=request_id,
            balance_fen=reply.balance_fen if reply.result == ResultCode.OK else 0,
            pin_tries_remaining=reply.pin_tries_remaining,
            state=state_of(ssn, reply),
        )

    async def _ask(self, command: model.Command, context: grpc.aio.ServicerContext) -> Reply:
        try:
            reply = await self.bus.request(command, self._timeout(context))
        except BusUnavailable as exc:
            log.warning("bus unavailable", error=str(exc))
            return Reply(command.request_id, ResultCode.UNAVAILABLE)
        if reply is None:
            return Reply(command.request_id, ResultCode.TIMEOUT)
        return reply

    async def Reverse(
        self, request: pos_pb2.ReverseRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.ReverseReply:
        """冲正 of this terminal's swipe `original_trace_number`; retried by the terminal
        with the same trace number until it gets an answer."""
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        original = request_id_of(t.terminal_id, request.original_trace_number)
        reply, ssn = await self._command(
            request,
            "Reverse",
            t,
            request.card_no,
            request.ssn,
            request.original_trace_number > 0,
            context,
            lambda ssn: model.Reverse(
                request_id, self.clock(), ssn, original, request.card_no, request.amount_fen
            ),
        )
        return pos_pb2.ReverseReply(
            result=result_pb(reply.result),
            message=message(reply.result),
            request_id=request_id,
            reversed_amount_fen=reply.amount_fen if reply.result == ResultCode.OK else 0,
            balance_after_fen=reply.balance_fen,
            replayed=reply.replayed,
            state=state_of(ssn, reply),
        )

    async def Refund(
        self, request: pos_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.RefundReply:
        """退费 of a completed swipe (of this terminal unless original_terminal_id says)."""
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        original = request_id_of(
            request.original_terminal_id or t.terminal_id, request.original_trace_number
        )
        reply, ssn = await self._command(
            request,
            "Refund",
            t,
            request.card_no,
            request.ssn,
            request.original_trace_number > 0,
            context,
            lambda ssn: model.Refund(
                request_id, self.clock(), ssn, original, request.card_no, request.amount_fen
            ),
        )
        approved = reply.result == ResultCode.OK
        return pos_pb2.RefundReply(
            result=result_pb(reply.result),
            message=message(reply.result),
            request_id=request_id,
            refunded_amount_fen=reply.amount_fen if approved else 0,
            refundable_left_fen=reply.paid_from_account_fen if approved else reply.amount_fen,
            balance_after_fen=reply.balance_fen,
            replayed=reply.replayed,
            state=state_of(ssn, reply),
        )

    async def _command(
        self,
        request: Any,
        method: str,
        t: common_pb2.TerminalContext,
        card_no: str,
        ssn: str,
        well_formed: bool,
        context: grpc.aio.ServicerContext,
        make: Callable[[str], model.Reverse | model.Refund],
    ) -> tuple[Reply, str]:
        """Route by card or social security number, ask the worker; the reply and the
        social security number it was routed by ("" when it was not)."""
        started = time.perf_counter()
        request_id = request_id_of(t.terminal_id, t.trace_number)
        reply, routed = Reply(request_id, ResultCode.MALFORMED_REQUEST), ""
        if validate.is_id(t.terminal_id) and t.trace_number > 0 and well_formed:
            admitted = await self._admit(t.terminal_id, request)
            reply = Reply(request_id, admitted)
            if admitted == ResultCode.OK:
                code, routed = await self._route(card_no, ssn)
                reply = Reply(request_id, code)
                if code == ResultCode.OK:
                    reply = await self._ask(make(routed), context)
        metrics.GATEWAY_SECONDS.labels(method).observe(time.perf_counter() - started)
        metrics.GATEWAY_RESULTS.labels(method, reply.result.name).inc()
        return reply, routed


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
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                          handlers),))  # fmt: skip
    server.add_registered_method_handlers(service.full_name, handlers)


def _decoding(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], Any], request_type: Any
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = request_type.FromString(data)
        except DecodeError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"not a valid {request_type.DESCRIPTOR.full_name}: {exc}",
            )
        return await behaviour(request, context)

    return handle


def run(
    bootstrap: str,
    host: str,
    port: int,
    deadline_ms: int,
    instance_id: str,
    hsm_address: str = "",
    pki_dir: Path | None = None,
) -> None:
    """Serve PosService on host:port until terminated; with an HSM address every request's
    MAC and every chip cryptogram is verified through it (terminal security); with a PKI,
    mutual TLS and roles."""

    def gateway(bus: CommandBus) -> PosGateway:  # inside the server's event loop
        if not hsm_address:
            return PosGateway(bus, deadline_ms)
        required = get_settings().card_cryptogram_required
        macs = MacChecker(hsm_address, pki_dir)
        cryptograms = CryptogramChecker(hsm_address, pki_dir, required)
        return PosGateway(bus, deadline_ms, macs=macs, cryptograms=cryptograms)

    asyncio.run(
        serve_commands(
            "gateway",
            bootstrap,
            instance_id,
            f"{host}:{port}",
            pos_pb2.DESCRIPTOR.services_by_name["PosService"].full_name,
            lambda bus, server: add_pos_service(gateway(bus), server),
            pki_dir,
        )
    )
