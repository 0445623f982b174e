"""The customer receipt (小票), rendered with rich: institution, masked card, amount, paid
from the account, paid in cash, balance after, and the result in Chinese and English."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from clearing.codes import ResultCode, message_of
from clearing.money import format_yuan
from clearing.validate import mask_card, mask_name


@dataclass(frozen=True)
class Receipt:
    institution_id: str
    terminal_id: str
    trace: int
    card_no: str
    holder: str
    amount_fen: int
    paid_from_account_fen: int
    paid_in_cash_fen: int
    balance_after_fen: int | None  # None: not known (declined before the account)
    result: ResultCode
    decided_at: str = ""
    title: str = "医保个人账户消费 / medical account payment"


def render(receipt: Receipt) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    table.add_row("机构 institution", receipt.institution_id)
    table.add_row("终端 terminal", f"{receipt.terminal_id}  流水 trace {receipt.trace}")
    table.add_row("卡号 card", f"{mask_card(receipt.card_no)}  {mask_name(receipt.holder)}")
    table.add_row("金额 amount", format_yuan(receipt.amount_fen))
    table.add_row("个人账户支付 paid from account", format_yuan(receipt.paid_from_account_fen))
    table.add_row("现金支付 paid in cash", format_yuan(receipt.paid_in_cash_fen))
    if receipt.balance_after_fen is not None:
        table.add_row("余额 balance after", format_yuan(receipt.balance_after_fen))
    if receipt.decided_at:
        table.add_row("时间 time", receipt.decided_at)
    code = receipt.result
    table.add_row("结果 result", f"[bold]{message_of(code)}[/] ({code.name} {int(code)})")
    style = "green" if code.approved else "red"
    return Panel(table, title=receipt.title, border_style=style, expand=False)


def print_receipt(receipt: Receipt, console: Console) -> None:
    console.print(render(receipt))
