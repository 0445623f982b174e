"""The faults a drill injects under traffic, each a Fault that breaks one part of the
stack, records when (Marks), repairs it and waits until a swipe sent after the fault is
approved: kill -9 of workers and jobs (worker_kill, kill_loop), a component stopped or
frozen for a while (outage), and a broker stopped or killed, then started (broker).

The broker a broker drill hits is the one leading the busiest partition of the commands
topic (the most records): the one the most swipes wait on. On a cluster of three
(`medclear up --brokers 3`: RF 3, min.insync.replicas 2, acks=all, no unclean leader
election) its partitions' leadership moves to a surviving replica that has every
acknowledged write; on a single node everything waits until it is back, and it has every
acknowledged write too (written to the page cache before the acknowledgement, which a
process kill does not lose).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from medclear import stack
from medclear.drills.access import (
    StackAccess,
    pid_gone,
    restart,
    signal_component,
    stop_component,
)
from medclear.drills.bounds import AFTER_RECOVERY_S, RECOVERY_WAIT_S, DrillError
from medclear.drills.traffic import SteadyTraffic
from medclear.infra import topics
from medclear.infra.kafka_admin import describe, end_offsets
from medclear.stack.probes import run_sync
from stream_jobs.jobs import JOBS_IN_ONE


@dataclass
class Marks:
    """What a fault did, in time.monotonic()."""

    injected: list[float] = field(default_factory=list)
    repaired: list[float] = field(default_factory=list)


Log = Callable[[str], None]
Fault = Callable[[StackAccess, SteadyTraffic, Marks, Log], None]


def wait_recovered(traffic: SteadyTraffic, since: float) -> float:
    deadline = time.monotonic() + RECOVERY_WAIT_S
    while True:
        first = traffic.first_approval_after(since)
        if first is not None:
            return first
        if time.monotonic() > deadline:
            raise DrillError(f"no swipe approved within {RECOVERY_WAIT_S:.0f} s of the fault")
        time.sleep(0.05)


def worker_kill(times: int) -> Fault:
    return kill_loop(times, ())


KILL_LOOP_JOBS = ("sms", "settlement")  # beside the worker, the jobs whose loss costs money


def kill_loop_targets(running: Collection[str]) -> list[str]:
    """worker-0, then the process(es) of the sms and settlement jobs: their own
    (MEDCLEAR_JOBS_IN_ONE_PROCESS=false) or the one process of every job (`jobs`)."""
    hosts = [job if job in running else JOBS_IN_ONE for job in KILL_LOOP_JOBS]
    return ["worker-0", *dict.fromkeys(hosts)]


def kill_loop(times: int, names: Sequence[str] | None = None) -> Fault:
    """kill -9 each of `names` in turn (None: kill_loop_targets; empty: the clearing
    workers), restart it, wait for an approval after it; `times` rounds."""

    def fault(a: StackAccess, traffic: SteadyTraffic, marks: Marks, log: Log) -> None:
        running = sorted(r.name for r in stack.status(a.settings))
        if names is None:
            targets = kill_loop_targets(running)
        else:
            targets = list(names) or [n for n in running if n.startswith("worker-")]
        missing = [n for n in targets if n not in running]
        if not targets or missing:
            raise DrillError(f"the stack has no {', '.join(missing) or 'clearing worker'}")
        if names is None or names:  # every target, `times` rounds
            kills = [t for _ in range(times) for t in targets]
        else:  # the workers, `times` kills in all
            kills = [targets[n % len(targets)] for n in range(times)]
        for n, name in enumerate(kills):
            pid = signal_component(a, name, signal.SIGKILL)
            while not pid_gone(pid):
                time.sleep(0.01)
            marks.injected.append(time.monotonic())  # from here no reply can come from it
            log(f"kill -9 {name} (pid {pid}) [{n + 1}/{len(kills)}]")
            restart(a, name)
            marks.repaired.append(time.monotonic())
            log(f"{name} restarted and ready")
            wait_recovered(traffic, marks.injected[-1])
            time.sleep(AFTER_RECOVERY_S)

    return fault


def outage(name: str, seconds: float, freeze: bool = False) -> Fault:
    """Stop a component (SIGTERM, or SIGSTOP with `freeze`) for `seconds`, then start it
    again with `medclear restart` (or SIGCONT)."""

    def fault(a: StackAccess, traffic: SteadyTraffic, marks: Marks, log: Log) -> None:
        if freeze:
            pid = signal_component(a, name, signal.SIGSTOP)
            log(f"SIGSTOP {name} (pid {pid}) for {seconds:g} s")
        else:
            stop_component(a, name)
            log(f"stopped {name} (SIGTERM); down for {seconds:g} s")
        marks.injected.append(time.monotonic())  # the fault has taken effect
        time.sleep(max(0.0, marks.injected[-1] + seconds - time.monotonic()))
        if freeze:
            signal_component(a, name, signal.SIGCONT)
        else:
            restart(a, name)
        marks.repaired.append(time.monotonic())
        log(f"{name} {'resumed' if freeze else 'started again and ready'}")
        wait_recovered(traffic, marks.injected[-1])
        time.sleep(AFTER_RECOVERY_S)

    return fault


def busiest_commands_leader(a: StackAccess) -> tuple[str, int]:
    """The component of the broker leading the commands partition that holds the most
    records, and that partition."""
    kafka = a.endpoints.kafka()
    described = run_sync(describe(kafka, topics.COMMANDS.name))
    if described is None:
        raise DrillError(f"{topics.COMMANDS.name} is not on the broker")
    ends = {
        tp.partition: end for tp, end in run_sync(end_offsets(kafka, topics.COMMANDS.name)).items()
    }
    busiest = max(
        described["partitions"], key=lambda p: (ends.get(p["partition"], 0), -p["partition"])
    )
    if busiest["leader"] < 0:
        raise DrillError(f"{topics.COMMANDS.name}[{busiest['partition']}] has no leader")
    return f"broker-{busiest['leader']}", busiest["partition"]


def broker(kill: bool, down_s: float = 0.0) -> Fault:
    """The broker leading the busiest commands partition: kill -9 (or stop, SIGTERM: a
    controlled shutdown), keep it down `down_s` while the traffic goes on, start it."""

    def fault(a: StackAccess, traffic: SteadyTraffic, marks: Marks, log: Log) -> None:
        name, partition = busiest_commands_leader(a)
        if kill:
            pid = signal_component(a, name, signal.SIGKILL)
            while not pid_gone(pid):
                time.sleep(0.01)
        else:
            stop_component(a, name)
        marks.injected.append(time.monotonic())
        how = "kill -9" if kill else "stopped (SIGTERM)"
        log(
            f"{name} {how}: it led {topics.COMMANDS.name}[{partition}], the busiest; "
            f"down for {down_s:g} s"
        )
        time.sleep(max(0.0, marks.injected[-1] + down_s - time.monotonic()))
        restart(a, name)
        marks.repaired.append(time.monotonic())
        log(f"{name} started again and ready")
        wait_recovered(traffic, marks.injected[-1])
        time.sleep(AFTER_RECOVERY_S)

    return fault
