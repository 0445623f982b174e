"""Running drills: run_drill seeds its own persons, starts steady traffic, injects the
fault, repairs it, stops the traffic and waits for the pipeline to drain, then runs every
check (medclear.drills.checks) and returns the result. The catalogue of drills by name
(spec, DRILLS), run_specs to run several on one stack, and target_stack: the running
stack, or with `fresh` one of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from clearing.model import Institution
from medclear import stack
from medclear.drills.access import StackAccess, access
from medclear.drills.bounds import AFTER_RECOVERY_S, PERSON_SPACE, WARMUP_S, DrillError
from medclear.drills.checks import (
    check_state,
    clickhouse_once,
    conservation,
    count_sms,
    read_jsonl,
    sms_key,
    sms_resent_uncertain,
    wait_drained,
)
from medclear.drills.faults import (
    KILL_LOOP_JOBS,
    Fault,
    Log,
    Marks,
    broker,
    kill_loop,
    outage,
    worker_kill,
)
from medclear.drills.persons import drill_persons, drill_terminals, persons_needed, seed_and_read
from medclear.drills.report import DrillResult, during_faults, format_seconds, verdicts
from medclear.drills.traffic import SteadyTraffic, SwipeRecord
from medclear.infra.settings import get_settings
from medclear.infra.terminals import SEED_WINDOW
from medclear.sim.city import Resident
from medclear.stack.supervisor import watcher_paused

# ---------------------------------------------------------------------------- one drill


def run_drill(
    a: StackAccess,
    name: str,
    description: str,
    fault: Fault,
    fault_s: float,
    rate_per_s: float,
    persons: int,
    out: Console,
) -> DrillResult:
    """Seed, steady traffic, the fault, drain, checks; the result (never raises for a
    failed check: its problems say what failed)."""
    result = DrillResult(name, description)
    log = _timed_log(out)
    out.rule(f"drill {name}: {description}")
    count = persons_needed(rate_per_s, fault_s + WARMUP_S + 3 * AFTER_RECOVERY_S + 15, persons)
    people, terminals, before = _seed(a, count, log)
    traffic = SteadyTraffic(
        a.endpoints.gateway, a.pki_dir, a.keyring, people, terminals, rate_per_s
    )
    marks = _fault_under_traffic(a, fault, traffic, result, log)
    swipes = traffic.snapshot()
    _count_traffic(result, traffic, marks, swipes)
    _check(a, result, before, swipes, marks, log)
    out.print(
        f"  recovered after {format_seconds(result.recovery_s)}; drained "
        f"{'after ' + format(result.drained_s, '.1f') + ' s' if result.drained_s else 'NOT'}; "
        f"{'[green]passed[/]' if result.ok else '[red]' + escape('; '.join(result.problems))}"
    )
    return result


def _timed_log(out: Console) -> Log:
    """A log whose lines show the seconds since it was made (the drill's start)."""
    started = time.monotonic()

    def log(text: str) -> None:
        out.print(f"  [dim]{time.monotonic() - started:6.1f} s[/] {escape(text)}")

    return log


def _seed(
    a: StackAccess, count: int, log: Log
) -> tuple[list[Resident], list[tuple[str, Institution]], dict[str, int]]:
    """`count` fresh persons and the drill terminals (keys provisioned with terminal
    security), seeded: the persons, the terminals and the balances before any swipe."""
    base = random.SystemRandom().randrange(PERSON_SPACE // 1000 - 1) * 1000
    people = drill_persons(count, base)
    terminals = drill_terminals(a.settings)
    if a.keyring is not None:
        asyncio.run(
            a.keyring.provision(
                a.endpoints.hsm, [SEED_WINDOW, *(t for t, _ in terminals)], a.pki_dir
            )
        )
    before = asyncio.run(seed_and_read(a, people))
    log(f"seeded {count} persons (cards D{base:08d}…), {len(terminals)} hospital terminals")
    return people, terminals, before


def _fault_under_traffic(
    a: StackAccess, fault: Fault, traffic: SteadyTraffic, result: DrillResult, log: Log
) -> Marks:
    """Start the traffic, inject the fault after the warm-up, stop the traffic once every
    swipe has its answer; what the fault did. A fault that fails is one of the result's
    problems, not an error: the checks still run."""
    marks = Marks()
    traffic.start()
    try:
        time.sleep(WARMUP_S)
        fault(a, traffic, marks, log)
    except DrillError as exc:  # the checks still run: they say what the fault left behind
        result.problems.append(str(exc))
        log(f"fault: {exc}")
    finally:
        log("stopping traffic; waiting for every swipe's answer")
        traffic.stop()
    return marks


def _count_traffic(
    result: DrillResult, traffic: SteadyTraffic, marks: Marks, swipes: Sequence[SwipeRecord]
) -> None:
    """The client's figures: faults, repair and recovery times, swipes and their answers."""
    result.injected = len(marks.injected)
    result.repair_s = [r - i for i, r in zip(marks.injected, marks.repaired, strict=False)]
    for at in marks.injected:
        first = traffic.first_approval_after(at)
        if first is not None:
            result.recovery_s.append(first - at)
    windows = [
        (at, max(repaired, at + recovered))
        for at, repaired, recovered in zip(
            marks.injected, marks.repaired, result.recovery_s, strict=False
        )
    ]
    result.fault_sent, result.fault_retried, result.fault_latencies_ms = during_faults(
        windows, [(s.first_sent, s.answered_at, s.attempts) for s in swipes]
    )
    result.sent = len(swipes)
    result.results = Counter(s.result.name if s.result else "NO_ANSWER" for s in swipes)
    result.undecided_answers = traffic.undecided_answers
    result.approved = sum(1 for s in swipes if s.approved)
    if traffic.not_sent:
        result.notes.append(f"{traffic.not_sent} swipes not sent (client in-flight bound)")


def _check(
    a: StackAccess,
    result: DrillResult,
    before: Mapping[str, int],
    swipes: Sequence[SwipeRecord],
    marks: Marks,
    log: Log,
) -> None:
    """Wait for the pipeline to drain, then every check: figures, notes and problems."""
    approved = [s for s in swipes if s.approved]
    sms = a.has("smsc")
    log(f"{len(swipes)} swipes answered ({len(approved)} approved); waiting for the pipeline")
    drained = wait_drained(a, approved, sms)
    if drained is not None and marks.injected:
        result.drained_s = drained - marks.injected[-1]
    # ClickHouse first: the state check's replay of a swipe the stack forgot decides it anew
    result.in_clickhouse_once, result.clickhouse_duplicate_rows = clickhouse_once(
        a, [s.request_id for s in approved]
    )
    _check_state(a, result, before, swipes)
    if result.clickhouse_duplicate_rows:
        result.notes.append(
            f"{result.clickhouse_duplicate_rows} duplicate physical rows in "
            "ClickHouse, not yet merged (FINAL counts each once)"
        )
    if sms:
        _check_sms(a, result, approved)
    result.conservation_ok, result.conservation_difference_fen = conservation(a)
    result.problems += verdicts(result)
    others = {k: v for k, v in result.results.items() if k not in ("OK", "PARTIALLY_APPROVED")}
    log(f"answers: {dict(result.results)}; retried after {dict(result.undecided_answers)}")
    if others:
        result.notes.append(f"declined: {others}")


def _check_state(
    a: StackAccess, result: DrillResult, before: Mapping[str, int], swipes: Sequence[SwipeRecord]
) -> None:
    """Every approval in its person's state, balances as expected, nothing else debited."""
    state = check_state(a, before, swipes)
    result.verified_in_state = state.verified
    result.problems += [f"balance {m}" for m in state.balance_mismatches[:5]]
    if state.unknown_in_state:
        result.problems.append(
            f"{state.unknown_in_state} swipes in state not approved to the client"
        )
    if state.decided_again:
        result.problems.append(
            f"{state.decided_again} approved swipes forgotten by the stack "
            "(the replay check decided them again)"
        )


def _check_sms(a: StackAccess, result: DrillResult, approved: Sequence[SwipeRecord]) -> None:
    """Count the approvals' SMS at the SMSC (missing and doubled ones judged by verdicts)."""
    keys = [sms_key(s.phone, s.paid_from_account_fen, s.balance_after_fen) for s in approved]
    result.sms = count_sms(read_jsonl(a.smsc_messages_file()), keys)
    if result.sms.doubled:
        result.notes.append(
            f"{result.sms.doubled} SMS doubled (allowed here: "
            f"{result.sms_doubles_allowed}); {sms_resent_uncertain(a)} "
            "resent after a restart found them in flight, each flagged "
            "resent_uncertain"
        )


@dataclass(frozen=True)
class DrillSpec:
    name: str
    description: str
    fault: Fault
    fault_s: float  # how long the fault lasts, roughly (sizes the persons)
    needs: str = ""  # a component the drill needs


def spec(name: str, times: int = 2, seconds: float = 10.0, freeze: bool = False) -> DrillSpec:
    if name == "worker-kill":
        return DrillSpec(
            name,
            f"kill -9 a clearing worker, restart it ({times}×)",
            worker_kill(times),
            times * 15.0,
            "worker-0",
        )
    if name == "kill-loop":
        jobs = " and ".join(KILL_LOOP_JOBS)
        return DrillSpec(
            name,
            f"kill -9 worker-0 and the process of the {jobs} jobs in turn, {times}× each",
            kill_loop(times),
            times * (1 + len(KILL_LOOP_JOBS)) * 6.0,
            "worker-0",
        )
    if name == "broker-restart":
        return DrillSpec(
            name,
            "the busiest commands partition's leader stopped (SIGTERM), then started",
            broker(kill=False),
            15.0,
            "broker-0",
        )
    if name == "broker-kill":
        return DrillSpec(
            name,
            "kill -9 the busiest commands partition's leader, then start it",
            broker(kill=True),
            15.0,
            "broker-0",
        )
    if name == "broker-outage":
        return DrillSpec(
            name,
            f"kill -9 the busiest commands partition's leader, keep it "
            f"down {seconds:g} s, then start it",
            broker(kill=True, down_s=seconds),
            seconds + 15.0,
            "broker-0",
        )
    if name in ("clickhouse-outage", "smsc-outage", "hsm-outage"):
        component = name.removesuffix("-outage")
        how = "SIGSTOP/SIGCONT" if freeze else "stopped, then started"
        return DrillSpec(
            name,
            f"{component} {how} after {seconds:g} s",
            outage(component, seconds, freeze),
            seconds + 10,
            component,
        )
    raise ValueError(f"unknown drill {name!r}")


DRILLS = (
    "worker-kill",
    "broker-restart",
    "broker-kill",
    "clickhouse-outage",
    "smsc-outage",
    "hsm-outage",
)
BROKER_OUTAGE_S = 60.0  # drill broker-outage: how long one broker stays down


def run_specs(
    a: StackAccess, specs: Sequence[DrillSpec], rate_per_s: float, persons: int, out: Console
) -> list[DrillResult]:
    results = []
    for s in specs:
        if s.name == "hsm-outage" and not a.endpoints.terminal_security:
            results.append(
                DrillResult(
                    s.name,
                    s.description,
                    skipped="terminal security off: the HSM is not on the swipe path",
                )
            )
            continue
        if s.needs and not a.has(s.needs):
            results.append(DrillResult(s.name, s.description, skipped=f"no {s.needs}"))
            continue
        results.append(
            run_drill(a, s.name, s.description, s.fault, s.fault_s, rate_per_s, persons, out)
        )
    return results


@contextlib.contextmanager
def target_stack(
    fresh: bool, security: bool, out: Console, brokers: int = 1
) -> Iterator[StackAccess]:
    """The running stack, or with `fresh` one of its own in a temporary state directory
    (with `brokers` Apache Kafka nodes; stopped and wiped afterwards)."""
    settings = get_settings()
    if not fresh:
        with watcher_paused(settings):  # the drill breaks and repairs parts itself
            yield access(settings)
        return
    state_dir = Path(tempfile.mkdtemp(prefix="medclear-drill-")) / ".medclear"
    update: dict[str, Any] = {"state_dir": state_dir, "kafka_brokers": brokers}
    if not security:
        update |= {"tls": False, "terminal_security": False}
    settings = settings.model_copy(update=update)
    try:
        stack.up(settings, out)
        with watcher_paused(settings):
            yield access(settings)
    finally:
        stack.down(settings, out, wipe=True)
        with contextlib.suppress(OSError):
            state_dir.parent.rmdir()
