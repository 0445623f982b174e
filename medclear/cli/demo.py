"""`medclear demo`: the main job. The whole stack, a city enrolled while its counters serve,
a few minutes of a day at them with a live panel, then the day's summary and 对账.
(Its own module, so that `medclear seed` and `simulate` do not import the reconciliation
and the reader agent to start.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from clearing import settlement
from clearing.limits import SHANGHAI_UTC_OFFSET_MS
from medclear import stack
from medclear.cli import agent as agent_cli
from medclear.cli.recon import import_, reconcile
from medclear.cli.recon_report import console as recon_console
from medclear.cli.recon_report import print_report, render_html, summary
from medclear.cli.support import fail
from medclear.cli.tables import result_codes_table
from medclear.infra.policy import load_institutions
from medclear.infra.settings import Settings, get_settings
from medclear.infra.stack_state import client_pki_dir
from medclear.infra.terminals import SEED_WINDOW, keyring_for
from medclear.sim import city, demo, load
from medclear.sim.traffic import SeedError

demo_app = typer.Typer(rich_markup_mode="rich")
console = Console()

JOBS_CATCH_UP_S = 3.0  # after the demo's last swipe, before SMS and alerts are counted
RECON_SETTLE_S = 30.0  # the demo's reconciliation is retried this long while the
RECON_RETRY_S = 2.0  # settlement job and the ClickHouse sink catch up with the last events


def _demo_traffic(
    settings: Settings, persons: int, minutes: float, concurrency: int
) -> demo.DemoStats:
    """The demo's day at the counters (medclear/sim/demo.py), then its summary and 对账."""
    endpoints = stack.load_endpoints(settings)
    residents = city.residents(persons, 2026)
    institutions = list(load_institutions(settings.institutions_file).values())
    terminals = sorted({f"T{i.institution_id}" for i in institutions} | {SEED_WINDOW})
    keyring = keyring_for(settings, terminals)
    stats = demo.DemoStats()
    with Live(demo.panel(stats, minutes), console=console, refresh_per_second=2) as live:
        try:
            asyncio.run(
                demo.run(
                    endpoints.gateway,
                    endpoints.registry,
                    endpoints.prometheus,
                    residents,
                    institutions,
                    minutes,
                    concurrency,
                    keyring,
                    client_pki_dir(settings),
                    live,
                    stats,
                )
            )
        except SeedError as exc:
            raise fail(f"enrolling the city: {exc}") from exc
    pool = stats.pool
    if pool is not None:
        path = load.seed_cards_file(settings)
        load.write_private(path, city.cards_csv(pool.members))
        console.print(
            f"enrolled {pool.enrolled:,} of {pool.total:,} persons while the counters "
            f"served; their cards and PINs: {path} (the rest: `medclear seed "
            f"--persons {pool.total}`, which skips those enrolled)"
        )
    console.print(_day_table(stats, endpoints.prometheus))
    _reconcile_the_day(settings, stats)
    return stats


def _day_table(stats: demo.DemoStats, prometheus: str) -> Table:
    """The demo day in one row, once the jobs have caught up (SMS sent, alerts)."""
    time.sleep(JOBS_CATCH_UP_S)
    stats.sms_sent = demo.prometheus_sum(prometheus, "medclear_sms_sent_total")
    stats.alerts = demo.prometheus_sum(prometheus, "medclear_abnormal_alerts_total")
    cells = {
        "swipes": f"{sum(stats.results.values()):,}",
        "approved": f"{sum(stats.results[c.name] for c in demo.APPROVED):,}",
        "p50 ms": f"{stats.percentile(0.5):.1f}",
        "p99 ms": f"{stats.percentile(0.99):.1f}",
        "reversals": f"{stats.ops['reverse']:,}",
        "refunds": f"{stats.ops['refund']:,}",
        "loss reports": f"{stats.ops['loss_report']:,}",
        "releases": f"{stats.ops['release']:,}",
        "limit reached": "yes" if stats.ops["limit_reached"] else "no",
        "SMS sent": f"{stats.sms_sent:,.0f}",
        "alerts": f"{stats.alerts:,.0f}",
    }
    table = Table(title="the demo day")
    for column in cells:
        table.add_column(column, justify="right")
    table.add_row(*cells.values())
    return table


