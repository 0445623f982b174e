"""Fault drills: break one part of the running stack under steady POS traffic, repair it,
and prove afterwards that nothing was lost or doubled.

    medclear drill worker-kill --times 3     kill -9 a clearing worker, restart it, repeat
    medclear drill kill-loop --times 20      kill -9 worker, sms and settlement in turn
    medclear drill broker-restart            SIGTERM the broker, start it again
    medclear drill clickhouse-outage         stop ClickHouse for --seconds, start it again
    medclear drill smsc-outage               stop the SMSC for --seconds, start it again
    medclear drill hsm-outage                stop (or --freeze) the HSM for --seconds
    medclear drill all                       each of the above, one after another
    medclear drill fuzz --examples 2000      hostile and malformed requests at the gateway

Each drill seeds its own persons (fresh social security numbers, cards and phones, so
an earlier drill's swipes and SMS cannot blur this one's figures), starts a client
thread that sends swipes at a fixed rate (open loop) and keeps every reply, injects the
fault, repairs it, stops the traffic and waits for the pipeline to drain. Then it checks:

- conservation: credits − balances = settled + pending (`medclear recon check`);
- every client-approved swipe is in its person's state (GetPerson: the record, and the
  balance = balance before − Σ approved), and in ClickHouse exactly once (one
  SwipeApproved row per request id in `events FINAL`);
- no SMS doubled: the SMSC logs every message; an approved swipe's SMS is identified by
  its phone, amount and balance after (a person's balance only falls during a drill, so
  two swipes never share a text), and counted;
- the time to recover: fault injected → the first approval of a swipe sent after it, and
  fault injected → the pipeline drained (ClickHouse, SMS and settlement caught up).

A swipe that gets no definite answer (TIMEOUT, UNAVAILABLE, a transport error) is asked
again after the traffic has stopped — the same request with the same trace number, until
it gets one (what a terminal does before it gives up and reverses). So the client's set
of approvals is exact, and a repeat decided before is answered from the person's memory
(`replayed`). Not during the fault: every resend is one more command on the broker, and
resending at once while a worker is away only builds the backlog it must work off.

The broker is restarted as `medclear down` stops it, never with kill -9: noida-db (the
embedded broker) keeps its data as one JSON file rewritten about every half second and
loses writes it acknowledged just before a kill -9 (docs/ARCHITECTURE.md, decision 9).
A bare SIGTERM loses some too: noida-db goes on acknowledging writes while it shuts down,
after its last save. So its own `noida-db stop kafka` comes first (it closes the Kafka
service and saves), then the SIGTERM (stack.broker_stop_argv). Production runs Apache
Kafka with acks=all and min.insync.replicas 2, where a broker kill loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clearing.codes import InstitutionType, InsuranceCategory, ResultCode
from clearing.model import Institution
from clearing.money import format_yuan
from clearing.validate import ssn_check_char
from medclear import stack
from medclear.errors import MedclearError
from medclear.infra.pki import Role
from medclear.infra.rpc import aio_channel, pb_enum, sync_channel
from medclear.infra.settings import Settings, get_settings, keyring_file
from medclear.infra.terminals import Keyring
from medclear.sim.city import REGION_CODE, Resident
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc, registry_pb2, registry_pb2_grpc

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

drill_app = typer.Typer(
    help="Fault drills under steady POS traffic: kill or stop one part of the stack, "
    "repair it, then check conservation, state, ClickHouse (exactly once), SMS (no "
    "doubles) and print the time to recover. `medclear drill all` runs every drill; "
    "`medclear drill fuzz` sends hostile requests to the gateway. Exit 1 if a check fails.",
    no_args_is_help=True,
)
console = Console()

# ---------------------------------------------------------------------------- bounds

RATE_PER_S_DEFAULT = 50.0
PERSONS_MIN = 100
SWIPES_PER_PERSON_MAX = 15  # GetPerson shows 20 records: the opening credit + these
SWIPES_PER_PERSON_CAP = 25  # never more (the sms job sends at most 30 per person-hour)
REPLAY_CHECK_APPROVALS_MAX = 55  # a replay beyond the 64 remembered replies would debit
OPENING_BALANCE_FEN = 10_000_00
SWIPE_FEN_MIN, SWIPE_FEN_MAX = 1_00, 30_00  # never more than the balance in one drill
RPC_TIMEOUT_S = 10.0
RETRY_PAUSE_S = 1.0  # before a terminal sends an undecided swipe again, doubling ...
RESEND_LANES = 4  # resends at a time: a backlog is worked off, not fed
RETRY_PAUSE_MAX_S = 15.0  # ... up to this (resends are commands too: no retry storm)
IN_FLIGHT_MAX = 5_000  # swipes awaiting a definite answer; beyond: not sent (counted)
ANSWER_WAIT_S = 180.0  # after the traffic stops, for every swipe to get an answer
WARMUP_S = 2.0  # steady traffic before the fault
AFTER_RECOVERY_S = 2.0  # steady traffic after the first approval following a repair
RECOVERY_WAIT_S = 120.0  # a repaired stack must approve a swipe within this
DRAIN_TIMEOUT_S = 180.0
DRAIN_POLL_S = 1.0
STOP_WAIT_S = 15.0  # for a SIGTERMed component to exit
SECONDS_LISTED_MAX = 5  # repair/recovery times listed one by one; more: max and median
SMS_DOUBLES_ALLOWED = 0  # held to 0 everywhere, the kill loop included: a kill -9 of the
# sms job may double what the SMSC accepted and the job had not yet settled (the residual
# window of docs/ARCHITECTURE.md); such a double fails the drill, and the note says how many
# resends were flagged resent_uncertain. The SMSC is stopped gracefully (it unbinds and
# answers every submit_sm it recorded)
UNDECIDED = frozenset({ResultCode.TIMEOUT, ResultCode.UNAVAILABLE, ResultCode.SYSTEM_ERROR})
APPROVED = frozenset({ResultCode.OK, ResultCode.PARTIALLY_APPROVED})
PERSON_SPACE = 50 * 12 * 28 * 1000  # distinct drill social security numbers
DRILL_TERMINALS = 8
SEED_ATTEMPTS = 5  # seeding again after a timeout (the same request ids)


class DrillError(MedclearError):
    """The drill could not run (no stack, a component missing, a repair failed)."""


# ---------------------------------------------------------------------------- persons


def drill_ssn(n: int) -> str:
    """The n-th drill social security number (0 ≤ n < PERSON_SPACE), all distinct:
    born 1950–1999 on day 1–28, sequence 000–999, valid check character."""
    if not 0 <= n < PERSON_SPACE:
        raise ValueError(f"person number {n} outside 0..{PERSON_SPACE - 1}")
    seq, rest = n % 1000, n // 1000
    day, rest = rest % 28 + 1, rest // 28
    month, rest = rest % 12 + 1, rest // 12
    first17 = f"{REGION_CODE}{1950 + rest:04d}{month:02d}{day:02d}{seq:03d}"
    return first17 + ssn_check_char(first17)


def drill_persons(count: int, base: int) -> list[Resident]:
    """`count` employees (personal account) numbered from `base`: card D + 8 digits,
    phone 19 + 9 digits, a PIN of their own, OPENING_BALANCE_FEN."""
    if count < 1 or base < 0 or base + count > PERSON_SPACE:
        raise ValueError(f"{count} persons from {base} do not fit {PERSON_SPACE}")
    out = []
    for n in range(base, base + count):
        pin = f"{(n * 7919) % 10**6:06d}"
        out.append(
            Resident(drill_ssn(n), "演练", InsuranceCategory.EMPLOYEE, f"19{n:09d}",
                     f"D{n:08d}", OPENING_BALANCE_FEN, pin)
        )  # fmt: skip
    return out


def persons_needed(rate_per_s: float, traffic_s: float, minimum: int = PERSONS_MIN) -> int:
    """Enough persons that none gets more than SWIPES_PER_PERSON_MAX swipes."""
    return max(minimum, math.ceil(rate_per_s * traffic_s / SWIPES_PER_PERSON_MAX))


# ---------------------------------------------------------------------------- traffic


@dataclass
class SwipeRecord:
    """One swipe as the terminal saw it. Times are time.monotonic()."""

    request_id: str
    ssn: str
    phone: str
    amount_fen: int
    first_sent: float
    last_sent: float = 0.0
    answered_at: float | None = None
    result: ResultCode | None = None  # None: no definite answer (yet, or given up)
    paid_from_account_fen: int = 0
    balance_after_fen: int = 0
    replayed: bool = False
    attempts: int = 0
    request: pos_pb2.AuthorizeRequest | None = field(default=None, repr=False)

    @property
    def approved(self) -> bool:
        return self.result in APPROVED


class SteadyTraffic:
    """Swipes at a fixed rate from a thread with its own event loop, whatever the stack
    does (open loop); each is resent until it gets a definite answer."""

    def __init__(
        self,
        gateway: str,
        pki_dir: Path | None,
        keyring: Keyring | None,
        persons: Sequence[Resident],
        terminals: Sequence[tuple[str, Institution]],
        rate_per_s: float,
        seed: int = 7,
    ) -> None:
        if not persons or not terminals or rate_per_s <= 0:
            raise ValueError("traffic needs persons, terminals and a positive rate")
        self.gateway = gateway
        self.pki_dir = pki_dir
        self.keyring = keyring
        self.persons = list(persons)
        self.terminals = list(terminals)
        self.rate_per_s = rate_per_s
        self.rng = random.Random(seed)
        self.trace_base = time.time_ns() // 1000
        self.swipes: list[SwipeRecord] = []
        self.not_sent = 0
        self.undecided_answers: Counter[str] = Counter()
        self._stop = threading.Event()
        self._give_up_at: float | None = None
        self._lock = threading.Lock()
        self._lanes: asyncio.Semaphore | None = None
        self._thread = threading.Thread(target=self._run, name="drill-traffic", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, answer_wait_s: float = ANSWER_WAIT_S) -> None:
        """No new swipes; wait until every sent swipe has a definite answer (bounded)."""
        self._give_up_at = time.monotonic() + answer_wait_s
        self._stop.set()
        self._thread.join(answer_wait_s + 30)
        if self._thread.is_alive():
            raise DrillError("the traffic thread did not finish")
        if self.error is not None:
            raise DrillError(f"traffic failed: {type(self.error).__name__}: {self.error}")

    def snapshot(self) -> list[SwipeRecord]:
        with self._lock:
            return list(self.swipes)

    def first_approval_after(self, at: float) -> float | None:
        """When the first swipe sent (last attempt) at or after `at` was approved."""
        times = [s.answered_at for s in self.snapshot()
                 if s.approved and s.answered_at is not None and s.last_sent >= at]  # fmt: skip
        return min(times) if times else None

    def _request(self, i: int) -> tuple[pos_pb2.AuthorizeRequest, Resident]:
        person = self.persons[i % len(self.persons)]
        terminal_id, institution = self.terminals[i % len(self.terminals)]
        request = pos_pb2.AuthorizeRequest(
            terminal=common_pb2.TerminalContext(
                terminal_id=terminal_id,
                institution_id=institution.institution_id,
                trace_number=self.trace_base + i,
                institution_type=pb_enum(institution.type),
            ),
            card_no=person.card_no,
            amount_fen=self.rng.randint(SWIPE_FEN_MIN, SWIPE_FEN_MAX),
        )
        if self.keyring is not None:
            request.pin_block = self.keyring.pin_block(terminal_id, person.pin, person.card_no)
            self.keyring.sign(terminal_id, request)
        return request, person

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by stop()
            self.error = exc

    async def _main(self) -> None:
        async with aio_channel(self.gateway, Role.TERMINAL, self.pki_dir) as channel:
            stub = pos_pb2_grpc.PosServiceStub(channel)
            self._lanes = asyncio.Semaphore(RESEND_LANES)
            tasks: set[asyncio.Task[None]] = set()
            start = time.monotonic()
            i = 0
            while not self._stop.is_set():
                delay = start + i / self.rate_per_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(min(delay, 0.05))
                    continue
                if len(tasks) >= IN_FLIGHT_MAX or i // len(self.persons) >= SWIPES_PER_PERSON_CAP:
                    self.not_sent += 1
                else:
                    request, person = self._request(i)
                    task = asyncio.ensure_future(self._swipe(stub, request, person))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.gather(*tasks)

    async def _swipe(
        self, stub: pos_pb2_grpc.PosServiceStub, request: pos_pb2.AuthorizeRequest, p: Resident
    ) -> None:
        t = request.terminal
        record = SwipeRecord(f"{t.terminal_id}:{t.trace_number}", p.ssn, p.phone,
                             request.amount_fen, time.monotonic(), request=request)  # fmt: skip
        with self._lock:
            self.swipes.append(record)
        pause_s = RETRY_PAUSE_S
        while True:
            code: ResultCode | None = None
            lanes = self._lanes if record.attempts and self._lanes is not None else None
            async with lanes or contextlib.nullcontext():
                record.last_sent = time.monotonic()
                record.attempts += 1
                try:
                    reply = await stub.Authorize(request, timeout=RPC_TIMEOUT_S)
                    code = ResultCode(reply.result)
                except grpc.aio.AioRpcError as exc:
                    self.undecided_answers[f"RPC_{exc.code().name}"] += 1
            if code is not None and code not in UNDECIDED:
                record.paid_from_account_fen = reply.paid_from_account_fen
                record.balance_after_fen = reply.balance_after_fen
                record.replayed = reply.replayed
                record.answered_at = time.monotonic()
                record.result = code  # last: readers take `result` as "answered"
                return
            if code is not None:
                self.undecided_answers[code.name] += 1
            if self._give_up_at is not None and time.monotonic() > self._give_up_at:
                return
            while not self._stop.is_set():  # ask again once the traffic has stopped
                await asyncio.sleep(0.1)
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, RETRY_PAUSE_MAX_S)


# ---------------------------------------------------------------------------- checks


def sms_key(phone: str, paid_fen: int, balance_fen: int) -> tuple[str, str]:
    """What identifies an approved swipe's SMS at the SMSC: destination (86 + phone) and
    the text's "支出<amount>元，余额<balance>元" (stream_jobs/templates/sms.toml)."""
    return f"86{phone}", f"支出{format_yuan(paid_fen)}元，余额{format_yuan(balance_fen)}元"


