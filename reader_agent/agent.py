"""The POS reader agent: card → PIN → Authorize → receipt, with reversals that survive.

It runs at one counter: PC/SC through pyscard (reader.py), a PIN pad (pinpad.py: the
console via getpass, never echoed; scripted for tests), and the terminal's keys from the
simulated secure element (`medclear.infra.terminals.Keyring`). Reader events (card in or
out, reader added or unplugged) come from pyscard's CardMonitor and ReaderMonitor
(events.py).

A swipe: SELECT the SSSE application by its AID, read EF05 and EF06 record by record, take
the PIN, then INTERNAL AUTHENTICATE (`00 88`) over a fresh 8-byte terminal challenge, the
amount and the terminal id; the card answers its counter and an 8-byte cryptogram
(`hsm_sim.crypto.card_cryptogram`). The request carries the card number and the social
security number from the chip (no card-index lookup at the gateway), the PIN block under
the terminal PIN key, the cryptogram fields (`card_challenge`, `card_counter`,
`card_cryptogram`) and the MAC, which covers them because it covers the whole
deterministic serialization. Every status word other than 9000 is a `CardError` naming
the step and the status; a card taken out mid-read is `CardRemoved`, and nothing is sent.
Receipts (receipt.py) mask the card and the name.

The swipe is recorded in the journal before it is sent with a deadline. A decision closes
the journal entry. No decision (deadline passed, connection lost, the gateway's own
TIMEOUT or UNAVAILABLE, or a reply without a valid MAC, which is no answer) leaves the
outcome unknown: the agent sends a Reverse for that trace until one is answered, before
the next swipe and with `medclear agent reversals`; an agent that crashes meanwhile does
it when it starts again (the journal entry is still open).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import structlog
from rich.console import Console

from clearing.codes import InstitutionType, ResultCode, message_of
from clearing.validate import mask_card
from medclear.infra.rpc import result_pb
from medclear.infra.terminals import Keyring
from medclear.v1 import common_pb2, pos_pb2
from reader_agent import apdu
from reader_agent.journal import Journal, OpenSwipe
from reader_agent.pinpad import PinPad
from reader_agent.reader import CardData, Transport, authenticate, read_card
from reader_agent.receipt import Receipt, print_receipt

log = structlog.get_logger(process="reader-agent")
R = TypeVar("R", pos_pb2.BalanceInquiryReply, pos_pb2.RefundReply)

DEADLINE_S = 5.0  # a swipe's whole round trip to the gateway
REVERSAL_TRIES = 3  # per settlement attempt; the journal keeps it open after that
REVERSAL_BACKOFF_S = (0.2, 0.5, 1.0)
# A swipe answered so may still be decided (a worker that answered UNAVAILABLE because the
# HSM was silent can crash and decide it again later): reversed, as after no answer.
NO_DECISION = (ResultCode.TIMEOUT, ResultCode.UNAVAILABLE)
# No answer the journal may close on: a reversal is sent again until one is answered.
UNSETTLED = (
    ResultCode.TIMEOUT,
    ResultCode.UNAVAILABLE,
    ResultCode.SYSTEM_ERROR,
    ResultCode.MAC_INVALID,  # of the reply: not the gateway's answer
)


class CardSource(Protocol):
    """A reader with a card in it: PcscReader, or an in-process card in tests."""

    def connect(self) -> Transport: ...


@dataclass(frozen=True)
class Terminal:
    terminal_id: str
    institution_id: str
    institution_type: InstitutionType = InstitutionType.PHARMACY


@dataclass(frozen=True)
class ReversalOutcome:
    trace: int  # of the swipe reversed
    acknowledged: bool
    result: ResultCode
    detail: str = ""


@dataclass(frozen=True)
class SwipeResult:
    card: CardData
    trace: int
    result: ResultCode
    reply: pos_pb2.AuthorizeReply | None  # None: no decision reached the agent
    receipt: Receipt
    card_seconds: float  # reader connect, EF05/EF06, cryptogram (PIN entry excluded)
    total_seconds: float  # the swipe as the agent sees it, card read included
    reversal: ReversalOutcome | None = None


@dataclass(frozen=True)
class CardRead:
    card: CardData
    pin: str
    cryptogram_fields: dict[str, Any]
    seconds: float


class Agent:
    def __init__(
        self,
        terminal: Terminal,
        reader: CardSource,
        pinpad: PinPad,
        journal: Journal,
        stub: Any,  # PosServiceStub (sync) or a stand-in
        keyring: Keyring | None,
        deadline_s: float = DEADLINE_S,
        console: Console | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.terminal = terminal
        self.reader = reader
        self.pinpad = pinpad
        self.journal = journal
        self.stub = stub
        self.keyring = keyring
        self.deadline_s = deadline_s
        self.console = console
        self.sleep = sleep

    # ------------------------------------------------------------------ requests

    def _context(self, trace: int) -> common_pb2.TerminalContext:
        t = self.terminal
        return common_pb2.TerminalContext(
            terminal_id=t.terminal_id,
            institution_id=t.institution_id,
            trace_number=trace,
            institution_type=int(t.institution_type),  # type: ignore[arg-type]
        )

    def _secure(self, request: Any, card_no: str, pin: str | None) -> Any:
        if self.keyring is None:
            return request
        if pin is not None:
            request.pin_block = self.keyring.pin_block(self.terminal.terminal_id, pin, card_no)
        return self.keyring.sign(self.terminal.terminal_id, request)

    def _genuine(self, reply: Any) -> bool:
        """With terminal security: the reply carries the gateway's MAC under this
        terminal's MAC key. A reply that does not is no answer (a swipe is reversed)."""
        if self.keyring is None:
            return True
        if self.keyring.reply_is_genuine(self.terminal.terminal_id, reply):
            return True
        log.warning("reply MAC invalid: not taken", request=reply.request_id)
        return False

    def _refused_reply(self, reply_type: type[R]) -> R:
        """What the agent shows instead of a reply it cannot trust."""
        code = ResultCode.MAC_INVALID
        return reply_type(result=result_pb(code), message=message_of(code))

    def _read(self, amount_fen: int | None, pin_prompt: str) -> CardRead:
        """The card's data, the PIN, and (for a payment) the card's cryptogram."""
        started = time.perf_counter()
        transport = self.reader.connect()
        try:
            card = read_card(transport)
            seconds = time.perf_counter() - started
            pin = self.pinpad.read_pin(pin_prompt)
            fields: dict[str, Any] = {}
            if amount_fen is not None:
                started = time.perf_counter()
                challenge = secrets.token_bytes(apdu.CHALLENGE_BYTES)
                c = authenticate(transport, challenge, amount_fen, self.terminal.terminal_id)
                fields = {
                    "card_challenge": c.challenge,
                    "card_counter": c.counter,
                    "card_cryptogram": c.cryptogram,
                }
                seconds += time.perf_counter() - started
        finally:
            transport.close()
        return CardRead(card, pin, fields, seconds)

    # ------------------------------------------------------------------ swipe

    def swipe(self, amount_fen: int, allow_partial: bool = False) -> SwipeResult:
        """One payment from the personal account with the card in the reader."""
        self.settle_reversals()
        started = time.perf_counter()
        read = self._read(amount_fen, f"PIN ({amount_fen // 100}.{amount_fen % 100:02d} 元)")
        card = read.card
        trace = self.journal.next_trace()
        request = pos_pb2.AuthorizeRequest(
            terminal=self._context(trace),
            card_no=card.card_no,
            ssn=card.ssn,  # from EF06: no card-index lookup at the gateway
            amount_fen=amount_fen,
            allow_partial=allow_partial,
            **read.cryptogram_fields,
        )
        request = self._secure(request, card.card_no, read.pin)
        sent = self.journal.sent(trace, card.card_no, card.ssn, amount_fen)
        reply: pos_pb2.AuthorizeReply | None = None
        reversal = None
        try:
            reply = self.stub.Authorize(request, timeout=self.deadline_s)
        except grpc.RpcError as exc:
            code = _code_of(exc)
            log.warning(
                "no decision: reversing", trace=trace, card=mask_card(card.card_no), error=code.name
            )
            reversal = self._reverse(sent)
            result = code
        else:
            assert reply is not None
            result = ResultCode(reply.result)
            if not self._genuine(reply):  # not the gateway's answer: as good as none
                reply, result = None, ResultCode.MAC_INVALID
                reversal = self._reverse(sent)
            elif result in NO_DECISION:
                reversal = self._reverse(sent)
            else:
                self.journal.done(trace)
        total = time.perf_counter() - started
        receipt = Receipt(
            institution_id=self.terminal.institution_id,
            terminal_id=self.terminal.terminal_id,
            trace=trace,
            card_no=card.card_no,
            holder=card.name,
            amount_fen=amount_fen,
            paid_from_account_fen=reply.paid_from_account_fen if reply else 0,
            paid_in_cash_fen=reply.paid_in_cash_fen if reply else 0,
            balance_after_fen=(
                reply.balance_after_fen
                if reply and (result.approved or result == ResultCode.INSUFFICIENT_BALANCE)
                else None
            ),
            result=result,
            decided_at=reply.decided_at if reply else "",
        )
        if self.console is not None:
            print_receipt(receipt, self.console)
        return SwipeResult(card, trace, result, reply, receipt, read.seconds, total, reversal)

    # ------------------------------------------------------------------ reversal

    def _reverse(self, swipe: OpenSwipe) -> ReversalOutcome:
        """冲正 of a swipe whose outcome is unknown, tried a few times now; if none is
        answered, the journal keeps it open for `settle_reversals`."""
        request = pos_pb2.ReverseRequest(
            terminal=self._context(swipe.reversal_trace),
            original_trace_number=swipe.trace,
            card_no=swipe.card_no,
            ssn=swipe.ssn,
            amount_fen=swipe.amount_fen,
        )
        request = self._secure(request, swipe.card_no, None)
        outcome = ReversalOutcome(swipe.trace, False, ResultCode.UNAVAILABLE)
        for attempt in range(REVERSAL_TRIES):
            try:
                reply = self.stub.Reverse(request, timeout=self.deadline_s)
            except grpc.RpcError as exc:
                outcome = ReversalOutcome(swipe.trace, False, _code_of(exc), str(exc.code()))
            else:
                result = (
                    ResultCode(reply.result) if self._genuine(reply) else ResultCode.MAC_INVALID
                )
                if result not in UNSETTLED:
                    self.journal.reversed(swipe.trace, result.name)
                    log.info("reversal acknowledged", trace=swipe.trace, result=result.name)
                    return ReversalOutcome(swipe.trace, True, result, message_of(result))
                outcome = ReversalOutcome(swipe.trace, False, result)
            self.sleep(REVERSAL_BACKOFF_S[min(attempt, len(REVERSAL_BACKOFF_S) - 1)])
        log.warning("reversal still open", trace=swipe.trace, result=outcome.result.name)
        return outcome

    def settle_reversals(self) -> list[ReversalOutcome]:
        """Send every open reversal in the journal (from before a crash, or not yet
        answered); each stays open until acknowledged."""
        return [self._reverse(s) for s in list(self.journal.open.values())]

    # ------------------------------------------------------------------ balance, refund

    def balance(self) -> tuple[CardData, pos_pb2.BalanceInquiryReply]:
        read = self._read(None, "PIN (余额查询 balance)")
        request = pos_pb2.BalanceInquiryRequest(
            terminal=self._context(self.journal.next_trace()),
            card_no=read.card.card_no,
            ssn=read.card.ssn,
        )
        reply = self.stub.BalanceInquiry(
            self._secure(request, read.card.card_no, read.pin), timeout=self.deadline_s
        )
        if not self._genuine(reply):
            reply = self._refused_reply(pos_pb2.BalanceInquiryReply)
        return read.card, reply

    def refund(
        self, original_trace: int, amount_fen: int, original_terminal: str = ""
    ) -> tuple[CardData, pos_pb2.RefundReply]:
        """退费 of a previous receipt, to the card presented (no PIN: money goes back)."""
        transport = self.reader.connect()
        try:
            card = read_card(transport)
        finally:
            transport.close()
        request = pos_pb2.RefundRequest(
            terminal=self._context(self.journal.next_trace()),
            original_trace_number=original_trace,
            original_terminal_id=original_terminal,
            card_no=card.card_no,
            ssn=card.ssn,
            amount_fen=amount_fen,
        )
        reply = self.stub.Refund(self._secure(request, card.card_no, None), timeout=self.deadline_s)
        if not self._genuine(reply):
            reply = self._refused_reply(pos_pb2.RefundReply)
        return card, reply


def _code_of(exc: grpc.RpcError) -> ResultCode:
    code = exc.code() if hasattr(exc, "code") else None
    return (
        ResultCode.TIMEOUT if code == grpc.StatusCode.DEADLINE_EXCEEDED else ResultCode.UNAVAILABLE
    )
