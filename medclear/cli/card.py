"""`medclear card ...`: the service window (and 12333 hotline) through the card registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.json_format import MessageToJson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clearing.codes import CardKind, CardState, InsuranceCategory, ResultCode
from clearing.money import format_yuan, parse_yuan
from medclear.cli.support import DEFAULT_WINDOW, fail, read_pin
from medclear.infra import status
from medclear.infra.exits import Exit
from medclear.infra.pki import Role
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel, pb_enum
from medclear.infra.settings import get_settings
from medclear.infra.stack_state import StackError, client_pki_dir, load_endpoints
from medclear.infra.terminals import keyring_for
from medclear.v1 import common_pb2, registry_pb2, registry_pb2_grpc

card_app = typer.Typer(
    help="Service-window operations on a person's cards (loss reports, replacement, …). "
    "Each is decided in order with the person's swipes.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

CardOpt = Annotated[str, typer.Option("--card", help="card number")]
SsnOpt = Annotated[str, typer.Option("--ssn", help="social security number (18)")]
WindowOpt = Annotated[
    str, typer.Option("--window", help="service window id (its keys are made on first use)")
]
PinOpt = Annotated[
    str,
    typer.Option(
        help="the new PIN (6 digits); asked for (hidden) when not given, an error in a script"
    ),
]
RequestOpt = Annotated[str, typer.Option("--request-id", help="repeat one to retry safely")]


def _registry_address() -> str:

    try:
        return load_endpoints(get_settings()).registry
    except StackError as exc:
        raise fail(str(exc)) from exc


def _new_pin_block(window: str, card: str, pin: str) -> bytes:
    """The new PIN as a PIN block under the window's PIN key (b"" when the running stack
    has terminal security off: no HSM takes PINs then)."""
    keyring = keyring_for(get_settings(), [window])
    if keyring is None:
        return b""
    typed = read_pin(pin, "new PIN")
    try:
        return keyring.pin_block(window, typed, card)
    except ValueError as exc:  # not digits, or the wrong length
        raise fail(f"PIN: {exc}") from exc


def _window(window: str, request_id: str) -> common_pb2.WindowContext:
    return common_pb2.WindowContext(
        window_id=window, operator_id=window, request_id=request_id or f"{window}-{time.time_ns()}"
    )


def _call(method: str, request: Any) -> Any:

    address, pki = _registry_address(), client_pki_dir(get_settings())

    async def call() -> Any:
        async with aio_channel(address, Role.WINDOW, pki) as channel:
            stub = registry_pb2_grpc.CardRegistryServiceStub(channel)
            return await getattr(stub, method)(request, timeout=CALL_TIMEOUT_S)

    try:
        return asyncio.run(call())
    except grpc.RpcError as exc:
        err.print(f"[bold red]error:[/] registry: {escape(status.describe(exc))}")
        raise typer.Exit(1) from exc


def _show(method: str, reply: registry_pb2.RegistryReply) -> None:
    code = ResultCode(reply.result)
    style = "green" if code == ResultCode.OK else "red"
    card = ""
    if reply.card.card_no:
        card = f"  card {reply.card.card_no} → {CardState(reply.card.state).name}"
    replayed = " (replayed)" if reply.replayed else ""
    console.print(
        f"[{style}]{method}: {code.name} ({int(code)})[/] {reply.message}{card}"
        f"  v{reply.state.version}{replayed}"
    )
    if code != ResultCode.OK:
        raise typer.Exit(Exit.DECLINED)


def _card_command(method: str, doc: str) -> Callable[..., None]:
    def command(
        card: CardOpt,
        ssn: SsnOpt = "",
        reason: Annotated[str, typer.Option(help="recorded with the operation")] = "",
        window: WindowOpt = DEFAULT_WINDOW,
        request_id: RequestOpt = "",
    ) -> None:
        _show(
            method,
            _call(
                method,
                registry_pb2.CardRequest(
                    window=_window(window, request_id), ssn=ssn, card_no=card, reason=reason
                ),
            ),
        )

    command.__doc__ = doc
    return command


for name, method, doc in [
    ("activate", "ActivateCard", "Activate (启用) an issued social security card."),
    (
        "report-loss",
        "ReportPreLoss",
        "Pre-loss report (预挂失): the card is refused at once; lapses by region policy.",
    ),
    ("confirm-loss", "ConfirmLoss", "Formal loss (正式挂失) at a window with ID; irrevocable."),
    ("release", "ReleaseLoss", "Release a pre-loss (解挂); refused after formal loss."),
    ("apply-replacement", "ApplyReplacement", "Apply for a replacement card (补卡)."),
    ("unlock", "Unlock", "Unlock after 3 wrong PINs; the PIN goes back to the initial one."),
    ("freeze", "Freeze", "Freeze the card."),
    ("unfreeze", "Unfreeze", "Unfreeze the card."),
]:
    card_app.command(name)(_card_command(method, doc))


@card_app.command("register")
def register(
    ssn: SsnOpt,
    name: Annotated[str, typer.Option(help="name (EF06)")],
    category: Annotated[str, typer.Option(help="EMPLOYEE | RESIDENT | SPECIAL")] = "EMPLOYEE",
    phone: Annotated[str, typer.Option(help="mobile for SMS")] = "",
    region: Annotated[str, typer.Option(help="region code (pre-loss policy)")] = "310101",
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Register an insured person (参保人)."""
    _show(
        "RegisterPerson",
        _call(
            "RegisterPerson",
            registry_pb2.RegisterPersonRequest(
                window=_window(window, request_id),
                ssn=ssn,
                name=name,
                category=pb_enum(InsuranceCategory[category.upper()]),
                phone=phone,
                region=region,
            ),
        ),
    )