@dataclass(frozen=True)
class SmsCount:
    expected: int
    delivered: int  # expected SMS seen at least once
    doubled: int  # extra copies of expected SMS
    missing: int


def count_sms(
    messages: Iterable[Mapping[str, Any]], expected: Iterable[tuple[str, str]]
) -> SmsCount:
    """Match the SMSC's complete messages against the expected (destination, snippet)."""
    wanted = set(expected)
    by_destination: dict[str, list[str]] = {}
    for m in messages:
        if m.get("kind", "message") == "message":
            by_destination.setdefault(str(m.get("destination", "")), []).append(
                str(m.get("text", ""))
            )
    seen: Counter[tuple[str, str]] = Counter()
    for destination, snippet in wanted:
        seen[(destination, snippet)] = sum(
            1 for text in by_destination.get(destination, ()) if snippet in text
        )
    delivered = sum(1 for n in seen.values() if n > 0)
    doubled = sum(n - 1 for n in seen.values() if n > 1)
    return SmsCount(len(wanted), delivered, doubled, len(wanted) - delivered)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of the SMSC's log (a line being written is skipped)."""
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


@dataclass(frozen=True)
class StateCheck:
    verified: int  # approvals found in the person's records (or answered `replayed`)
    balance_mismatches: list[str]  # masked persons whose balance ≠ before − Σ approved
    unknown_in_state: int  # consumption records the client was never told were approved
    decided_again: int = 0  # approvals the person had forgotten: the replay check decided
    # them anew (it had to ask with the swipe itself), so it changed the state it checks


