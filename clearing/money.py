"""Yuan text ↔ integer fen. Money is never a float anywhere in medclear."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from clearing.errors import AmountError


def parse_yuan(text: str) -> int:
    """'12.50' → 1250. Refuses more than two decimals, negatives and non-numbers."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation as exc:
        raise AmountError(f"not an amount: {text!r}") from exc
    if not value.is_finite() or value < 0 or value.as_tuple().exponent < -2:  # type: ignore[operator]
        raise AmountError(f"not an amount in yuan with at most two decimals: {text!r}")
    return int(value * 100)


def format_yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"
