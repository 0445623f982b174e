"""Rich tables more than one command prints."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table

from clearing.codes import ResultCode


def result_codes_table(counts: Mapping[str, int], noun: str = "swipes") -> Table:
    """Decisions by result code (names as ResultCode members), in the codes' order."""
    table = Table(title="decisions by result code")
    table.add_column("result")
    table.add_column("code", justify="right")
    table.add_column(noun, justify="right")
    for name, n in sorted(counts.items(), key=lambda kv: ResultCode[kv[0]]):
        table.add_row(name, str(int(ResultCode[name])), f"{n:,}")
    return table
