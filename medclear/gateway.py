"""The POS gateway: gRPC PosService → commands on the person's partition → reply.

Adapter only: it checks the request's form and (with terminal security) its MAC and chip
cryptogram, routes it by card or social security number, stamps the ingress time, and
translates the core's Reply into the proto reply, which it MACs. The account's decisions
are the clearing worker's; a card the index does not know is answered here by the same
pure checks (clearing/pos.py, which gives the whole order of the checks) on no person.
The roles table of medclear/infra/pki.py lets only role `terminal` call the POS service.

Bounds first. Every string and bytes field of every POS and registry request has a named
bound (medclear/infra/bounds.py; a unit test walks every request type of both services),
checked before any HSM call: a 1 MB card number is MALFORMED_REQUEST naming `card_no`,
not whatever the HSM's own size limit made of it. An empty terminal id is 10 at every
POS call.

Terminal security (MEDCLEAR_TERMINAL_SECURITY, on by default; off: no HSM on the path
and nothing below is checked):
- Request MAC: every POS request carries a MAC under its terminal's MAC key
  (`tak-<terminal>`) over its deterministic protobuf serialization with `mac` empty
  (`medclear.infra.rpc.mac_input`), so every field the terminal sent is covered, with no
  hand-kept list of fields. It is verified through the HSM before routing: a bad MAC is
  MAC_INVALID (11), a terminal without keys TERMINAL_UNKNOWN (14), and neither reaches an
  aggregate.
- Reply MAC: every POS reply is MACed through the HSM under the same key, over the same
  serialization. The reader agent and `medclear pos` take a reply without a valid MAC as
  no answer, and the agent reverses the swipe. Each reply costs one `GenerateMac`: no
  reply is known before the request's MAC is verified (checking it later would give
  unauthenticated requests the card-index wait and the HSM's PIN-block check), so there
  is no round trip to share.
- PIN blocks: a PIN travels as an ISO 9564 format-4 block under the terminal's PIN key
  (`tpk-<terminal>`). The gateway passes it on; the clearing worker
  (stream_jobs/worker.py) has the HSM verify it against the card's PIN verification value
  (PVV) and hands the core CORRECT, WRONG or INVALID_BLOCK. A repeat of a decided request
  is answered from memory without asking the HSM again; with the HSM down the worker
  waits, deciding nothing without the check. Here only an unrouted card's block is
  checked, for its form. (At a service window, ChangePin has the HSM turn the new PIN
  block into the card's PVV, which the card keeps.)
- Chip cryptogram (`TerminalSecurity.cryptogram`), after the MAC: a request carrying one
  is checked through the HSM's `VerifyCardCryptogram` under `cmk-cards`. A wrong one, or
  a challenge or counter without a cryptogram, is CRYPTOGRAM_INVALID (13) and reaches no
  aggregate; a cloned card (EF05/EF06 copied, another key) is refused this way. A swipe
  without a cryptogram is accepted by default: the simulated fleet, `medclear pos swipe
  --card` and the benchmarks are key-entered (no chip).
  MEDCLEAR_CARD_CRYPTOGRAM_REQUIRED=true makes it mandatory, which a deployment of chip
  readers should set: without it, a cloner who leaves the cryptogram out is not stopped
  by this check. Not done: the server does not keep the card's counter, so a replayed
  cryptogram is stopped only by the challenge being the terminal's; a server-issued
  challenge or a per-card counter high-water mark would close that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import DecodeError, Message

from clearing import model, pos, validate
from clearing.codes import ResultCode
from clearing.model import PinOutcome, Policy, Reply
from medclear.infra import bounds, status
from medclear.infra.bounds import CRYPTOGRAM_BYTES_MAX
from medclear.infra.bus import BusUnavailable, CommandBus
from medclear.infra.hsm_client import HsmClient
from medclear.infra.kafka_access import KafkaAccess
from medclear.infra.policy import load_policy
from medclear.infra.rpc import (
    Clock,
    mac_input,
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

log = structlog.get_logger(process="gateway")
R = TypeVar("R", bound=Message)


def request_id_of(terminal_id: str, trace_number: int) -> str:
    return f"{terminal_id}:{trace_number}"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the gateway tells a terminal: the decision, the person it was routed to ("" if
    none), and for a malformed request the field that made it so."""

    reply: Reply
    ssn: str = ""
    detail: str = ""


