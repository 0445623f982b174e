"""The idle-fetch back-off's schedule: first wait, doubling per further empty fetch up to
the cap, back to the first wait after a fetch that brought records."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.consumer import fetcher

from medclear import kafka_compat


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The waits the back-off asks for, with a fetch whose result the test sets."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds * 1000, 3))

    monkeypatch.setattr(kafka_compat.asyncio, "sleep", sleep)
    before = fetcher.Fetcher._proc_fetch_request
    yield slept
    fetcher.Fetcher._proc_fetch_request = before


class FakeFetcher:
    """Where the back-off keeps its count of empty fetches."""


def run_fetches(monkeypatch: pytest.MonkeyPatch, results: list[bool]) -> None:
    answers = iter(results)

    async def original(self: Any, *_: Any) -> bool:
        return next(answers)

    monkeypatch.setattr(kafka_compat, "_original", original)
    target = FakeFetcher()

    async def all_fetches() -> None:
        for _ in results:
            await fetcher.Fetcher._proc_fetch_request(target, None, None, None)

    asyncio.run(all_fetches())


def test_flat_by_default(monkeypatch: pytest.MonkeyPatch, waits: list[float]) -> None:
    kafka_compat.install_idle_fetch_backoff(2.0)
    run_fetches(monkeypatch, [False, False, False, True, False])
    assert waits == [2.0, 2.0, 2.0, 2.0]


def test_doubles_to_the_cap_and_resets_on_records(
    monkeypatch: pytest.MonkeyPatch, waits: list[float]
) -> None:
    kafka_compat.install_idle_fetch_backoff(2.0, 50.0)
    run_fetches(monkeypatch, [False] * 7 + [True, False, False])
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 50.0, 50.0, 2.0, 4.0]


def test_zero_switches_it_off(monkeypatch: pytest.MonkeyPatch, waits: list[float]) -> None:
    kafka_compat.install_idle_fetch_backoff(0.0, 50.0)
    assert fetcher.Fetcher._proc_fetch_request is kafka_compat._original


@pytest.mark.parametrize(("first", "cap"), [(-1.0, None), (2.0, 101.0), (101.0, None)])
def test_out_of_range_is_refused(first: float, cap: float | None) -> None:
    with pytest.raises(ValueError, match="back-off"):
        kafka_compat.install_idle_fetch_backoff(first, cap)
