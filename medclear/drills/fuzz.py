"""The gateway fuzz of `medclear drill fuzz` (hypothesis): fuzz_cases generates malformed
and hostile POS requests — random bytes and unicode as card numbers, huge and negative
amounts, overlong strings, wrong or missing MACs, missing fields, and bytes that are no
protobuf at all — and run_fuzz sends them, judges every answer (medclear.drills.hostile)
and checks that the victim's state and the gateway's health did not change.

This module imports hypothesis, a development dependency: the commands import it only
when they fuzz, so `medclear` runs without it.
"""

from __future__ import annotations

import time
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medclear.drills.access import StackAccess
from medclear.drills.hostile import (
    FUZZ_METHODS,
    FUZZ_TERMINAL,
    FuzzCase,
    FuzzTarget,
    fuzz_victim,
    gateway_healthy,
    snapshot,
)

# ---------------------------------------------------------------------------- cases


def fuzz_cases(victim_card: str, victim_ssn: str) -> st.SearchStrategy[FuzzCase]:
    """Malformed and hostile POS requests (hypothesis). Unsigned cases may name the
    victim's card and social security number; signed cases never do (a signed,
    well-formed request for a real card may legitimately change its state)."""
    junk = _junk()
    victim = st.sampled_from([victim_card, victim_ssn])
    terminals = _terminal_fields(junk)
    raw = st.builds(
        lambda m, b: FuzzCase(m, raw=b),
        st.sampled_from(sorted(FUZZ_METHODS)),
        st.one_of(st.binary(max_size=200), st.binary(min_size=2000, max_size=20_000)),
    )
    return st.one_of(
        _structured(st.one_of(junk, victim), junk, terminals, signed=False),
        _structured(junk, junk, terminals, signed=True),
        raw,
    )


def _junk() -> st.SearchStrategy[str]:
    """Text no identifier field should accept: any, overlong, near misses of real ones."""
    return st.one_of(
        st.text(max_size=40),
        st.text(min_size=300, max_size=3000),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=9, max_size=9),
        st.sampled_from(
            [
                "",
                " ",
                "S26000001 ",
                "s26000001",
                "‮S2600000",
                "\x00" * 9,
                "D" + "０" * 8,
                "3101011980010100" + "1X",
                "' OR 1=1 --",
            ]
        ),
    )


def _terminal_fields(junk: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """The terminal context: any of its fields, each junk or extreme (or the fuzz terminal)."""
    return st.fixed_dictionaries(
        {},
        optional={
            "terminal_id": st.one_of(junk, st.just(FUZZ_TERMINAL)),
            "institution_id": st.one_of(junk, st.sampled_from(["310101H00001", "310101P00001"])),
            "trace_number": st.integers(0, 2**64 - 1),
            "institution_type": st.integers(0, 2**31 - 1),
        },
    )


def _method_fields(
    method: str, ident: st.SearchStrategy[str], junk: st.SearchStrategy[str]
) -> st.SearchStrategy[dict[str, Any]]:
    """Any of a method's request fields: card and ssn from `ident`, extreme numbers."""
    int64 = st.integers(-(2**63), 2**63 - 1)
    uint64 = st.integers(0, 2**64 - 1)
    uint32 = st.integers(0, 2**32 - 1)
    amounts = st.one_of(int64, st.integers(-10, 10), st.sampled_from([10_000_000, 10_000_001]))
    common: dict[str, Any] = {"card_no": ident, "ssn": ident}
    if method == "Authorize":
        common |= {
            "amount_fen": amounts,
            "allow_partial": st.booleans(),
            "pin_block": st.binary(max_size=40),
            "card_cryptogram": st.binary(max_size=16),
            "card_challenge": st.binary(max_size=300),
            "card_counter": uint32,
        }
    elif method in ("Reverse", "Refund"):
        common |= {"original_trace_number": uint64, "amount_fen": amounts}
        if method == "Refund":
            common["original_terminal_id"] = junk
    else:
        common["pin_block"] = st.binary(max_size=40)
    return st.fixed_dictionaries({}, optional=common)


def _structured(
    ident: st.SearchStrategy[str],
    junk: st.SearchStrategy[str],
    terminals: st.SearchStrategy[dict[str, Any]],
    signed: bool,
) -> st.SearchStrategy[FuzzCase]:
    """Well-formed messages of any method with hostile fields: signed with a real MAC,
    or unsigned (no MAC or a garbage one)."""

    def build(method: str) -> st.SearchStrategy[FuzzCase]:
        return st.builds(
            lambda f, t, mac: FuzzCase(
                method, tuple(sorted(f.items())), tuple(sorted(t.items())), mac
            ),
            _method_fields(method, ident, junk),
            terminals,
            st.just("signed") if signed else st.sampled_from(["none", "garbage"]),
        ).map(_with_garbage_mac)

    return st.sampled_from(sorted(FUZZ_METHODS)).flatmap(build)


def _with_garbage_mac(case: FuzzCase) -> FuzzCase:
    if case.mac != "garbage":
        return case
    return FuzzCase(case.method, (*case.fields, ("mac", b"\x5a" * 16)), case.terminal, "none")


# ---------------------------------------------------------------------------- the run


def run_fuzz(a: StackAccess, examples: int, out: Console) -> bool:
    """Send `examples` hostile requests to the gateway and print the answers, counted;
    whether every answer was clear, the victim's state unchanged and the gateway healthy."""
    victim = fuzz_victim(a)
    before = snapshot(a, victim.ssn)
    target = FuzzTarget(a)
    started = time.monotonic()
    failure = ""

    @hsettings(
        max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(fuzz_cases(victim.card_no, victim.ssn))
    def fuzz(case: FuzzCase) -> None:
        target.check(case)

    try:
        fuzz()
    except AssertionError as exc:
        failure = str(exc)
    finally:
        target.close()
    elapsed = time.monotonic() - started
    after = snapshot(a, victim.ssn)
    healthy = gateway_healthy(a)
    table = Table(
        title=f"gateway fuzz: {examples} examples in {elapsed:.1f} s", title_justify="left"
    )
    table.add_column("answer")
    table.add_column("count", justify="right")
    for name, n in target.results.most_common():
        table.add_row(name, str(n))
    out.print(table)
    problems = [failure] if failure else []
    if before != after:
        problems.append(f"state changed: {before} → {after}")
    if not healthy:
        problems.append("the gateway is not healthy after the run")
    for p in problems:
        out.print(f"[red]{escape(p)}[/]")
    if not problems:
        out.print("[green]no crash, a clear code for every request, state unchanged[/]")
    return not problems
