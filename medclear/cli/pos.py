"""`medclear pos ...`: act as a POS terminal at a designated institution.

With terminal security on (the default stack), every request carries a MAC under the
terminal's MAC key and, for a swipe or a balance enquiry, the PIN as an ISO 9564 PIN block
under its PIN key; the terminal's keys are made through the HSM the first time it is used.
Every reply must carry the gateway's MAC under the same key: a reply without a valid one
is refused (for a swipe, send a reversal: `medclear pos reverse`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from clearing.codes import ResultCode
from clearing.money import format_yuan, parse_yuan
from medclear.cli.agent import agent_swipe
from medclear.cli.support import fail, read_pin
from medclear.infra import status
from medclear.infra.exits import Exit
from medclear.infra.pki import Role
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel
from medclear.infra.settings import get_settings
from medclear.infra.stack_state import client_pki_dir, endpoint
from medclear.infra.terminals import keyring_for
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc

pos_app = typer.Typer(
    help="Act as a POS terminal at a designated institution (swipe, balance, reverse, "
    "refund). Exit status: 0 approved, 3 declined, 1 an error.",
    no_args_is_help=True,
)
console = Console()

TerminalOpt = Annotated[str, typer.Option(help="terminal id")]
InstitutionOpt = Annotated[str, typer.Option(help="designated institution id")]
GatewayOpt = Annotated[str, typer.Option(help="host:port; default: the local stack")]
PinOpt = Annotated[
    str,
    typer.Option(
        help="the cardholder's PIN; asked for (hidden) when terminal security is on and it "
        "is not given, an error in a script"
    ),
]


def _terminal(terminal: str, institution: str, trace: int) -> Any:
    """The TerminalContext of a POS request; trace 0 takes one from the clock."""
    return common_pb2.TerminalContext(
        terminal_id=terminal,
        institution_id=institution,
        trace_number=trace or time.time_ns() // 1_000_000,
    )


def exchange(method: str, request: Any, pin: str | None = None, gateway: str = "") -> Any:
    """Send one POS request and return the gateway's reply. With terminal security: the
    PIN (when `pin` is not None; "" asks for it) as a PIN block, the request MAC, and the
    reply's MAC checked; a transport failure or a reply that is not genuine is an error."""
    settings = get_settings()
    address = gateway or endpoint(settings, "gateway")
    terminal = request.terminal.terminal_id
    keyring = keyring_for(settings, [terminal])
    if keyring is not None:
        if pin is not None:
            typed = read_pin(pin, "PIN")
            try:
                request.pin_block = keyring.pin_block(terminal, typed, request.card_no)
            except ValueError as exc:  # a PIN of the wrong length or not digits
                raise fail(f"PIN: {exc}") from exc
        keyring.sign(terminal, request)

    async def call() -> Any:
        async with aio_channel(address, Role.TERMINAL, client_pki_dir(settings)) as channel:
            return await getattr(pos_pb2_grpc.PosServiceStub(channel), method)(
                request, timeout=CALL_TIMEOUT_S
            )

    try:
        reply = asyncio.run(call())
    except grpc.RpcError as exc:
        raise fail(f"gateway {address}: {status.describe(exc)}") from exc
    if keyring is not None and not keyring.reply_is_genuine(terminal, reply):
        raise fail(
            f"the reply to {reply.request_id or method} carries no valid MAC: it is not "
            "the gateway's answer; for a swipe, reverse it"
        )
    return reply


def _result(what: str, reply: Any, detail: str) -> None:
    code = ResultCode(reply.result)
    style = "green" if code == ResultCode.OK else "red"
    replayed = " (replayed)" if reply.replayed else ""
    console.print(
        f"[{style}]{what}: {code.name} ({int(code)})[/] {reply.message}  {detail}"
        f"  request {reply.request_id}{replayed}"
    )
    if code != ResultCode.OK:
        raise typer.Exit(code=Exit.DECLINED)


def _amount(yuan: str) -> int:
    try:
        return parse_yuan(yuan)
    except ValueError as exc:
        raise fail(str(exc)) from exc


@pos_app.command("reverse")
def pos_reverse(
    card: Annotated[str, typer.Option(help="card number")],
    original_trace: Annotated[int, typer.Option(help="trace number of the swipe to undo")],
    institution: InstitutionOpt,
    terminal: TerminalOpt,
    trace: Annotated[int, typer.Option(help="this reversal's trace; 0: from the clock")] = 0,
    gateway: GatewayOpt = "",
) -> None:
    """Reverse (冲正) a swipe of this terminal that could not be completed. Send it again
    with the same --trace until answered: it is applied once."""
    request = pos_pb2.ReverseRequest(
        terminal=_terminal(terminal, institution, trace),
        original_trace_number=original_trace,
        card_no=card,
    )
    reply = exchange("Reverse", request, gateway=gateway)
    _result(
        "reverse",
        reply,
        f"returned {format_yuan(reply.reversed_amount_fen)}, "
        f"balance {format_yuan(reply.balance_after_fen)}",
    )