def expected_balances(before: Mapping[str, int], swipes: Iterable[SwipeRecord]) -> dict[str, int]:
    """Each person's balance after the drill: before − Σ paid of their approved swipes."""
    out = dict(before)
    for s in swipes:
        if s.approved:
            out[s.ssn] -= s.paid_from_account_fen
    return out


@dataclass
class DrillResult:
    name: str
    fault: str
    injected: int = 0
    recovery_s: list[float] = field(default_factory=list)  # injected → first approval after
    repair_s: list[float] = field(default_factory=list)  # injected → repaired (ready again)
    drained_s: float | None = None  # (last) injected → ClickHouse, SMS, settlement caught up
    sent: int = 0
    approved: int = 0
    results: Counter[str] = field(default_factory=Counter)
    undecided_answers: Counter[str] = field(default_factory=Counter)
    verified_in_state: int = 0
    in_clickhouse_once: int = 0
    clickhouse_duplicate_rows: int = 0  # physical rows ReplacingMergeTree has not merged yet
    sms: SmsCount | None = None
    conservation_ok: bool = False
    conservation_difference_fen: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""
    sms_doubles_allowed: int = SMS_DOUBLES_ALLOWED

    @property
    def ok(self) -> bool:
        return not self.problems


def verdicts(r: DrillResult) -> list[str]:
    """The drill's failed checks (pure: from the figures it gathered)."""
    out: list[str] = []
    if r.skipped:
        return out
    if r.approved == 0:
        out.append("no swipe was approved")
    if r.verified_in_state != r.approved:
        out.append(f"{r.approved - r.verified_in_state} approved swipes not found in state")
    if r.in_clickhouse_once != r.approved:
        out.append(f"{r.approved - r.in_clickhouse_once} approved swipes not exactly once in "
                   "ClickHouse (events FINAL)")  # fmt: skip
    if r.sms is not None and r.sms.doubled > r.sms_doubles_allowed:
        out.append(f"{r.sms.doubled} SMS doubled")
    if r.sms is not None and r.sms.missing:
        out.append(f"{r.sms.missing} approved swipes got no SMS")
    if not r.conservation_ok:
        out.append(f"conservation: difference {format_yuan(r.conservation_difference_fen)}")
    if len(r.recovery_s) < r.injected:
        out.append("no swipe was approved after a fault")
    if r.drained_s is None:
        out.append("the pipeline did not drain")
    return out


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} s"
    if len(values) <= SECONDS_LISTED_MAX:
        return f"max {max(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"
    return f"max {max(values):.1f} s, median {statistics.median(values):.1f} s of {len(values)}"


def results_table(results: Sequence[DrillResult]) -> Table:
    table = Table(title="fault drills", title_justify="left")
    for column, justify in (
        ("drill", "left"), ("fault", "left"), ("repaired after", "right"),
        ("recovered after", "right"), ("drained after", "right"), ("approved", "right"),
        ("in state", "right"), ("ClickHouse once", "right"), ("SMS doubled", "right"),
        ("conservation", "center"), ("verdict", "left"),
    ):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        if r.skipped:
            table.add_row(r.name, escape(r.fault), *["-"] * 8, f"[yellow]skipped[/]: {r.skipped}")
            continue
        sms = "n/a" if r.sms is None else f"{r.sms.doubled} of {r.sms.expected}"
        table.add_row(
            r.name,
            escape(r.fault),
            _seconds(r.repair_s),
            _seconds(r.recovery_s),
            f"{r.drained_s:.1f} s" if r.drained_s is not None else "-",
            f"{r.approved:,} of {r.sent:,}",
            f"{r.verified_in_state:,}",
            f"{r.in_clickhouse_once:,}",
            sms,
            "[green]ok[/]" if r.conservation_ok else "[red]FAILED[/]",
            "[green]passed[/]" if r.ok else "[red]" + escape("; ".join(r.problems)) + "[/]",
        )
    return table


# ---------------------------------------------------------------------------- the stack


@dataclass
class StackAccess:
    settings: Settings
    endpoints: stack.Endpoints
    pki_dir: Path | None
    keyring: Keyring | None
    state_dir: Path

    def component(self, name: str) -> stack.ComponentStatus:
        rows = {r.name: r for r in stack.status(self.settings)}
        if name not in rows:
            raise DrillError(f"the stack has no component {name!r} (has: {', '.join(rows)})")
        return rows[name]

    def has(self, name: str) -> bool:
        return any(r.name == name for r in stack.status(self.settings))

    def smsc_messages_file(self) -> Path:
        return self.state_dir / "data" / "smsc" / "messages.jsonl"


