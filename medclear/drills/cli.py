"""`medclear drill`: the fault drills as commands. Each breaks one part of the running
stack under steady POS traffic, repairs it, and proves afterwards that nothing was lost or
doubled; one table at the end, exit 5 if a check fails.

    medclear drill worker-kill --times 3     kill -9 a clearing worker, restart it, repeat
    medclear drill kill-loop --times 20      kill -9 worker, sms and settlement in turn
    medclear drill broker-restart            SIGTERM the busiest partition's leader, start it
    medclear drill broker-kill --fresh --brokers 3   kill -9 it, start it again
    medclear drill broker-outage --fresh --brokers 3 kill -9 it, 60 s down, start it
    medclear drill clickhouse-outage         stop ClickHouse for --seconds, start it again
    medclear drill smsc-outage               stop the SMSC for --seconds, start it again
    medclear drill hsm-outage                stop (or --freeze) the HSM for --seconds
    medclear drill all                       each of the above, one after another
    medclear drill fuzz --examples 2000      hostile and malformed requests at the gateway
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from medclear import stack
from medclear.drills.bounds import PERSONS_MIN, RATE_PER_S_DEFAULT, DrillError
from medclear.drills.report import DrillResult, results_table
from medclear.drills.run import BROKER_OUTAGE_S, DRILLS, run_specs, spec, target_stack
from medclear.infra.exits import Exit

drill_app = typer.Typer(
    help="Fault drills under steady POS traffic: kill or stop one part of the stack, "
    "repair it, then check conservation, state, ClickHouse (exactly once), SMS (no "
    "doubles) and print the time to recover. `medclear drill all` runs every drill; "
    "`medclear drill fuzz` sends hostile requests to the gateway. Exit 5 if a check fails.",
    no_args_is_help=True,
)
console = Console()

FreshOpt = Annotated[
    bool, typer.Option(help="start a stack of its own in a temporary state directory")
]
SecurityOpt = Annotated[
    bool,
    typer.Option(help="with --fresh: TLS and terminal security (MAC, PIN via the HSM)"),
]
RateOpt = Annotated[float, typer.Option(min=1, max=2000, help="swipes per second")]
BrokersOpt = Annotated[
    int, typer.Option(min=1, max=5, help="with --fresh: its Apache Kafka nodes (RF 3 from 3)")
]
PersonsOpt = Annotated[int, typer.Option(min=10, help="persons seeded per drill (at least)")]


def _finish(results: Sequence[DrillResult]) -> None:
    console.print(results_table(results))
    for r in results:
        for note in r.notes:
            console.print(f"[dim]{r.name}: {escape(note)}[/]")
    if not all(r.ok for r in results):
        raise typer.Exit(code=Exit.CHECK_FAILED)


def _drills(
    names: Sequence[str],
    fresh: bool,
    security: bool,
    rate: float,
    persons: int,
    times: int = 2,
    seconds: float = 10.0,
    freeze: bool = False,
    ch_seconds: float | None = None,
    brokers: int = 1,
) -> None:
    specs = [
        spec(n, times, ch_seconds if n == "clickhouse-outage" and ch_seconds else seconds, freeze)
        for n in names
    ]
    try:
        with target_stack(fresh, security, console, brokers) as a:
            results = run_specs(a, specs, rate, persons, console)
    except (DrillError, stack.StackError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(code=1) from exc
    _finish(results)


@drill_app.command("worker-kill")
def worker_kill_cmd(
    times: Annotated[int, typer.Option(min=1, max=50, help="kills, one after another")] = 3,
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """kill -9 a clearing worker (PID from stack.json) and restart it, --times over."""
    _drills(["worker-kill"], fresh, security, rate, persons, times=times)


@drill_app.command("kill-loop")
def kill_loop_cmd(
    times: Annotated[int, typer.Option(min=1, max=100, help="rounds: each component once")] = 20,
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    rate: RateOpt = 20.0,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """The loop benchmark (make bench): kill -9 the clearing worker, the sms job and the
    settlement job in turn under traffic, --times rounds, restarting each; then the drill's
    checks: no approval lost, no debit doubled, no SMS doubled, conservation."""
    _drills(["kill-loop"], fresh, security, rate, persons, times=times)


@drill_app.command("broker-restart")
def broker_restart_cmd(
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    brokers: BrokersOpt = 1,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """Restart a broker under traffic: the leader of the busiest commands partition is
    stopped as `medclear down` stops it (SIGTERM: a controlled shutdown), then started."""
    _drills(["broker-restart"], fresh, security, rate, persons, brokers=brokers)


@drill_app.command("broker-kill")
def broker_kill_cmd(
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    brokers: BrokersOpt = 3,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """kill -9 the broker leading the busiest commands partition under traffic, then start
    it again. Reports, beside the drill's checks (nothing lost, no debit doubled,
    conservation), the time to the first approved swipe after the kill and the p99 of
    the swipes sent during the fail-over. Meant for a cluster: --fresh --brokers 3."""
    _drills(["broker-kill"], fresh, security, rate, persons, brokers=brokers)


@drill_app.command("broker-outage")
def broker_outage_cmd(
    seconds: Annotated[float, typer.Option(min=1, help="how long the broker stays down")] = (
        BROKER_OUTAGE_S
    ),
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    brokers: BrokersOpt = 3,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """kill -9 the broker leading the busiest commands partition and keep it down for
    --seconds while the traffic goes on (the cluster serves with two of three), then start
    it again: it catches up from the others. Meant for --fresh --brokers 3."""
    _drills(["broker-outage"], fresh, security, rate, persons, seconds=seconds, brokers=brokers)


@drill_app.command("clickhouse-outage")
def clickhouse_outage_cmd(
    seconds: Annotated[float, typer.Option(min=1, help="how long ClickHouse is down")] = 120.0,
    freeze: Annotated[bool, typer.Option(help="SIGSTOP/SIGCONT instead of stop/start")] = False,
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """Stop ClickHouse for --seconds under traffic, then start it again."""
    _drills(["clickhouse-outage"], fresh, security, rate, persons, seconds=seconds, freeze=freeze)


@drill_app.command("smsc-outage")
def smsc_outage_cmd(
    seconds: Annotated[float, typer.Option(min=1, help="how long the SMSC is down")] = 20.0,
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """Stop the SMSC for --seconds under traffic, then start it again."""
    _drills(["smsc-outage"], fresh, security, rate, persons, seconds=seconds)


@drill_app.command("hsm-outage")
def hsm_outage_cmd(
    seconds: Annotated[float, typer.Option(min=1, help="how long the HSM is down")] = 20.0,
    freeze: Annotated[bool, typer.Option(help="SIGSTOP/SIGCONT instead of stop/start")] = False,
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """Stop (or freeze) the HSM for --seconds under traffic (needs terminal security)."""
    _drills(["hsm-outage"], fresh, security, rate, persons, seconds=seconds, freeze=freeze)


@drill_app.command("all")
def all_cmd(
    times: Annotated[int, typer.Option(min=1, max=50, help="worker kills")] = 3,
    seconds: Annotated[float, typer.Option(min=1, help="SMSC and HSM outages")] = 20.0,
    clickhouse_seconds: Annotated[float, typer.Option(min=1, help="ClickHouse outage")] = 120.0,
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT,
    persons: PersonsOpt = PERSONS_MIN,
) -> None:
    """Every drill, one after another, on one stack; one table at the end."""
    _drills(
        DRILLS,
        fresh,
        security,
        rate,
        persons,
        times=times,
        seconds=seconds,
        ch_seconds=clickhouse_seconds,
    )


@drill_app.command("fuzz")
def fuzz_cmd(
    examples: Annotated[int, typer.Option(min=1, max=1_000_000, help="requests")] = 2000,
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
) -> None:
    """Malformed and hostile requests (hypothesis) against the gateway: no crash, a clear
    result code for every one, a seeded person's state and the approvals unchanged."""
    # local: hypothesis, a development dependency, loads only when fuzzing: `medclear`
    # (which imports these commands) runs without it
    from medclear.drills.fuzz import run_fuzz

    try:
        with target_stack(fresh, security, console) as a:
            ok = run_fuzz(a, examples, console)
    except (DrillError, stack.StackError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(code=1) from exc
    if not ok:
        raise typer.Exit(code=Exit.CHECK_FAILED)
