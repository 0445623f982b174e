"""Driving the running stack with the simulated city: enrolling it through the card
registry and swiping its cards through the POS gateway, with a progress bar. Used by
`medclear seed`, the demo and the benchmarks."""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import AbstractContextManager
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from medclear.infra import progress as infra_progress
from medclear.infra.policy import load_institutions
from medclear.infra.progress import LineProgress
from medclear.infra.settings import Settings, get_settings
from medclear.infra.stack_state import client_pki_dir, endpoint
from medclear.infra.terminals import SEED_WINDOW, keyring_for
from medclear.sim import city, demo, traffic
from medclear.sim.traffic import LatencyStats

console = Console()
SEED_BATCH = 250  # residents per EnrolPersons call
SEED_IN_FLIGHT_MAX = 1_000  # residents in flight: each waits its decision (3 s deadline)


def progress_bar() -> AbstractContextManager[Progress | LineProgress]:
    """Progress on this module's console: a bar on a terminal, a line every few seconds
    otherwise."""
    return infra_progress.progress_bar(console)


def seed_city(
    persons: int,
    seed: int,
    concurrency: int,
    settings: Settings | None = None,
    *,
    district: bool = False,
    batch: int = SEED_BATCH,
) -> float:
    """Enrol a synthetic city through the registry, `concurrency` calls in flight of
    `batch` residents each (1: one EnrolPerson per resident), never more than
    SEED_IN_FLIGHT_MAX residents in flight; with `district`, every 100th resident (index
    7 mod 100) lives in the demo district (short pre-loss, see demo.py)."""
    settings = settings or get_settings()
    residents = city.residents(persons, seed)
    registry = endpoint(settings, "registry")
    keyring = keyring_for(settings, [SEED_WINDOW])
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("seeding persons", total=len(residents), info="")
        asyncio.run(
            traffic.seed(
                registry,
                residents,
                max(1, min(concurrency, SEED_IN_FLIGHT_MAX // max(1, batch))),
                lambda _resident: progress.advance(task),
                keyring,
                client_pki_dir(settings),
                (
                    lambda i: (
                        demo.DEMO_DISTRICT
                        if i % demo.DISTRICT_EVERY == demo.DISTRICT_INDEX
                        else traffic.DEFAULT_REGION
                    )
                )
                if district
                else None,
                batch,
            )
        )
    elapsed = time.perf_counter() - started
    path = seed_cards_file(settings)
    write_private(path, city.cards_csv(residents))
    console.print(f"the city's cards and their PINs: {path} (readable by you only)")
    return elapsed


def seed_cards_file(settings: Settings) -> Path:
    """Where `medclear seed` writes the seeded city's cards and PINs."""
    return settings.state_dir / "seed" / "cards.csv"


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it holds PINs)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # also when it existed with other permissions


def swipe_run(
    persons: int,
    seed: int,
    count: int,
    concurrency: int,
    label: str,
    settings: Settings | None = None,
) -> LatencyStats:
    settings = settings or get_settings()
    residents = city.residents(persons, seed)
    institutions = [i for i in load_institutions(settings.institutions_file).values()]
    plan = traffic.plan_swipes(residents, institutions, count, seed, time.time_ns() // 1000)
    keyring = keyring_for(settings, traffic.terminal_ids(plan))
    stats = LatencyStats()
    gateway = endpoint(settings, "gateway")
    with progress_bar() as progress:
        task = progress.add_task(label, total=count, info="")

        def done() -> None:
            approved = stats.results.get("OK", 0) + stats.results.get("PARTIALLY_APPROVED", 0)
            progress.update(
                task,
                advance=1,
                info=(
                    f"{stats.rate_per_s:,.0f}/s  p99 {stats.percentile(0.99):.1f} ms  "
                    f"approved {approved}  declined {stats.count - approved}"
                ),
            )

        asyncio.run(
            traffic.run_swipes(
                gateway, plan, concurrency, stats, done, keyring, client_pki_dir(settings)
            )
        )
    return stats