def access(settings: Settings) -> StackAccess:
    """The running stack of `settings.state_dir`. A component restarted by a drill gets
    this process's MEDCLEAR_* settings (stack.restart_component), so TLS and terminal
    security are taken from what the stack recorded; other settings (partitions, ...)
    must match the ones `medclear up` was given."""
    try:
        endpoints = stack.load_endpoints(settings)
    except stack.StackError as exc:
        raise DrillError(str(exc)) from exc
    settings = settings.model_copy(
        update={"tls": endpoints.tls, "terminal_security": endpoints.terminal_security}
    )
    pki = stack.client_pki_dir(settings)
    keyring = Keyring(keyring_file(settings)) if endpoints.terminal_security else None
    return StackAccess(settings, endpoints, pki, keyring, settings.state_dir.resolve())


def drill_terminals(settings: Settings) -> list[tuple[str, Institution]]:
    """Drill terminals at hospitals (no daily pharmacy limit to decline swipes)."""
    from medclear.infra.policy import load_institutions

    hospitals = [i for i in load_institutions(settings.institutions_file).values()
                 if i.type == InstitutionType.HOSPITAL and i.designated]  # fmt: skip
    if not hospitals:
        raise DrillError("no designated hospital in the institutions file")
    return [(f"TDRILL{n}", hospitals[n % len(hospitals)]) for n in range(DRILL_TERMINALS)]


def _pid_gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # our own child (a --fresh stack): reap it
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def signal_component(a: StackAccess, name: str, sig: signal.Signals) -> int:
    """Send `sig` to a running component of the stack (its process group when it leads
    one), as `medclear down` does: a SIGTERM follows the component's recorded stop command
    (noida-db: `noida-db stop kafka`, without which it acknowledges writes it then loses;
    stack.broker_stop_argv). Returns its pid."""
    row = a.component(name)
    if row.pid is None:
        raise DrillError(f"{name} is an external server; a drill cannot stop it")
    if not row.healthy and sig != signal.SIGCONT:
        raise DrillError(f"{name} is not healthy before the drill: {row.detail}")
    if sig == signal.SIGTERM:
        stack.run_stop_first(a.settings, name)
    try:
        if os.getpgid(row.pid) == row.pid:
            os.killpg(row.pid, sig)
        else:
            os.kill(row.pid, sig)
    except ProcessLookupError as exc:
        raise DrillError(f"{name} (pid {row.pid}) is gone") from exc
    return row.pid


