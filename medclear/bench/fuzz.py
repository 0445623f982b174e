"""`medclear bench fuzz`: hostile requests at scale against a stack, counted (a benchmark,
not a test: `make test` runs `medclear drill fuzz` with a few hundred; this sends 100,000).

The requests are the drill's (medclear.drills.fuzz.fuzz_cases: malformed fields, oversized and
unicode junk, garbage and real MACs, raw bytes that are no protobuf, the victim's own card
and social security number without a MAC). Every answer is judged as the drill judges it,
but counted instead of stopping at the first:

- crashes: a component of the stack that exited or restarted during the run, or a gateway
  that answered no longer (UNAVAILABLE) or is not healthy after it (must be 0);
- unclear answers: a reply without a result code, an unknown one, an approval, a timeout
  (must be 0);
- state changes: the seeded victim's balance and version, and the approvals on the events
  topic, before and after (must be 0).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from medclear import stack
from medclear.drills.access import StackAccess
from medclear.drills.bounds import DrillError
from medclear.drills.cli import FreshOpt, SecurityOpt
from medclear.drills.hostile import (
    FuzzCase,
    FuzzTarget,
    Snapshot,
    fuzz_problem,
    fuzz_victim,
    gateway_healthy,
    snapshot,
)
from medclear.drills.run import target_stack
from medclear.infra.exits import Exit

console = Console()
REQUESTS_DEFAULT = 100_000


@dataclass
class FuzzBench:
    requests: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # result code or gRPC status
    unclear: Counter[str] = field(default_factory=Counter)  # judged unacceptable, by reason
    crashes: list[str] = field(default_factory=list)
    state_changes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def result_codes(self) -> list[str]:
        return sorted(a for a in self.answers if not a.startswith("gRPC "))

    @property
    def passed(self) -> bool:
        return not (self.crashes or self.state_changes or self.unclear)


def _pids(a: StackAccess) -> dict[str, int | None]:
    return {row.name: row.pid for row in stack.status(a.settings)}


SENDERS = 8  # threads sending at once (each its own channel): generation is the bound
QUEUE_CASES_MAX = 2_000  # generated cases waiting for a sender at most


def _progress_columns() -> tuple[ProgressColumn, ...]:
    return (
        TextColumn("hostile requests"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )


def run(a: StackAccess, requests: int) -> FuzzBench:
    """Send `requests` hostile requests and count what came back. Hypothesis generates
    them (generation only: no shrinking, no replay) on this thread; SENDERS threads send
    them, each over its own channel."""
    # local: hypothesis, a development dependency, loads only when this benchmark runs:
    # `medclear` (whose bench commands import this module) runs without it
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings

    from medclear.drills.fuzz import fuzz_cases

    result = FuzzBench()
    victim = fuzz_victim(a)
    before, pids_before = snapshot(a, victim.ssn), _pids(a)
    cases: queue.Queue[FuzzCase | None] = queue.Queue(QUEUE_CASES_MAX)
    lock = threading.Lock()
    targets = [FuzzTarget(a) for _ in range(SENDERS)]

    def send(target: FuzzTarget) -> None:
        while (case := cases.get()) is not None:
            answer = target.send(case)
            problem = fuzz_problem(case, answer)
            with lock:
                result.requests += 1
                if answer.status == grpc.StatusCode.UNAVAILABLE:
                    result.crashes.append(f"gateway unavailable: {answer.details}")
                elif problem is not None:
                    result.unclear[problem.split(":")[0][:80]] += 1

    senders = [threading.Thread(target=send, args=(t,), daemon=True) for t in targets]
    started = time.monotonic()
    with Progress(*_progress_columns(), console=console) as progress:
        task = progress.add_task("fuzz", total=requests, rate="")

        @hsettings(
            max_examples=requests,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(fuzz_cases(victim.card_no, victim.ssn))
        def generate(case: FuzzCase) -> None:
            cases.put(case)
            if cases.qsize() % 50 == 0:
                rate = result.requests / max(1e-9, time.monotonic() - started)
                progress.update(task, completed=result.requests, rate=f"{rate:,.0f}/s")

        for thread in senders:
            thread.start()
        try:
            generate()
        finally:
            for _ in senders:
                cases.put(None)
            for thread in senders:
                thread.join()
            for target in targets:
                target.close()
        progress.update(task, completed=result.requests)
    result.seconds = time.monotonic() - started
    for target in targets:
        result.answers.update(target.results)
    _check_after(a, victim.ssn, before, pids_before, result)
    return result


def _check_after(
    a: StackAccess,
    ssn: str,
    before: Snapshot,
    pids_before: dict[str, int | None],
    result: FuzzBench,
) -> None:
    """What the run changed that it must not: the victim's state, a process (restarted
    or gone), the gateway's health."""
    after, pids_after = snapshot(a, ssn), _pids(a)
    if before != after:
        result.state_changes.append(f"{before} → {after}")
    for name, pid in pids_before.items():
        if pids_after.get(name) != pid:
            result.crashes.append(f"{name}: pid {pid} → {pids_after.get(name)}")
    if not gateway_healthy(a):
        result.crashes.append("the gateway is not healthy after the run")


def table(result: FuzzBench) -> Table:
    out = Table(title=f"bench fuzz: {result.requests:,} hostile requests", title_justify="left")
    out.add_column("measure")
    out.add_column("value", justify="right")
    rate = result.requests / result.seconds if result.seconds else 0.0
    out.add_row("requests sent", f"{result.requests:,}")
    out.add_row("distinct result codes seen", str(len(result.result_codes)))
    out.add_row("crashes (must be 0)", str(len(result.crashes)))
    out.add_row("unclear answers (must be 0)", str(sum(result.unclear.values())))
    out.add_row("state changes (must be 0)", str(len(result.state_changes)))
    out.add_row("time", f"{result.seconds:,.1f} s ({rate:,.0f} requests/s)")
    return out


def answers_table(result: FuzzBench) -> Table:
    out = Table(title="answers", title_justify="left")
    out.add_column("answer")
    out.add_column("count", justify="right")
    for name, count in result.answers.most_common():
        out.add_row(name, f"{count:,}")
    return out


def command(
    requests: Annotated[int, typer.Option(min=1, max=10_000_000, help="hostile requests")] = (
        REQUESTS_DEFAULT
    ),
    fresh: FreshOpt = False,
    security: SecurityOpt = True,
) -> None:
    """Hostile requests at scale against the gateway (TLS and terminal security on with
    --fresh, else the running stack): requests, distinct result codes, crashes, state
    changes and time, as a table. Exit 5 if a crash, an unclear answer or a state change
    was seen."""
    try:
        with target_stack(fresh, security, console) as a:
            result = run(a, requests)
    except (DrillError, stack.StackError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=1) from exc
    console.print(table(result))
    console.print(answers_table(result))
    for problem in [
        *result.crashes,
        *result.state_changes,
        *(f"{n} × {p}" for p, n in result.unclear.items()),
    ]:
        console.print(f"[red]{problem}[/]")
    if not result.passed:
        raise typer.Exit(code=Exit.CHECK_FAILED)
