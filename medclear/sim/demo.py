"""The demo's traffic: a day at the counters of a city, compressed into a few minutes.

Many terminals at pharmacies and hospitals swipe seeded cards (some with a wrong PIN);
now and then a terminal reverses or refunds one of its approved swipes; service windows
take loss reports (a thief then tries the card at other counters: declined, flagged,
one SMS), release some of them, and leave others to lapse through the pre-loss timer
(the demo district's pre-loss lives 90 seconds); a regular customer keeps buying at
pharmacies until the daily pharmacy limit refuses. A live panel shows swipes/s, p99,
declines by code and SMS sent. Everything the terminals were told is kept, so at the
end each institution's own totals file (what its POS saw) is written and imported, and
the day is reconciled against medclear's settlement and the ClickHouse log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.table import Table

from clearing.codes import InstitutionType, ResultCode
from clearing.limits import SHANGHAI_UTC_OFFSET_MS
from clearing.model import Institution
from clearing.money import format_yuan
from medclear.infra.pki import Role
from medclear.infra.progress import PLAIN_LINE_EVERY_S
from medclear.infra.rpc import CALL_TIMEOUT_S, aio_channel
from medclear.infra.terminals import Keyring
from medclear.sim import traffic
from medclear.sim.city import Resident
from medclear.sim.traffic import Swipe, authorize_request
from medclear.v1 import common_pb2, pos_pb2, pos_pb2_grpc, registry_pb2, registry_pb2_grpc

DEMO_DISTRICT = "310115"  # pre-loss lifetime 90 s in medclear/data/pre_loss_policy_demo.csv
REVERSAL_RATE = 0.02
REFUND_RATE = 0.02
LOSS_EVERY_S = 8.0  # a window takes a loss report this often
THIEF_ATTEMPTS = 3  # swipes tried on a reported card, at different terminals
RELEASE_SHARE = 0.5  # reports released at the window; the rest lapse or stay
WRONG_PIN_RATE = 0.02
DISTRICT_EVERY = 100  # one resident in this many lives in the demo district …
DISTRICT_INDEX = 7  # … the one at this index modulo DISTRICT_EVERY
OPEN_AFTER_PAYERS = 200  # the counters open once this many residents can pay
ENROL_CONCURRENCY = 64  # enrolments in flight while the counters serve
PANEL_REFRESH_S = 1.0
SWIPE_MIN_FEN, SWIPE_MAX_FEN = 5_00, 120_00
THIEF_MIN_FEN, THIEF_MAX_FEN = 50_00, 300_00
REGULAR_FEN = 2_00  # the regular customer's purchase, until the pharmacy limit
RELEASE_AFTER_S = 2.0
PROMETHEUS_TIMEOUT_S = 2.0
RECENT_SALES = 2_000  # a reversal or refund picks among this many latest sales
TRACE_BASE_SPAN, TRACE_BASE_STEP = 100_000, 1_000  # trace numbers start from the clock
APPROVED = (ResultCode.OK, ResultCode.PARTIALLY_APPROVED)


@dataclass
class Sale:
    """An approved swipe as the terminal saw it (for reversals, refunds, its own file)."""

    terminal_id: str
    trace: int
    card_no: str
    institution_id: str
    amount_fen: int
    account_fen: int
    day: str
    refunded_fen: int = 0
    refund_trace: int = 0
    reversed: bool = False


@dataclass
class CityPool:
    """The residents enrolled so far: the counters serve only them, while the rest of the
    city is still being enrolled (the demo opens its counters within seconds)."""

    total: int
    payers: list[Resident] = field(default_factory=list)  # an opening balance to pay from
    district: list[Resident] = field(default_factory=list)  # the demo district's (90 s pre-loss)
    members: list[Resident] = field(default_factory=list)  # every one enrolled

    @property
    def enrolled(self) -> int:
        return len(self.members)

    def add(self, index: int, resident: Resident) -> None:
        self.members.append(resident)
        if resident.opening_balance_fen > 0:
            self.payers.append(resident)
        if index % DISTRICT_EVERY == DISTRICT_INDEX:
            self.district.append(resident)


@dataclass
class DemoStats:
    started: float = field(default_factory=time.perf_counter)
    results: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20_000))
    latencies_ms: list[float] = field(default_factory=list)
    sales: list[Sale] = field(default_factory=list)
    sms_sent: float = 0.0
    alerts: float = 0.0
    pool: CityPool | None = None  # the city being enrolled meanwhile
    first_answer_at: float | None = None  # perf_counter of the first swipe's answer
    last_line_at: float = 0.0

    def swipe_done(self, latency_ms: float, result: str) -> None:
        now = time.perf_counter()
        if self.first_answer_at is None:
            self.first_answer_at = now
        self.results[result] += 1
        self.latencies_ms.append(latency_ms)
        self.recent.append((now, latency_ms))

    def window_figures(self, seconds: float = 10.0) -> tuple[float, float]:
        """Swipes/s and p99 over the last `seconds`."""
        now = time.perf_counter()
        last = [ms for at, ms in self.recent if at >= now - seconds]
        if not last:
            return 0.0, 0.0
        ordered = sorted(last)
        span = min(seconds, now - self.started) or 1.0
        return len(last) / span, ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def line(stats: DemoStats) -> str:
    """The panel in one line, for a log (output that is not a terminal)."""
    rate, p99 = stats.window_figures()
    swipes = sum(stats.results.values())
    approved = sum(stats.results[c.name] for c in APPROVED)
    pool = stats.pool
    enrolled = f"; enrolled {pool.enrolled:,}/{pool.total:,}" if pool is not None else ""
    return (
        f"demo: {swipes:,} swipes ({approved:,} approved), {rate:,.0f}/s, p99 {p99:,.1f} ms, "
        f"SMS {stats.sms_sent:,.0f}, alerts {stats.alerts:,.0f}{enrolled}"
    )


def show(live: Live, stats: DemoStats, minutes: float) -> None:
    """Refresh the live panel; when the output is not a terminal, a line every few
    seconds instead (the panel itself would only be printed at the end)."""
    live.update(panel(stats, minutes))
    now = time.perf_counter()
    if not live.console.is_terminal and now - stats.last_line_at >= PLAIN_LINE_EVERY_S:
        stats.last_line_at = now
        live.console.print(line(stats), highlight=False, soft_wrap=True)


def panel(stats: DemoStats, minutes: float) -> Group:
    rate, p99 = stats.window_figures()
    elapsed = time.perf_counter() - stats.started
    swipes = sum(stats.results.values())
    approved = sum(stats.results[c.name] for c in APPROVED)
    head = Table(
        title=f"medclear demo — {elapsed:,.0f} s of {minutes * 60:,.0f} s", show_header=True
    )
    for column in (
        "swipes",
        "approved",
        "declined",
        "swipes/s (10 s)",
        "p99 ms (10 s)",
        "reversals",
        "refunds",
        "loss reports",
        "releases",
        "SMS sent",
        "alerts",
    ):
        head.add_column(column, justify="right")
    head.add_row(
        f"{swipes:,}",
        f"{approved:,}",
        f"{swipes - approved:,}",
        f"{rate:,.0f}",
        f"{p99:,.1f}",
        f"{stats.ops['reverse']:,}",
        f"{stats.ops['refund']:,}",
        f"{stats.ops['loss_report']:,}",
        f"{stats.ops['release']:,}",
        f"{stats.sms_sent:,.0f}",
        f"{stats.alerts:,.0f}",
    )
    pool = stats.pool
    if pool is not None and pool.enrolled < pool.total:
        head.caption = (
            f"enrolling the city meanwhile: {pool.enrolled:,} of {pool.total:,} "
            "persons; the counters serve those enrolled"
        )
    codes = Table(title="declines by code")
    codes.add_column("result")
    codes.add_column("swipes", justify="right")
    for code, n in stats.results.most_common():
        if code not in (c.name for c in APPROVED):
            codes.add_row(code, f"{n:,}")
    return Group(head, codes)


def prometheus_sum(url: str, metric: str) -> float:
    query = urllib.parse.urlencode({"query": f"sum({metric})"})
    try:
        with urllib.request.urlopen(
            f"{url}/api/v1/query?{query}", timeout=PROMETHEUS_TIMEOUT_S
        ) as answer:
            result = json.load(answer)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0
    except (OSError, ValueError, KeyError, IndexError):
        return 0.0


class Counters:
    """Trace numbers per terminal, as a POS keeps them (never reused in a run)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.next: dict[str, int] = {}

    def take(self, terminal: str) -> int:
        n = self.next.get(terminal, self.base)
        self.next[terminal] = n + 1
        return n