class TerminalSecurity:
    """Request MACs, chip cryptograms, PIN-block forms and reply MACs through the HSM.

    A swipe with a cryptogram must carry a valid one. A swipe without one (key-entered or
    simulated traffic: no chip read) passes unless `cryptogram_required`
    (MEDCLEAR_CARD_CRYPTOGRAM_REQUIRED), which a deployment of chip readers should set."""

    def __init__(self, hsm: HsmClient, cryptogram_required: bool) -> None:
        self.hsm = hsm
        self.cryptogram_required = cryptogram_required

    async def admit(self, request: Any) -> ResultCode:
        """The request's MAC under its terminal's MAC key: OK, MAC_INVALID, TERMINAL_UNKNOWN."""
        return await self.hsm.verify_mac(request.terminal.terminal_id, mac_input(request),
                                         request.mac)  # fmt: skip

    async def cryptogram(self, request: pos_pb2.AuthorizeRequest) -> ResultCode:
        if not request.card_cryptogram:
            present = request.card_challenge or request.card_counter
            required = self.cryptogram_required or present
            return ResultCode.CRYPTOGRAM_INVALID if required else ResultCode.OK
        if (
            len(request.card_challenge) < CHALLENGE_BYTES_MIN
            or len(request.card_cryptogram) != CRYPTOGRAM_BYTES_MAX
        ):
            return ResultCode.CRYPTOGRAM_INVALID
        return await self.hsm.verify_cryptogram(
            request.card_no, request.card_challenge, request.amount_fen,
            request.terminal.terminal_id, request.card_counter, request.card_cryptogram,
        )  # fmt: skip

    async def pin_form(self, request: Any) -> int | ResultCode:
        """The PinOutcome of a PIN block checked for its form only (the card has no PIN to
        verify it against here), or UNAVAILABLE."""
        if not request.pin_block:
            return PinOutcome.INVALID_BLOCK
        code = await self.hsm.check_pin_block(request.terminal.terminal_id, request.pin_block,
                                              request.card_no)  # fmt: skip
        if code == ResultCode.UNAVAILABLE:
            return code
        return PinOutcome.NOT_VERIFIED if code == ResultCode.OK else PinOutcome.INVALID_BLOCK

    async def sign(self, terminal_id: str, reply: Any) -> None:
        """Set the reply's MAC under the terminal's MAC key (none for an unknown terminal:
        the terminal then takes the reply as no answer)."""
        if not validate.is_id(terminal_id):
            return
        code, mac = await self.hsm.generate_mac(terminal_id, mac_input(reply))
        if code == ResultCode.OK:
            reply.mac = mac


CHALLENGE_BYTES_MIN = 4  # the terminal's unpredictable number (EMV: 4 bytes)