@card_app.command("issue")
def issue(
    ssn: SsnOpt,
    card: CardOpt,
    temporary: Annotated[
        bool, typer.Option(help="a temporary card (临时卡): valid one year, made with its PIN")
    ] = False,
    pin: PinOpt = "",
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Issue a social security card (initial PIN; activate it, then change the PIN) or a
    temporary card (active at once, with the PIN given here); colour from the category."""
    kind = CardKind.TEMPORARY if temporary else CardKind.SOCIAL_SECURITY
    if pin and not temporary:
        raise fail(
            "a social security card is issued with the initial PIN: give --pin to "
            "`medclear card change-pin` after `activate`"
        )
    block = _new_pin_block(window, card, pin) if temporary else b""
    _show(
        "IssueCard",
        _call(
            "IssueCard",
            registry_pb2.IssueCardRequest(
                window=_window(window, request_id),
                ssn=ssn,
                card_no=card,
                kind=pb_enum(kind),
                new_pin_block=block,
            ),
        ),
    )


@card_app.command("change-pin")
def change_pin(
    card: CardOpt,
    ssn: SsnOpt = "",
    pin: PinOpt = "",
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Change the PIN at a service window (never at a POS): the card then pays with it.
    The new PIN goes to the HSM as a PIN block under the window's PIN key."""
    _show(
        "ChangePin",
        _call(
            "ChangePin",
            registry_pb2.ChangePinRequest(
                window=_window(window, request_id),
                ssn=ssn,
                card_no=card,
                new_pin_block=_new_pin_block(window, card, pin),
            ),
        ),
    )


@card_app.command("replace")
def replace_card(
    old: Annotated[str, typer.Option(help="the lost card")],
    new: Annotated[str, typer.Option(help="the new card number")],
    ssn: SsnOpt = "",
    change: Annotated[
        bool, typer.Option(help="换卡 (damaged / data changed) instead of 补卡")
    ] = False,
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Issue the replacement card: same person, same account; the old card is cancelled."""
    method = "ChangeCard" if change else "IssueReplacement"
    _show(
        method,
        _call(
            method,
            registry_pb2.IssueReplacementRequest(
                window=_window(window, request_id), ssn=ssn, old_card_no=old, new_card_no=new
            ),
        ),
    )


@card_app.command("cancel")
def cancel(
    ssn: SsnOpt,
    reason: Annotated[str, typer.Option(help="death / deregistration")],
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Cancel (注销) a person's cards for good."""
    _show(
        "Cancel",
        _call(
            "Cancel",
            registry_pb2.CancelRequest(window=_window(window, request_id), ssn=ssn, reason=reason),
        ),
    )


@card_app.command("set-limit")
def set_limit(
    card: CardOpt,
    per_day: Annotated[int, typer.Option(help="pharmacy swipes per Beijing day")],
    ssn: SsnOpt = "",
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Set the card's daily pharmacy swipe limit (default 2)."""
    _show(
        "SetPharmacyDailyLimit",
        _call(
            "SetPharmacyDailyLimit",
            registry_pb2.SetLimitRequest(
                window=_window(window, request_id),
                ssn=ssn,
                card_no=card,
                pharmacy_swipes_per_day=per_day,
            ),
        ),
    )


@card_app.command("set-phone")
def set_phone(
    ssn: SsnOpt,
    phone: Annotated[str, typer.Option(help="mobile number")],
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Set the mobile number the consumption SMS goes to."""
    _show(
        "SetPhone",
        _call(
            "SetPhone",
            registry_pb2.SetPhoneRequest(window=_window(window, request_id), ssn=ssn, phone=phone),
        ),
    )


@card_app.command("credit")
def credit(
    ssn: SsnOpt,
    amount: Annotated[str, typer.Option(help="yuan, e.g. 200.00")],
    source: Annotated[str, typer.Option(help="allocation line id; applied once")],
    window: WindowOpt = DEFAULT_WINDOW,
    request_id: RequestOpt = "",
) -> None:
    """Credit the personal account (划入); the same source id is never applied twice."""
    _show(
        "CreditAccount",
        _call(
            "CreditAccount",
            registry_pb2.CreditRequest(
                window=_window(window, request_id),
                ssn=ssn,
                amount_fen=parse_yuan(amount),
                source_id=source,
            ),
        ),
    )


@card_app.command("show")
def show(
    ssn: SsnOpt = "",
    card: Annotated[str, typer.Option("--card", help="or look up by card number")] = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="print the person as JSON (the service's fields; fen)")
    ] = False,
) -> None:
    """A person's cards, balance and recent transactions."""
    view: registry_pb2.PersonView = _call(
        "GetPerson", registry_pb2.GetPersonRequest(ssn=ssn, card_no=card)
    )
    code = ResultCode(view.result)
    if code != ResultCode.OK:
        err.print(f"[bold red]{code.name}[/] ({int(code)})")
        raise typer.Exit(Exit.DECLINED)
    if as_json:
        print(MessageToJson(view, preserving_proto_field_name=True, ensure_ascii=False))
        return
    console.print(
        f"[bold]{view.name}[/] {view.state.person_key} "
        f"{InsuranceCategory(view.category).name}  region {view.region}  "
        f"phone {view.phone}  balance [bold]{format_yuan(view.balance_fen)}[/]"
        f"{'  [red]CANCELLED[/]' if view.cancelled else ''}  v{view.state.version}"
    )
    cards = Table(title="cards")
    for column in ("card", "kind", "colour", "state", "PIN", "pharmacy/day", "pre-loss lapses"):
        cards.add_column(column)
    for c in view.cards:
        cards.add_row(
            c.card_no,
            CardKind(c.kind).name,
            common_pb2.CardColour.Name(c.colour),
            CardState(c.state).name,
            "initial" if c.initial_pin else f"{c.pin_tries_remaining} tries",
            str(c.pharmacy_swipes_per_day),
            c.pre_loss_deadline or "",
        )
    console.print(cards)
    txs = Table(title="recent transactions (newest first)")
    for column in (
        "time",
        "kind",
        "request / source",
        "card",
        "institution",
        "paid",
        "credited",
        "refunded",
        "reversed",
    ):
        txs.add_column(column)
    for t in view.transactions:
        txs.add_row(
            t.at,
            t.kind,
            t.request_id,
            t.card_no,
            t.institution_id,
            format_yuan(t.paid_from_account_fen),
            format_yuan(t.credited_fen),
            format_yuan(t.refunded_fen),
            "yes" if t.reversed else "",
        )
    console.print(txs)