class _Day:
    """The demo's actors, each an asyncio task until the deadline: counters (swipes, now
    and then a reversal or a refund), a service window taking loss reports, the regular
    customer who reaches the pharmacy limit, and the live panel."""

    def __init__(
        self,
        pos: pos_pb2_grpc.PosServiceStub,
        window: registry_pb2_grpc.CardRegistryServiceStub,
        pool: CityPool,
        institutions: list[Institution],
        keyring: Keyring | None,
        stats: DemoStats,
        deadline: float,
        seed: int,
    ) -> None:
        self.pos, self.window, self.keyring, self.stats = pos, window, keyring, stats
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.traces = Counters(int(time.time()) % TRACE_BASE_SPAN * TRACE_BASE_STEP)
        self.institutions = institutions
        self.payers = pool.payers  # grows while the city is enrolled
        self.district = pool.district
        self.pharmacies = [i for i in institutions if i.type == InstitutionType.PHARMACY]
        self.today = time.strftime(
            "%Y-%m-%d", time.gmtime(time.time() + SHANGHAI_UTC_OFFSET_MS / 1000)
        )

    def open(self) -> bool:
        return time.perf_counter() < self.deadline

    def sign(self, terminal: str, request: object) -> object:
        return self.keyring.sign(terminal, request) if self.keyring else request

    async def swipe(self, r: Resident, inst: Institution, amount: int, pin: str) -> str:
        """One swipe at the institution's terminal; returns the result code's name."""
        terminal = f"T{inst.institution_id}"
        trace = self.traces.take(terminal)
        s = Swipe(r.card_no, inst, terminal, trace, amount, pin)
        started = time.perf_counter()
        try:
            reply = await self.pos.Authorize(
                authorize_request(s, self.keyring), timeout=CALL_TIMEOUT_S
            )
            code = ResultCode(reply.result)
        except Exception:  # the deadline passed: a real POS would reverse
            self.stats.swipe_done((time.perf_counter() - started) * 1000, "RPC_ERROR")
            return "RPC_ERROR"
        self.stats.swipe_done((time.perf_counter() - started) * 1000, code.name)
        if code in APPROVED:
            self.stats.sales.append(
                Sale(
                    terminal,
                    trace,
                    r.card_no,
                    inst.institution_id,
                    amount,
                    reply.paid_from_account_fen,
                    self.today,
                )
            )
        return code.name

    async def after_sale(self, kind: str) -> None:
        """A reversal or a half refund of a recent sale that stands."""
        stands = [
            s for s in self.stats.sales[-RECENT_SALES:] if not s.reversed and not s.refunded_fen
        ]
        if not stands:
            return
        sale = self.rng.choice(stands)
        terminal = sale.terminal_id
        context = common_pb2.TerminalContext(
            terminal_id=terminal,
            institution_id=sale.institution_id,
            trace_number=self.traces.take(terminal),
        )
        if kind == "reverse":
            reversal = pos_pb2.ReverseRequest(
                terminal=context,
                original_trace_number=sale.trace,
                card_no=sale.card_no,
                amount_fen=sale.amount_fen,
            )
            reply = await self.pos.Reverse(self.sign(terminal, reversal), timeout=CALL_TIMEOUT_S)
            sale.reversed = ResultCode(reply.result) == ResultCode.OK
        else:
            if not sale.account_fen:
                return
            part = max(1, sale.account_fen // 2)
            refund = pos_pb2.RefundRequest(
                terminal=context,
                original_trace_number=sale.trace,
                card_no=sale.card_no,
                amount_fen=part,
            )
            answer = await self.pos.Refund(self.sign(terminal, refund), timeout=CALL_TIMEOUT_S)
            if ResultCode(answer.result) == ResultCode.OK:
                sale.refunded_fen, sale.refund_trace = part, context.trace_number
        self.stats.ops[kind] += 1

    async def counter(self) -> None:
        """One counter: swipes by random payers, a few with a wrong PIN."""
        rng = self.rng
        while self.open():
            r = rng.choice(self.payers)
            roll = rng.random()
            if roll < REVERSAL_RATE:
                await self.after_sale("reverse")
            elif roll < REVERSAL_RATE + REFUND_RATE:
                await self.after_sale("refund")
            else:
                wrong = rng.random() < WRONG_PIN_RATE
                pin = f"{(int(r.pin) + 1) % 10**6:06d}" if wrong else r.pin
                await self.swipe(
                    r, rng.choice(self.institutions), rng.randint(SWIPE_MIN_FEN, SWIPE_MAX_FEN), pin
                )

    def _window(self, tag: str, card_no: str) -> registry_pb2.CardRequest:
        context = common_pb2.WindowContext(
            window_id="DEMO-W1", operator_id="demo", request_id=f"demo-{tag}-{time.time_ns()}"
        )
        return registry_pb2.CardRequest(window=context, card_no=card_no)

    async def losses(self) -> None:
        """Loss reports at the window; the thief tries each reported card; some reports
        are released, the demo district's lapse."""
        rng = self.rng
        while time.perf_counter() < self.deadline - LOSS_EVERY_S:
            await asyncio.sleep(LOSS_EVERY_S)
            district = self.district if self.district and rng.random() < 0.5 else None
            victim = rng.choice(district or self.payers)
            report = await self.window.ReportPreLoss(
                self._window("loss", victim.card_no), timeout=CALL_TIMEOUT_S
            )
            if ResultCode(report.result) != ResultCode.OK:
                continue
            self.stats.ops["loss_report"] += 1
            for inst in rng.sample(self.institutions, THIEF_ATTEMPTS):
                await self.swipe(victim, inst, rng.randint(THIEF_MIN_FEN, THIEF_MAX_FEN), "000000")
            if victim not in self.district and rng.random() < RELEASE_SHARE:
                await asyncio.sleep(RELEASE_AFTER_S)
                await self.window.ReleaseLoss(
                    self._window("release", victim.card_no), timeout=CALL_TIMEOUT_S
                )
                self.stats.ops["release"] += 1

    async def regular(self) -> None:
        """One customer buying at pharmacies until the daily limit says no."""
        r = self.payers[0]
        while self.open():
            result = await self.swipe(r, self.rng.choice(self.pharmacies), REGULAR_FEN, r.pin)
            if result == ResultCode.DAILY_PHARMACY_LIMIT_REACHED.name:
                self.stats.ops["limit_reached"] += 1
                return
            await asyncio.sleep(1)


async def run(
    gateway: str,
    registry: str,
    prometheus: str,
    residents: list[Resident],
    institutions: list[Institution],
    minutes: float,
    concurrency: int,
    keyring: Keyring | None,
    pki_dir: Path | None,
    live: Live,
    stats: DemoStats,
    seed: int = 2026,
) -> None:
    """The demo's day: the city is enrolled through the registry while the counters serve
    whoever is enrolled already. They open once OPEN_AFTER_PAYERS residents can pay, and
    stay open `minutes`, `concurrency` at once; the panel is refreshed every second (SMS
    and alerts read from Prometheus). Enrolment stops with the day (what is left is
    enrolled by `medclear seed` later: enrolling is idempotent)."""
    pool = stats.pool = CityPool(len(residents))
    index = {r.ssn: i for i, r in enumerate(residents)}
    enrolling = asyncio.create_task(
        traffic.seed(
            registry,
            residents,
            ENROL_CONCURRENCY,
            lambda r: pool.add(index[r.ssn], r),
            keyring,
            pki_dir,
            lambda i: (
                DEMO_DISTRICT if i % DISTRICT_EVERY == DISTRICT_INDEX else traffic.DEFAULT_REGION
            ),
        )
    )
    while len(pool.payers) < min(OPEN_AFTER_PAYERS, len(residents)) and not enrolling.done():
        show(live, stats, minutes)
        await asyncio.sleep(PANEL_REFRESH_S)
    if enrolling.done():
        enrolling.result()  # the enrolment's error, if it failed
    stats.started = time.perf_counter()
    deadline = stats.started + minutes * 60
    try:
        await _open_counters(
            gateway,
            registry,
            prometheus,
            pool,
            institutions,
            minutes,
            concurrency,
            keyring,
            pki_dir,
            live,
            stats,
            deadline,
            seed,
        )
    finally:
        enrolling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await enrolling
    live.update(panel(stats, minutes))


async def _open_counters(
    gateway: str,
    registry: str,
    prometheus: str,
    pool: CityPool,
    institutions: list[Institution],
    minutes: float,
    concurrency: int,
    keyring: Keyring | None,
    pki_dir: Path | None,
    live: Live,
    stats: DemoStats,
    deadline: float,
    seed: int,
) -> None:
    async def display() -> None:
        while time.perf_counter() < deadline:
            stats.sms_sent = prometheus_sum(prometheus, "medclear_sms_sent_total")
            stats.alerts = prometheus_sum(prometheus, "medclear_abnormal_alerts_total")
            show(live, stats, minutes)
            await asyncio.sleep(PANEL_REFRESH_S)

    async with (
        aio_channel(gateway, Role.TERMINAL, pki_dir) as pos_channel,
        aio_channel(registry, Role.WINDOW, pki_dir) as window_channel,
    ):
        day = _Day(
            pos_pb2_grpc.PosServiceStub(pos_channel),
            registry_pb2_grpc.CardRegistryServiceStub(window_channel),
            pool,
            institutions,
            keyring,
            stats,
            deadline,
            seed,
        )
        await asyncio.gather(
            *(day.counter() for _ in range(concurrency)), day.losses(), day.regular(), display()
        )


def institution_files(stats: DemoStats, directory: Path) -> list[tuple[Path, Path]]:
    """What each institution's POS saw today, as its totals and detail files (对总账)."""
    directory.mkdir(parents=True, exist_ok=True)
    by_inst: dict[str, list[Sale]] = {}
    for sale in stats.sales:
        if not sale.reversed:
            by_inst.setdefault(sale.institution_id, []).append(sale)
    files: list[tuple[Path, Path]] = []
    for inst, sales in sorted(by_inst.items()):
        day = sales[0].day
        count = len(sales) + sum(1 for s in sales if s.refunded_fen)
        total = sum(s.amount_fen - s.refunded_fen for s in sales)
        account = sum(s.account_fen - s.refunded_fen for s in sales)
        totals = directory / f"{inst}-{day}-totals.csv"
        totals.write_text(
            "institution_id,day,count,total_amount,account_amount\n"
            f"{inst},{day},{count},{format_yuan(total)},{format_yuan(account)}\n"
        )
        lines = ["institution_id,day,request_id,kind,amount,account_amount"]
        for s in sales:
            lines.append(
                f"{inst},{day},{s.terminal_id}:{s.trace},swipe,"
                f"{format_yuan(s.amount_fen)},{format_yuan(s.account_fen)}"
            )
            if s.refunded_fen:
                lines.append(
                    f"{inst},{day},{s.terminal_id}:{s.refund_trace},refund,"
                    f"{format_yuan(s.refunded_fen)},{format_yuan(s.refunded_fen)}"
                )
        detail = directory / f"{inst}-{day}-detail.csv"
        detail.write_text("\n".join(lines) + "\n")
        files.append((totals, detail))
    return files
