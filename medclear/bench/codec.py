"""`medclear bench codec`: what the record codec (clearing/codec.py) costs per record, over
the records of a synthetic city decided by the pure core: each resident's enrolment, then
swipes at the policy's institutions, with every command, reply, event and the persons
after. Per record type: how many, bytes, encode and decode µs; and for all of them, the
share of the JSON parser itself in decoding. Pure: needs no running stack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from clearing import codec, core
from clearing.codes import CardKind
from clearing.model import Authorize, EnrolPerson, Person, PinOutcome, Policy
from medclear.infra.policy import load_policy
from medclear.infra.settings import get_settings
from medclear.sim.city import residents

START_MS = 1_796_000_000_000  # a fixed moment: the same records every run
SWIPE_SPACING_MS = 90_000
BENCH_PVV = "0123456789abcdef"  # a well-formed PIN verification value; no HSM here
ROUNDS_MIN_S = 0.2  # each figure: repeat the type's records for at least this long


def city_records(persons: int, swipes_each: int, seed: int, policy: Policy) -> list[Any]:
    """Commands, replies, events and persons of `persons` residents enrolled and swiping."""
    institutions = sorted(policy.institutions)
    records: list[Any] = []
    for i, r in enumerate(residents(persons, seed)):
        enrol = EnrolPerson(
            f"bench-enrol-{i}",
            START_MS,
            r.ssn,
            r.name,
            r.category,
            r.phone,
            "",
            r.card_no,
            CardKind.SOCIAL_SECURITY,
            BENCH_PVV,
            r.opening_balance_fen,
            f"opening-{i}",
        )
        person: Person | None = None
        commands: list[Any] = [enrol]
        for k in range(swipes_each):
            commands.append(
                Authorize(
                    f"TB{k:02d}:{i:06d}",
                    START_MS + (k + 1) * SWIPE_SPACING_MS,
                    r.ssn,
                    r.card_no,
                    institutions[(i + k) % len(institutions)],
                    12_50 + 100 * k,
                    pin=PinOutcome.CORRECT,
                )
            )
        for command in commands:
            person, decision = core.handle(person, command, policy)
            records.extend((command, decision.reply, *decision.events))
        if person is not None:
            records.append(person)
    return records


def _per_record_us(work: Callable[[], object], count: int) -> float:
    rounds, started = 0, time.perf_counter()
    while True:
        work()
        rounds += 1
        elapsed = time.perf_counter() - started
        if elapsed >= ROUNDS_MIN_S:
            return elapsed * 1e6 / (rounds * count)


def figures(records: list[Any]) -> dict[str, dict[str, float]]:
    by_type: dict[str, list[Any]] = {}
    for record in records:
        by_type.setdefault(type(record).__name__, []).append(record)
    by_type["all"] = records
    return {name: _type_figures(group) for name, group in by_type.items()}


def _type_figures(group: list[Any]) -> dict[str, float]:
    encoded = [codec.encode(r) for r in group]

    def encode_all() -> object:
        return [codec.encode(r) for r in group]

    def decode_all() -> object:
        return [codec.decode(b) for b in encoded]

    def parse_all() -> object:
        return [orjson.loads(b) for b in encoded]

    return {
        "records": len(group),
        "bytes": sum(map(len, encoded)) / len(group),
        "encode_us": _per_record_us(encode_all, len(group)),
        "decode_us": _per_record_us(decode_all, len(group)),
        "json_parse_us": _per_record_us(parse_all, len(group)),
    }


def command(
    persons: Annotated[int, typer.Option(min=10, max=100_000, help="residents enrolled")] = 2_000,
    swipes: Annotated[int, typer.Option(min=0, max=20, help="swipes of each resident")] = 3,
    seed: Annotated[int, typer.Option(help="city seed")] = 2026,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """The record codec's cost per record type over a synthetic city decided by the pure
    core (enrolments and swipes): bytes, encode and decode µs, and the JSON parser's share
    of decoding. Needs no running stack."""
    records = city_records(persons, swipes, seed, load_policy(get_settings()))
    result = figures(records)
    if as_json:
        print(json.dumps({"persons": persons, "swipes_each": swipes, "types": result}, indent=2))
        return
    table = Table(title=f"clearing/codec.py: {len(records):,} records of {persons:,} residents")
    for column in ("record", "count", "bytes", "encode µs", "decode µs", "of which JSON µs"):
        table.add_column(column, justify="left" if column == "record" else "right")
    for name, f in sorted(result.items(), key=lambda item: (item[0] == "all", item[0])):
        table.add_row(
            name,
            f"{f['records']:,}",
            f"{f['bytes']:.0f}",
            f"{f['encode_us']:.1f}",
            f"{f['decode_us']:.1f}",
            f"{f['json_parse_us']:.1f}",
        )
    Console().print(table)