def stop_component(a: StackAccess, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop a component as `medclear down` does: its stop command if it has one (with
    SIGTERM), the signal, wait for its leader, then SIGKILL whatever it left in its
    process group; and wait until its port is free (a restart at once found noida-db's
    port still taken)."""
    address = a.component(name).address.split(" ")[0]
    pid = signal_component(a, name, sig)
    deadline = time.monotonic() + STOP_WAIT_S
    while not _pid_gone(pid):
        if time.monotonic() > deadline:
            raise DrillError(f"{name} (pid {pid}) did not exit within {STOP_WAIT_S:.0f} s")
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    host, _, port = address.rpartition(":")
    while port.isdigit() and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) != 0:
                return
        time.sleep(0.1)


def restart(a: StackAccess, name: str) -> None:
    try:
        stack.restart_component(a.settings, name)
    except stack.StackError as exc:
        raise DrillError(f"restarting {name}: {exc}") from exc


# ---------------------------------------------------------------------------- faults


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


KILL_LOOP_COMPONENTS = ("worker-0", "sms", "settlement")  # the jobs whose loss costs money


def kill_loop(times: int, names: Sequence[str] = KILL_LOOP_COMPONENTS) -> Fault:
    """kill -9 each of `names` in turn (no names: the clearing workers), restart it, wait
    for an approval after it; `times` rounds."""

    def fault(a: StackAccess, traffic: SteadyTraffic, marks: Marks, log: Log) -> None:
        running = sorted(r.name for r in stack.status(a.settings))
        targets = list(names) or [n for n in running if n.startswith("worker-")]
        missing = [n for n in targets if n not in running]
        if not targets or missing:
            raise DrillError(f"the stack has no {', '.join(missing) or 'clearing worker'}")
        rounds = times if names else 1
        kills = [t for _ in range(rounds) for t in targets] if names else [
            targets[n % len(targets)] for n in range(times)]  # fmt: skip
        for n, name in enumerate(kills):
            pid = signal_component(a, name, signal.SIGKILL)
            while not _pid_gone(pid):
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


def broker_restart() -> Fault:
    def fault(a: StackAccess, traffic: SteadyTraffic, marks: Marks, log: Log) -> None:
        stop_component(a, "broker")  # noida-db: its stop command (it saves), then SIGTERM
        marks.injected.append(time.monotonic())
        log("broker stopped (its stop command, then SIGTERM); starting it again")
        restart(a, "broker")
        marks.repaired.append(time.monotonic())
        log("broker ready again")
        wait_recovered(traffic, marks.injected[-1])
        time.sleep(AFTER_RECOVERY_S)

    return fault


# ---------------------------------------------------------------------------- one drill


async def _seed_and_read(
    a: StackAccess, persons: Sequence[Resident], concurrency: int = 8
) -> dict[str, int]:
    """Seed the persons through the registry (again while a step times out: seeding
    requests are idempotent); their balances before any swipe."""
    from medclear.sim import traffic

    for attempt in range(SEED_ATTEMPTS):
        try:
            await traffic.seed(a.endpoints.registry, persons, concurrency, lambda: None,
                               a.keyring, a.pki_dir)  # fmt: skip
            break
        except (traffic.SeedError, grpc.aio.AioRpcError) as exc:
            undecided = any(code.name in str(exc) for code in UNDECIDED)
            if isinstance(exc, traffic.SeedError) and not undecided:
                raise DrillError(f"seeding: {exc}") from exc
            if attempt == SEED_ATTEMPTS - 1:
                raise DrillError(f"seeding did not finish: {exc}") from exc
    views = await person_views(a, [p.ssn for p in persons])
    before = {}
    for ssn, view in views.items():
        consumptions = [t for t in view.transactions if t.kind == "consumption"]
        if ResultCode(view.result) != ResultCode.OK or consumptions:
            raise DrillError(f"person {ssn[:6]}… already swiped: a drill person reused")
        before[ssn] = view.balance_fen
    return before


async def person_views(a: StackAccess, ssns: Sequence[str]) -> dict[str, Any]:
    async with aio_channel(a.endpoints.registry, Role.WINDOW, a.pki_dir) as channel:
        stub = registry_pb2_grpc.CardRegistryServiceStub(channel)
        lanes = asyncio.Semaphore(32)

        async def one(ssn: str) -> tuple[str, Any]:
            async with lanes:
                view = await stub.GetPerson(
                    registry_pb2.GetPersonRequest(ssn=ssn), timeout=RPC_TIMEOUT_S
                )
                return ssn, view

        return dict(await asyncio.gather(*(one(s) for s in ssns)))


async def _replayed(a: StackAccess, swipes: Sequence[SwipeRecord]) -> tuple[set[str], int]:
    """Request ids whose repeat is answered `replayed` with the original payment, and how
    many repeats were decided anew instead (the person had no memory of the swipe)."""
    out, decided_again = set(), 0
    async with aio_channel(a.endpoints.gateway, Role.TERMINAL, a.pki_dir) as channel:
        stub = pos_pb2_grpc.PosServiceStub(channel)
        for s in swipes:
            assert s.request is not None
            reply = await stub.Authorize(s.request, timeout=RPC_TIMEOUT_S)
            if not reply.replayed and ResultCode(reply.result) not in UNDECIDED:
                decided_again += 1
            elif (reply.replayed and ResultCode(reply.result) in APPROVED
                    and reply.paid_from_account_fen == s.paid_from_account_fen):  # fmt: skip
                out.add(s.request_id)
    return out, decided_again


def check_state(
    a: StackAccess, before: Mapping[str, int], swipes: Sequence[SwipeRecord]
) -> StateCheck:
    approved = [s for s in swipes if s.approved]
    views = asyncio.run(person_views(a, list(before)))
    expected = expected_balances(before, swipes)
    mismatches = [
        f"{ssn[:6]}…{ssn[-4:]}: {format_yuan(views[ssn].balance_fen)} ≠ {format_yuan(balance)}"
        for ssn, balance in expected.items()
        if views[ssn].balance_fen != balance
    ]
    recorded: dict[str, set[str]] = {
        ssn: {t.request_id for t in v.transactions if t.kind == "consumption"}
        for ssn, v in views.items()
    }
    approved_ids = {s.request_id for s in approved}
    unknown = sum(len(ids - approved_ids) for ids in recorded.values())
    found = {s.request_id for s in approved if s.request_id in recorded[s.ssn]}
    per_person = Counter(s.ssn for s in approved)
    unseen = [s for s in approved if s.request_id not in found]
    replayable = [s for s in unseen if per_person[s.ssn] <= REPLAY_CHECK_APPROVALS_MAX]
    decided_again = 0
    if replayable:  # beyond the 20 records GetPerson shows: ask the person's memory
        replayed, decided_again = asyncio.run(_replayed(a, replayable))
        found |= replayed
    return StateCheck(len(found), mismatches, unknown, decided_again)


def clickhouse_once(a: StackAccess, request_ids: Sequence[str]) -> tuple[int, int]:
    """(approved request ids with exactly one SwipeApproved row in `events FINAL`,
    physical duplicate rows among them not yet merged away)."""
    from stream_jobs import ch

    if not request_ids:
        return 0, 0
    client = ch.connect(a.endpoints.clickhouse_url, a.settings.clickhouse_database)
    try:
        params = {"ids": tuple(request_ids)}
        rows = client.execute(
            "SELECT request_id, count() FROM events FINAL WHERE event_type = 'SwipeApproved' "
            "AND request_id IN %(ids)s GROUP BY request_id",
            params,
        )
        raw = client.execute(
            "SELECT count() - uniqExact(event_id) FROM events WHERE request_id IN %(ids)s",
            params,
        )
    finally:
        client.disconnect()
    return sum(1 for _rid, n in rows if int(n) == 1), int(raw[0][0])


def sms_resent_uncertain(a: StackAccess) -> int:
    """SMS the sms job sent again after a restart found them in flight (outcome records
    flagged `resent_uncertain` in ClickHouse): each may be a double, none is silent."""
    from stream_jobs import ch

    client = ch.connect(a.endpoints.clickhouse_url, a.settings.clickhouse_database)
    try:
        rows = client.execute(
            "SELECT uniqExact(event_id) FROM sms_outcomes WHERE resent_uncertain = 1"
        )
    finally:
        client.disconnect()
    return int(rows[0][0])


def conservation(a: StackAccess) -> tuple[bool, int]:
    """`medclear recon check`'s figures: (holds, difference in fen)."""
    from clearing import settlement as rules
    from medclear.cli.recon import read_accounts, read_settlements

    accounts = read_accounts(a.endpoints.kafka_bootstrap)
    settled, pending = rules.settled_and_pending(read_settlements(a.endpoints.kafka_bootstrap))
    result = rules.Conservation(accounts.credits_fen, accounts.balances_fen, settled, pending)
    return result.holds and not accounts.person_differences, result.difference_fen


def wait_drained(a: StackAccess, approved: Sequence[SwipeRecord], sms: bool) -> float | None:
    """Poll until ClickHouse holds every approval, the SMSC has every SMS and money is
    conserved (the settlement job caught up); when that happened, or None."""
    ids = [s.request_id for s in approved]
    keys = [sms_key(s.phone, s.paid_from_account_fen, s.balance_after_fen) for s in approved]
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            once, _dups = clickhouse_once(a, ids)
            sms_ok = not sms or count_sms(read_jsonl(a.smsc_messages_file()), keys).missing == 0
            if once == len(ids) and sms_ok and conservation(a)[0]:
                return time.monotonic()
        except Exception:  # a server still coming back: poll again
            pass
        time.sleep(DRAIN_POLL_S)
    return None


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
    started = time.monotonic()

    def log(text: str) -> None:
        out.print(f"  [dim]{time.monotonic() - started:6.1f} s[/] {escape(text)}")

    out.rule(f"drill {name}: {description}")
    count = persons_needed(rate_per_s, fault_s + WARMUP_S + 3 * AFTER_RECOVERY_S + 15, persons)
    base = random.SystemRandom().randrange(PERSON_SPACE // 1000 - 1) * 1000
    people = drill_persons(count, base)
    terminals = drill_terminals(a.settings)
    if a.keyring is not None:
        from medclear.infra.terminals import SEED_WINDOW

        asyncio.run(a.keyring.provision(a.endpoints.hsm, [SEED_WINDOW, *(t for t, _ in terminals)],
                                        a.pki_dir))  # fmt: skip
    before = asyncio.run(_seed_and_read(a, people))
    log(f"seeded {count} persons (cards D{base:08d}…), {len(terminals)} hospital terminals")
    traffic = SteadyTraffic(a.endpoints.gateway, a.pki_dir, a.keyring, people, terminals,
                            rate_per_s)  # fmt: skip
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
    swipes = traffic.snapshot()
    result.injected = len(marks.injected)
    result.repair_s = [r - i for i, r in zip(marks.injected, marks.repaired, strict=False)]
    for at in marks.injected:
        first = traffic.first_approval_after(at)
        if first is not None:
            result.recovery_s.append(first - at)
    result.sent = len(swipes)
    result.results = Counter(s.result.name if s.result else "NO_ANSWER" for s in swipes)
    result.undecided_answers = traffic.undecided_answers
    approved = [s for s in swipes if s.approved]
    result.approved = len(approved)
    if traffic.not_sent:
        result.notes.append(f"{traffic.not_sent} swipes not sent (client in-flight bound)")
    sms = a.has("smsc")
    log(f"{len(swipes)} swipes answered ({len(approved)} approved); waiting for the pipeline")
    drained = wait_drained(a, approved, sms)
    if drained is not None and marks.injected:
        result.drained_s = drained - marks.injected[-1]
    # ClickHouse first: the state check's replay of a swipe the stack forgot decides it anew
    result.in_clickhouse_once, result.clickhouse_duplicate_rows = clickhouse_once(
        a, [s.request_id for s in approved]
    )
    state = check_state(a, before, swipes)
    result.verified_in_state = state.verified
    result.problems += [f"balance {m}" for m in state.balance_mismatches[:5]]
    if state.unknown_in_state:
        result.problems.append(f"{state.unknown_in_state} swipes in state not approved to "
                               "the client")  # fmt: skip
    if state.decided_again:
        result.problems.append(f"{state.decided_again} approved swipes forgotten by the stack "
                               "(the replay check decided them again)")  # fmt: skip
    if result.clickhouse_duplicate_rows:
        result.notes.append(f"{result.clickhouse_duplicate_rows} duplicate physical rows in "
                            "ClickHouse, not yet merged (FINAL counts each once)")  # fmt: skip
    if sms:
        keys = [sms_key(s.phone, s.paid_from_account_fen, s.balance_after_fen) for s in approved]
        result.sms = count_sms(read_jsonl(a.smsc_messages_file()), keys)
        if result.sms.doubled:
            result.notes.append(f"{result.sms.doubled} SMS doubled (allowed here: "
                                f"{result.sms_doubles_allowed}); {sms_resent_uncertain(a)} "
                                "resent after a restart found them in flight, each flagged "
                                "resent_uncertain")  # fmt: skip
    result.conservation_ok, result.conservation_difference_fen = conservation(a)
    result.problems += verdicts(result)
    others = {k: v for k, v in result.results.items() if k not in ("OK", "PARTIALLY_APPROVED")}
    log(f"answers: {dict(result.results)}; retried after {dict(result.undecided_answers)}")
    if others:
        result.notes.append(f"declined: {others}")
    out.print(
        f"  recovered after {_seconds(result.recovery_s)}; drained "
        f"{'after ' + format(result.drained_s, '.1f') + ' s' if result.drained_s else 'NOT'}; "
        f"{'[green]passed[/]' if result.ok else '[red]' + escape('; '.join(result.problems))}"
    )
    return result


# ---------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class DrillSpec:
    name: str
    description: str
    fault: Fault
    fault_s: float  # how long the fault lasts, roughly (sizes the persons)
    needs: str = ""  # a component the drill needs


def spec(name: str, times: int = 2, seconds: float = 10.0, freeze: bool = False) -> DrillSpec:
    if name == "worker-kill":
        return DrillSpec(name, f"kill -9 a clearing worker, restart it ({times}×)",
                         worker_kill(times), times * 15.0, "worker-0")  # fmt: skip
    if name == "kill-loop":
        components = ", ".join(KILL_LOOP_COMPONENTS)
        return DrillSpec(name, f"kill -9 {components} in turn, {times}× each",
                         kill_loop(times), times * len(KILL_LOOP_COMPONENTS) * 6.0,
                         "sms")  # fmt: skip
    if name == "broker-restart":
        return DrillSpec(name, "broker stop + start (noida-db: not kill -9)",
                         broker_restart(), 15.0, "broker")  # fmt: skip
    if name in ("clickhouse-outage", "smsc-outage", "hsm-outage"):
        component = name.removesuffix("-outage")
        how = "SIGSTOP/SIGCONT" if freeze else "stopped, then started"
        return DrillSpec(name, f"{component} {how} after {seconds:g} s",
                         outage(component, seconds, freeze), seconds + 10, component)  # fmt: skip
    raise ValueError(f"unknown drill {name!r}")


# broker-restart last: on noida-db 0.2.3 with the RocksDB table store it can leave the
# worker crashed (see tests/integration/test_drills.py), which would fail the rest
DRILLS = ("worker-kill", "clickhouse-outage", "smsc-outage", "hsm-outage", "broker-restart")


def run_specs(
    a: StackAccess, specs: Sequence[DrillSpec], rate_per_s: float, persons: int, out: Console
) -> list[DrillResult]:
    results = []
    for s in specs:
        if s.name == "hsm-outage" and not a.endpoints.terminal_security:
            results.append(DrillResult(s.name, s.description, skipped="terminal security off: "
                                       "the HSM is not on the swipe path"))  # fmt: skip
            continue
        if s.needs and not a.has(s.needs):
            results.append(DrillResult(s.name, s.description, skipped=f"no {s.needs}"))
            continue
        results.append(run_drill(a, s.name, s.description, s.fault, s.fault_s, rate_per_s,
                                 persons, out))  # fmt: skip
    return results


@contextlib.contextmanager
def target_stack(fresh: bool, security: bool, out: Console) -> Iterator[StackAccess]:
    """The running stack, or with `fresh` one of its own in a temporary state directory
    (stopped and wiped afterwards)."""
    settings = get_settings()
    if not fresh:
        yield access(settings)
        return
    state_dir = Path(tempfile.mkdtemp(prefix="medclear-drill-")) / ".medclear"
    update: dict[str, Any] = {"state_dir": state_dir}
    if not security:
        update |= {"tls": False, "terminal_security": False}
    settings = settings.model_copy(update=update)
    try:
        stack.up(settings, out)
        yield access(settings)
    finally:
        stack.down(settings, out, wipe=True)
        with contextlib.suppress(OSError):
            state_dir.parent.rmdir()


# ---------------------------------------------------------------------------- fuzz

FUZZ_TERMINAL = "TFUZZ1"
FUZZ_METHODS: dict[str, tuple[type[Any], type[Any]]] = {
    "Authorize": (pos_pb2.AuthorizeRequest, pos_pb2.AuthorizeReply),
    "Reverse": (pos_pb2.ReverseRequest, pos_pb2.ReverseReply),
    "Refund": (pos_pb2.RefundRequest, pos_pb2.RefundReply),
    "BalanceInquiry": (pos_pb2.BalanceInquiryRequest, pos_pb2.BalanceInquiryReply),
}
ACCEPTED_STATUS = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
)
DESERIALIZE_FAILURE = "deserializ"  # grpc's own answer to bytes that are no protobuf


@dataclass(frozen=True)
class FuzzCase:
    """One hostile request: a message with chosen fields, or raw bytes."""

    method: str
    fields: tuple[tuple[str, Any], ...] = ()
    terminal: tuple[tuple[str, Any], ...] = ()
    mac: str = "none"  # none | garbage | signed (a provisioned terminal's real MAC)
    raw: bytes | None = None


def fuzz_message(case: FuzzCase, keyring: Keyring | None) -> bytes:
    """The bytes sent for a case."""
    if case.raw is not None:
        return case.raw
    request_type = FUZZ_METHODS[case.method][0]
    request = request_type()
    for name, value in case.terminal:
        setattr(request.terminal, name, value)
    for name, value in case.fields:
        setattr(request, name, value)
    if case.mac == "signed" and keyring is not None:
        request.terminal.terminal_id = FUZZ_TERMINAL
        keyring.sign(FUZZ_TERMINAL, request)
    data: bytes = request.SerializeToString()
    return data


def fuzz_cases(victim_card: str, victim_ssn: str) -> SearchStrategy[FuzzCase]:
    """Malformed and hostile POS requests (hypothesis). Unsigned cases may name the
    victim's card and social security number; signed cases never do (a signed,
    well-formed request for a real card may legitimately change its state)."""
    from hypothesis import strategies as st

    int64 = st.integers(-(2**63), 2**63 - 1)
    uint64 = st.integers(0, 2**64 - 1)
    uint32 = st.integers(0, 2**32 - 1)
    amounts = st.one_of(int64, st.integers(-10, 10), st.sampled_from([10_000_000, 10_000_001]))
    junk = st.one_of(
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
    victim = st.sampled_from([victim_card, victim_ssn])
    terminals = st.fixed_dictionaries(
        {},
        optional={
            "terminal_id": st.one_of(junk, st.just(FUZZ_TERMINAL)),
            "institution_id": st.one_of(junk, st.sampled_from(["310101H00001", "310101P00001"])),
            "trace_number": uint64,
            "institution_type": st.integers(0, 2**31 - 1),
        },
    )

    def method_fields(method: str, card: Any, ssn: Any) -> SearchStrategy[dict[str, Any]]:
        common: dict[str, Any] = {"card_no": card, "ssn": ssn}
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

    def structured(signed: bool) -> SearchStrategy[FuzzCase]:
        ident = junk if signed else st.one_of(junk, victim)

        def build(method: str) -> SearchStrategy[FuzzCase]:
            return st.builds(
                lambda f, t, mac: FuzzCase(
                    method, tuple(sorted(f.items())), tuple(sorted(t.items())), mac
                ),
                method_fields(method, ident, ident),
                terminals,
                st.just("signed") if signed else st.sampled_from(["none", "garbage"]),
            ).map(lambda c: _with_garbage_mac(c))

        return st.sampled_from(sorted(FUZZ_METHODS)).flatmap(build)

    raw = st.builds(
        lambda m, b: FuzzCase(m, raw=b),
        st.sampled_from(sorted(FUZZ_METHODS)),
        st.one_of(st.binary(max_size=200), st.binary(min_size=2000, max_size=20_000)),
    )
    return st.one_of(structured(False), structured(True), raw)


def _with_garbage_mac(case: FuzzCase) -> FuzzCase:
    if case.mac != "garbage":
        return case
    return FuzzCase(case.method, (*case.fields, ("mac", b"\x5a" * 16)), case.terminal, "none")


@dataclass(frozen=True)
class FuzzAnswer:
    status: grpc.StatusCode
    details: str
    result: int | None  # the reply's ResultCode number; None without a reply


def fuzz_problem(case: FuzzCase, answer: FuzzAnswer) -> str | None:
    """Why an answer is not acceptable, or None (pure)."""
    if answer.status not in ACCEPTED_STATUS:
        undecodable = case.raw is not None or DESERIALIZE_FAILURE in answer.details.lower()
        if answer.status == grpc.StatusCode.INTERNAL and undecodable:
            return None  # bytes that are no protobuf: grpc refuses them before medclear
        return f"gRPC {answer.status.name}: {answer.details}"
    if answer.status != grpc.StatusCode.OK:
        return None if answer.details else f"gRPC {answer.status.name} without details"
    if answer.result is None or answer.result == 0:
        return "reply without a result code (UNSPECIFIED)"
    try:
        code = ResultCode(answer.result)
    except ValueError:
        return f"reply with an unknown result code {answer.result}"
    if code in APPROVED:
        return f"a hostile request was approved ({code.name})"
    if code in UNDECIDED:
        return f"no clear answer ({code.name})"
    return None


class FuzzTarget:
    """Sends fuzz cases to a gateway over one synchronous channel."""

    def __init__(self, a: StackAccess) -> None:
        self.a = a
        self.channel = sync_channel(a.endpoints.gateway, Role.TERMINAL, a.pki_dir)
        self.results: Counter[str] = Counter()

    def close(self) -> None:
        self.channel.close()

    def send(self, case: FuzzCase) -> FuzzAnswer:
        _request_type, reply_type = FUZZ_METHODS[case.method]
        call = self.channel.unary_unary(f"/medclear.v1.PosService/{case.method}")
        try:
            data = call(fuzz_message(case, self.a.keyring), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            self.results[f"gRPC {exc.code().name}"] += 1
            return FuzzAnswer(exc.code(), exc.details() or "", None)
        reply = reply_type.FromString(data)
        name = ResultCode(reply.result).name if reply.result in _CODES else str(reply.result)
        self.results[name] += 1
        return FuzzAnswer(grpc.StatusCode.OK, "", int(reply.result))

    def check(self, case: FuzzCase) -> None:
        problem = fuzz_problem(case, self.send(case))
        if problem is not None:
            raise AssertionError(f"{problem}\ncase: {case!r}")


_CODES = frozenset(int(c) for c in ResultCode)


@dataclass(frozen=True)
class Snapshot:
    balance_fen: int
    version: int
    swipes_approved: int  # SwipeApproved events on the events topic


def snapshot(a: StackAccess, victim_ssn: str) -> Snapshot:
    from clearing import codec
    from clearing.model import SwipeApproved
    from medclear.cli.recon import _read_topic
    from medclear.infra import topics

    view = asyncio.run(person_views(a, [victim_ssn]))[victim_ssn]
    approvals = 0
    for _key, raw in asyncio.run(_read_topic(a.endpoints.kafka_bootstrap, topics.EVENTS.name)):
        with contextlib.suppress(codec.CodecError):
            if raw is not None and isinstance(codec.decode(raw), SwipeApproved):
                approvals += 1
    return Snapshot(view.balance_fen, view.state.version, approvals)


def fuzz_victim(a: StackAccess) -> Resident:
    """A seeded person the fuzz run must leave untouched (terminal keys provisioned)."""
    from medclear.infra.terminals import SEED_WINDOW

    if a.keyring is not None:
        asyncio.run(a.keyring.provision(a.endpoints.hsm, [SEED_WINDOW, FUZZ_TERMINAL], a.pki_dir))
    base = random.SystemRandom().randrange(PERSON_SPACE // 1000 - 1) * 1000
    victim = drill_persons(1, base)[0]
    asyncio.run(_seed_and_read(a, [victim]))
    return victim


def gateway_healthy(a: StackAccess) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with sync_channel(a.endpoints.gateway, Role.TERMINAL, a.pki_dir) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="medclear.v1.PosService"), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def run_fuzz(a: StackAccess, examples: int, out: Console) -> bool:
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings

    victim = fuzz_victim(a)
    before = snapshot(a, victim.ssn)
    target = FuzzTarget(a)
    started = time.monotonic()
    failure = ""

    @hsettings(max_examples=examples, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))  # fmt: skip
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


# ---------------------------------------------------------------------------- commands

FreshOpt = Annotated[
    bool, typer.Option(help="start a stack of its own in a temporary state directory")
]
SecurityOpt = Annotated[
    bool,
    typer.Option(help="with --fresh: TLS and terminal security (MAC, PIN via the HSM)"),
]
RateOpt = Annotated[float, typer.Option(min=1, max=2000, help="swipes per second")]
PersonsOpt = Annotated[int, typer.Option(min=10, help="persons seeded per drill (at least)")]


def _finish(results: Sequence[DrillResult]) -> None:
    console.print(results_table(results))
    for r in results:
        for note in r.notes:
            console.print(f"[dim]{r.name}: {escape(note)}[/]")
    if not all(r.ok for r in results):
        raise typer.Exit(code=1)


def _drills(names: Sequence[str], fresh: bool, security: bool, rate: float, persons: int,
            times: int = 2, seconds: float = 10.0, freeze: bool = False,
            ch_seconds: float | None = None) -> None:  # fmt: skip
    specs = [spec(n, times, ch_seconds if n == "clickhouse-outage" and ch_seconds else seconds,
                  freeze) for n in names]  # fmt: skip
    try:
        with target_stack(fresh, security, console) as a:
            results = run_specs(a, specs, rate, persons, console)
    except (DrillError, stack.StackError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(code=1) from exc
    _finish(results)


@drill_app.command("worker-kill")
def worker_kill_cmd(
    times: Annotated[int, typer.Option(min=1, max=50, help="kills, one after another")] = 3,
    fresh: FreshOpt = False, security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT, persons: PersonsOpt = PERSONS_MIN,
) -> None:  # fmt: skip
    """kill -9 a clearing worker (PID from stack.json) and restart it, --times over."""
    _drills(["worker-kill"], fresh, security, rate, persons, times=times)


@drill_app.command("kill-loop")
def kill_loop_cmd(
    times: Annotated[int, typer.Option(min=1, max=100, help="rounds: each component once")] = 20,
    fresh: FreshOpt = False, security: SecurityOpt = True,
    rate: RateOpt = 20.0, persons: PersonsOpt = PERSONS_MIN,
) -> None:  # fmt: skip
    """The loop benchmark (make bench): kill -9 the clearing worker, the sms job and the
    settlement job in turn under traffic, --times rounds, restarting each; then the drill's
    checks: no approval lost, no debit doubled, no SMS doubled, conservation."""
    _drills(["kill-loop"], fresh, security, rate, persons, times=times)


@drill_app.command("broker-restart")
def broker_restart_cmd(
    fresh: FreshOpt = False, security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT, persons: PersonsOpt = PERSONS_MIN,
) -> None:  # fmt: skip
    """Restart the broker under traffic: stop it as `medclear down` does (noida-db: its stop
    command, then SIGTERM; it loses acknowledged writes on a kill -9 or a bare SIGTERM, see
    docs/ARCHITECTURE.md decision 9), then start it."""
    _drills(["broker-restart"], fresh, security, rate, persons)


@drill_app.command("clickhouse-outage")
def clickhouse_outage_cmd(
    seconds: Annotated[float, typer.Option(min=1, help="how long ClickHouse is down")] = 120.0,
    freeze: Annotated[bool, typer.Option(help="SIGSTOP/SIGCONT instead of stop/start")] = False,
    fresh: FreshOpt = False, security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT, persons: PersonsOpt = PERSONS_MIN,
) -> None:  # fmt: skip
    """Stop ClickHouse for --seconds under traffic, then start it again."""
    _drills(["clickhouse-outage"], fresh, security, rate, persons, seconds=seconds,
            freeze=freeze)  # fmt: skip


@drill_app.command("smsc-outage")
def smsc_outage_cmd(
    seconds: Annotated[float, typer.Option(min=1, help="how long the SMSC is down")] = 20.0,
    fresh: FreshOpt = False, security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT, persons: PersonsOpt = PERSONS_MIN,
) -> None:  # fmt: skip
    """Stop the SMSC for --seconds under traffic, then start it again."""
    _drills(["smsc-outage"], fresh, security, rate, persons, seconds=seconds)


@drill_app.command("hsm-outage")
def hsm_outage_cmd(
    seconds: Annotated[float, typer.Option(min=1, help="how long the HSM is down")] = 20.0,
    freeze: Annotated[bool, typer.Option(help="SIGSTOP/SIGCONT instead of stop/start")] = False,
    fresh: FreshOpt = False, security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT, persons: PersonsOpt = PERSONS_MIN,
) -> None:  # fmt: skip
    """Stop (or freeze) the HSM for --seconds under traffic (needs terminal security)."""
    _drills(["hsm-outage"], fresh, security, rate, persons, seconds=seconds, freeze=freeze)


@drill_app.command("all")
def all_cmd(
    times: Annotated[int, typer.Option(min=1, max=50, help="worker kills")] = 3,
    seconds: Annotated[float, typer.Option(min=1, help="SMSC and HSM outages")] = 20.0,
    clickhouse_seconds: Annotated[float, typer.Option(min=1, help="ClickHouse outage")] = 120.0,
    fresh: FreshOpt = False, security: SecurityOpt = True,
    rate: RateOpt = RATE_PER_S_DEFAULT, persons: PersonsOpt = PERSONS_MIN,
) -> None:  # fmt: skip
    """Every drill, one after another, on one stack; one table at the end."""
    _drills(DRILLS, fresh, security, rate, persons, times=times, seconds=seconds,
            ch_seconds=clickhouse_seconds)  # fmt: skip


@drill_app.command("fuzz")
def fuzz_cmd(
    examples: Annotated[int, typer.Option(min=1, max=1_000_000, help="requests")] = 2000,
    fresh: FreshOpt = False, security: SecurityOpt = True,
) -> None:  # fmt: skip
    """Malformed and hostile requests (hypothesis) against the gateway: no crash, a clear
    result code for every one, a seeded person's state and the approvals unchanged."""
    try:
        with target_stack(fresh, security, console) as a:
            ok = run_fuzz(a, examples, console)
    except (DrillError, stack.StackError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(code=1) from exc
    if not ok:
        raise typer.Exit(code=1)
