"""The root of every error the pure core raises (`ClearingError`).

Each error also keeps the built-in base its callers already catch (`ValueError` for bad
input, `AssertionError` for a broken invariant), so `except ClearingError` and the
narrower built-in both work."""

from __future__ import annotations


class ClearingError(Exception):
    """Raised by clearing/ only: bad input to a pure function, or a broken invariant."""


class AmountError(ClearingError, ValueError):
    """Text that is not an amount in yuan with at most two decimals."""


class CalendarError(ClearingError, ValueError):
    """A pre-loss lifetime the calendar cannot count."""


class RecordError(ClearingError, ValueError):
    """A settlement record or reconciliation row that breaks its own arithmetic or form;
    the message names the row."""