def _reconcile_the_day(settings: Settings, stats: demo.DemoStats) -> None:
    """The institutions' own files imported, then 对账 of today, printed and written."""
    files = demo.institution_files(stats, settings.state_dir / "reports" / "institution-files")

    with recon_console.capture():  # one line here instead of a table per institution
        for totals, detail in files:
            import_(totals, detail)
    console.print(f"imported the institutions' own files ({len(files)}): what their POS saw")

    beijing_now = time.time() + SHANGHAI_UTC_OFFSET_MS / 1000
    day = settlement.day_number(time.strftime("%Y-%m-%d", time.gmtime(beijing_now)))
    deadline = time.monotonic() + RECON_SETTLE_S
    report = reconcile(settings, day, None)
    while report.differences and time.monotonic() < deadline:  # settlement / sink catching up
        time.sleep(RECON_RETRY_S)
        report = reconcile(settings, day, None)
    print_report(report)
    path = settings.state_dir / "reports" / "recon-demo.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    console.print(f"reconciliation: {summary(report)} — report {path}")


@demo_app.command("demo")
def demo_cmd(
    persons: Annotated[int, typer.Option(min=10, help="persons in the city")] = 100_000,
    minutes: Annotated[float, typer.Option(min=0.2, help="minutes of traffic")] = 3.0,
    concurrency: Annotated[int, typer.Option(min=1, max=512, help="counters busy at once")] = 32,
    stop: Annotated[bool, typer.Option(help="stop the stack at the end (default: leave it)")] = (
        False
    ),
    agents: Annotated[
        bool,
        typer.Option(help="instead: swipe through the reader agent and virtual cards (pcscd)"),
    ] = False,
    swipes: Annotated[int, typer.Option(min=1, help="--agents: swipes through the agent")] = 400,
) -> None:
    """The main job: start the whole stack, seed a city, run a few minutes of a day at its
    counters — swipes (some with a wrong PIN), reversals, refunds, loss reports with a
    thief trying the card, releases, pre-losses lapsing, a pharmacy limit reached — with a
    live panel, then a summary and the reconciliation of the day. The stack is left
    running (Prometheus, reports) unless --stop; `medclear down` stops it."""
    settings = get_settings()
    if settings.pre_loss_policy_file is None:  # the demo district's pre-loss lasts 90 s
        demo_policy = Path(__file__).resolve().parents[1] / "data" / "pre_loss_policy_demo.csv"
        settings = settings.model_copy(update={"pre_loss_policy_file": demo_policy})
    started = time.perf_counter()
    stack.up(settings, console)
    ready_s = time.perf_counter() - started

    try:
        if agents:  # one agent, one card at a time: sequential, card read included
            try:
                load.seed_city(persons, 2026, 64, settings, district=True)
            except SeedError as exc:
                raise fail(f"seeding: {exc}") from exc
            by_agent = agent_cli.run_agent_traffic(
                agent_cli.stack_access(settings), persons, 2026, swipes, "POS traffic (agent)"
            )
            console.print(agent_cli.agent_stats_table("POS traffic through the agent", by_agent))
            console.print(result_codes_table(by_agent.results))
            console.print(f"stack ready in {ready_s:.1f} s")
        else:
            stats = _demo_traffic(settings, persons, minutes, concurrency)
            first = stats.first_answer_at
            console.print(
                f"stack ready in {ready_s:.1f} s; the first swipe answered "
                + (
                    f"{first - started:.1f} s after `medclear demo` started"
                    if first is not None
                    else "never"
                )
            )
    finally:
        if not stop:
            endpoints = stack.load_endpoints(settings)
            console.print(
                f"[bold]stack left running[/]: Prometheus {endpoints.prometheus} · "
                f"gateway {endpoints.gateway} · registry {endpoints.registry} · reports in "
                f"{settings.state_dir / 'reports'} · logs in {settings.state_dir / 'logs'}. "
                "Stop it with `medclear down` (`--wipe` also deletes the data)."
            )
        else:
            stack.down(settings, console)