@pos_app.command("refund")
def pos_refund(
    card: Annotated[str, typer.Option(help="card number")],
    original_trace: Annotated[int, typer.Option(help="trace number of the paid swipe")],
    amount: Annotated[str, typer.Option(help="yuan to return to the account")],
    institution: InstitutionOpt,
    terminal: TerminalOpt,
    original_terminal: Annotated[str, typer.Option(help="if another terminal took it")] = "",
    trace: Annotated[int, typer.Option(help="this refund's trace; 0: from the clock")] = 0,
    gateway: GatewayOpt = "",
) -> None:
    """Refund (退费) part or all of a completed swipe to the personal account."""
    request = pos_pb2.RefundRequest(
        terminal=_terminal(terminal, institution, trace),
        original_trace_number=original_trace,
        original_terminal_id=original_terminal,
        card_no=card,
        amount_fen=_amount(amount),
    )
    reply = exchange("Refund", request, gateway=gateway)
    _result(
        "refund",
        reply,
        f"refunded {format_yuan(reply.refunded_amount_fen)}, "
        f"refundable left {format_yuan(reply.refundable_left_fen)}, "
        f"balance {format_yuan(reply.balance_after_fen)}",
    )


@pos_app.command("balance")
def pos_balance(
    card: Annotated[str, typer.Option(help="card number")],
    institution: InstitutionOpt,
    terminal: TerminalOpt,
    pin: PinOpt = "",
    gateway: GatewayOpt = "",
) -> None:
    """Balance enquiry (余额查询) at a hospital or pharmacy terminal: needs the PIN (a
    wrong one counts towards the lock, as at a swipe); counts no swipe."""
    request = pos_pb2.BalanceInquiryRequest(
        terminal=_terminal(terminal, institution, 0), card_no=card
    )
    reply = exchange("BalanceInquiry", request, pin=pin, gateway=gateway)
    code = ResultCode(reply.result)
    if code != ResultCode.OK:
        wrong = code == ResultCode.PIN_WRONG
        tries = f", {reply.pin_tries_remaining} PIN tries left" if wrong else ""
        console.print(f"[red]balance: {code.name} ({int(code)})[/] {reply.message}{tries}")
        raise typer.Exit(code=Exit.DECLINED)
    console.print(f"balance of {card}: [bold]{format_yuan(reply.balance_fen)}[/]")


@pos_app.command("swipe")
def pos_swipe(
    amount: Annotated[str, typer.Option(help="amount in yuan, e.g. 12.50")],
    institution: Annotated[str, typer.Option(help="designated institution id")],
    terminal: Annotated[str, typer.Option(help="terminal id")],
    card: Annotated[str, typer.Option(help="card number (EF05 tag 07), 9 characters")] = "",
    reader: Annotated[str, typer.Option(help="PC/SC reader: the agent reads the card")] = "",
    trace: Annotated[int, typer.Option(help="trace number; 0: from the clock")] = 0,
    ssn: Annotated[str, typer.Option(help="social security number (else the card index)")] = "",
    partial: Annotated[bool, typer.Option(help="pay what the account holds, rest cash")] = False,
    pin: PinOpt = "",
    gateway: GatewayOpt = "",
) -> None:
    """Send one Authorize (a swipe) to the POS gateway and print the decision.

    The same terminal and trace number sent again is answered with the original reply
    (marked replayed), never debited twice. With --reader the agent reads the card in
    that PC/SC reader (EF05/EF06 and its cryptogram) and prints a receipt.
    """
    amount_fen = _amount(amount)
    if reader:
        return agent_swipe(reader, amount_fen, institution, terminal, pin, partial)
    if not card:
        raise fail("give --card, or --reader to read the card")
    request = pos_pb2.AuthorizeRequest(
        terminal=_terminal(terminal, institution, trace),
        card_no=card,
        ssn=ssn,
        amount_fen=amount_fen,
        allow_partial=partial,
    )
    started = time.perf_counter()
    reply: pos_pb2.AuthorizeReply = exchange("Authorize", request, pin=pin, gateway=gateway)
    elapsed_ms = (time.perf_counter() - started) * 1000
    code = ResultCode(reply.result)
    table = Table.grid(padding=(0, 2))
    table.add_row("result", f"[bold]{code.name}[/] ({int(code)}) {reply.message}")
    table.add_row(
        "request", reply.request_id + (" [yellow](replayed)[/]" if reply.replayed else "")
    )
    table.add_row("amount", format_yuan(reply.amount_fen))
    table.add_row("paid from account", format_yuan(reply.paid_from_account_fen))
    table.add_row("paid in cash", format_yuan(reply.paid_in_cash_fen))
    if code.approved or code == ResultCode.INSUFFICIENT_BALANCE:
        table.add_row("balance after", format_yuan(reply.balance_after_fen))
    if code == ResultCode.PIN_WRONG:
        table.add_row("PIN tries left", str(reply.pin_tries_remaining))
    if reply.pharmacy_swipes_per_day:
        table.add_row(
            "pharmacy swipes today",
            f"{reply.pharmacy_swipes_today} of {reply.pharmacy_swipes_per_day}",
        )
    table.add_row("state version", f"{reply.state.person_key} v{reply.state.version}")
    table.add_row("decided at", reply.decided_at or "-")
    table.add_row("round trip", f"{elapsed_ms:.1f} ms")
    style = "green" if code.approved else "red"
    console.print(Panel(table, title=f"swipe {card}", border_style=style, expand=False))
    if not code.approved:
        raise typer.Exit(code=Exit.DECLINED)