class PosGateway(pos_pb2_grpc.PosServiceServicer):
    """Checks in result-code order: the form (10), the MAC (11, 14), for a swipe the chip
    cryptogram (13, after the PIN block's form when it fails: 12 wins), then the person's
    worker decides the rest. A card the index does not know is decided here by the same
    pure checks on no person (clearing/pos.py), so an unknown institution (20) still wins
    over an unknown card (30)."""

    def __init__(
        self,
        bus: CommandBus,
        deadline_ms: int,
        policy: Policy,
        clock: Clock = system_clock_ms,
        security: TerminalSecurity | None = None,
    ):
        self.bus = bus
        self.deadline_s = deadline_ms / 1000
        self.policy = policy
        self.clock = clock
        self.security = security  # None: terminal security off (no HSM on the path)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        budget = self.deadline_s if remaining is None else min(self.deadline_s, remaining - 0.05)
        return max(0.01, budget)

    async def _checked(self, request: Any) -> Answer | None:
        """The answer for a malformed or unauthenticated request; None to go on."""
        request_id = request_id_of(request.terminal.terminal_id, request.terminal.trace_number)
        detail = bounds.pos_problem(request)
        if detail is not None:
            return Answer(Reply(request_id, ResultCode.MALFORMED_REQUEST), detail=detail)
        if self.security is not None:
            admitted = await self.security.admit(request)
            if admitted != ResultCode.OK:
                return Answer(Reply(request_id, admitted))
        return None

    async def _person_of(self, request: Any) -> str:
        """The social security number a request is routed by: its own, or the card
        index's for its card ("" for a card the index does not know)."""
        return str(request.ssn or await self.bus.resolve_ssn(request.card_no) or "")

    async def _decide_unrouted(
        self, command: model.Authorize | model.BalanceInquiry, request: Any
    ) -> Reply:
        """A card the index does not know: the pure checks on no person answer it (the PIN
        block's form, the institution, then CARD_UNKNOWN), as the worker would."""
        pin: int | ResultCode = PinOutcome.NOT_VERIFIED
        if self.security is not None:
            pin = await self.security.pin_form(request)
            if isinstance(pin, ResultCode):
                return Reply(command.request_id, pin)
        command = replace(command, pin=pin)
        if isinstance(command, model.Authorize):
            return pos.decide_authorize(None, command, self.policy).reply
        return pos.decide_balance(None, command, self.policy).reply

    async def _ask(self, command: model.Command, context: grpc.aio.ServicerContext) -> Reply:
        try:
            reply = await self.bus.request(command, self._timeout(context))
        except BusUnavailable as exc:
            log.warning("bus unavailable", error=str(exc))
            return Reply(command.request_id, ResultCode.UNAVAILABLE)
        if reply is None:
            return Reply(command.request_id, ResultCode.TIMEOUT)
        return reply

    async def _swipe(
        self,
        request: pos_pb2.AuthorizeRequest | pos_pb2.BalanceInquiryRequest,
        context: grpc.aio.ServicerContext,
        make: Callable[[str], model.Authorize | model.BalanceInquiry],
    ) -> Answer:
        """Authorize and BalanceInquiry: both carry a PIN block and may reach a person."""
        checked = await self._checked(request)
        if checked is not None:
            return checked
        request_id = request_id_of(request.terminal.terminal_id, request.terminal.trace_number)
        if self.security is not None and isinstance(request, pos_pb2.AuthorizeRequest):
            code = await self.security.cryptogram(request)
            if code == ResultCode.CRYPTOGRAM_INVALID:  # a malformed PIN block (12) comes first
                pin = await self.security.pin_form(request)
                if pin == PinOutcome.INVALID_BLOCK:
                    code = ResultCode.PIN_BLOCK_INVALID
            if code != ResultCode.OK:
                return Answer(Reply(request_id, code))
        ssn = await self._person_of(request)
        if not ssn:
            return Answer(await self._decide_unrouted(make(""), request))
        return Answer(await self._ask(make(ssn), context), ssn)

    async def Authorize(
        self, request: pos_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.AuthorizeReply:
        started = time.perf_counter()
        t = request.terminal
        request_id = request_id_of(t.terminal_id, t.trace_number)
        answer = await self._swipe(request, context, lambda ssn: model.Authorize(
            request_id=request_id, at_ms=self.clock(), ssn=ssn, card_no=request.card_no,
            institution_id=t.institution_id, amount_fen=request.amount_fen,
            allow_partial=request.allow_partial, pin=PinOutcome.NOT_VERIFIED,
            terminal_id=t.terminal_id, pin_block=request.pin_block.hex()))  # fmt: skip
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
        answer = await self._swipe(request, context, lambda ssn: model.BalanceInquiry(
            request_id, self.clock(), ssn, request.card_no, t.institution_id,
            terminal_id=t.terminal_id, pin_block=request.pin_block.hex()))  # fmt: skip
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
        answer = await self._command(request, context, lambda ssn: model.Reverse(
            request_id, self.clock(), ssn, original, request.card_no,
            request.amount_fen))  # fmt: skip
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
        answer = await self._command(request, context, lambda ssn: model.Refund(
            request_id, self.clock(), ssn, original, request.card_no,
            request.amount_fen))  # fmt: skip
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

    async def _command(
        self,
        request: pos_pb2.ReverseRequest | pos_pb2.RefundRequest,
        context: grpc.aio.ServicerContext,
        make: Callable[[str], model.Reverse | model.Refund],
    ) -> Answer:
        """Reverse and Refund: route by card or social security number, ask the worker."""
        checked = await self._checked(request)
        if checked is not None:
            return checked
        ssn = await self._person_of(request)
        if not ssn:
            t = request.terminal
            return Answer(Reply(request_id_of(t.terminal_id, t.trace_number),
                                ResultCode.CARD_UNKNOWN))  # fmt: skip
        return Answer(await self._ask(make(ssn), context), ssn)


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

    def gateway(bus: CommandBus) -> PosGateway:  # inside the server's event loop
        if not hsm_address:
            return PosGateway(bus, deadline_ms, policy)
        security = TerminalSecurity(HsmClient(hsm_address, pki_dir),
                                    settings.card_cryptogram_required)  # fmt: skip
        return PosGateway(bus, deadline_ms, policy, security=security)

    asyncio.run(
        serve_commands(
            "gateway",
            kafka,
            instance_id,
            f"{host}:{port}",
            pos_pb2.DESCRIPTOR.services_by_name["PosService"].full_name,
            lambda bus, server: add_pos_service(gateway(bus), server),
            pki_dir,
        )
    )
