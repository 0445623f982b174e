"""`medclear card-emulator ...` (virtual 社保卡 on a vpcd reader) and `medclear agent ...`
(the POS reader agent: swipe, balance, refund, reversals, reader events, benchmark).

A POS PC runs the agent alone as `python -m medclear.cli.agent ...`: this module loads the
reader agent, the simulated terminal keys and gRPC, and no Kafka client nor stream
runtime (tests/unit/test_layout.py checks it)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from clearing.codes import InstitutionType, ResultCode
from clearing.money import format_yuan, parse_yuan
from clearing.validate import mask_card
from medclear.cli.support import fail
from medclear.cli.tables import result_codes_table
from medclear.infra import status
from medclear.infra.exits import Exit
from medclear.infra.pki import Role
from medclear.infra.policy import load_institutions
from medclear.infra.rpc import sync_channel
from medclear.infra.settings import Settings, get_settings, keyring_file
from medclear.infra.stack_state import StackError, client_pki_dir, load_endpoints
from medclear.infra.terminals import Keyring
from medclear.sim import city, traffic
from medclear.v1 import pos_pb2_grpc
from reader_agent.agent import Agent, Terminal
from reader_agent.card import CardImage
from reader_agent.emulator import VirtualCard
from reader_agent.events import ReaderEvents
from reader_agent.journal import Journal
from reader_agent.pcscd import PcscdUnavailable, PrivatePcscd
from reader_agent.personalise import PersonalisationError, Personaliser, clone_of
from reader_agent.pinpad import ConsolePinPad, PinEntryCancelled, PinPad, ScriptedPinPad
from reader_agent.reader import CardError, PcscReader, reader_names

emulator_app = typer.Typer(
    help="A virtual 社保卡 in a vpcd reader of pcscd, personalised from the issuance data.",
    no_args_is_help=True,
)
agent_app = typer.Typer(
    help="The POS reader agent: the card through PC/SC, the PIN on the pad, then medclear.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)


# ---------------------------------------------------------------------------- stack access


@dataclass(frozen=True)
class StackAccess:
    settings: Settings
    gateway: str
    registry: str
    hsm: str
    pki: Path | None
    terminal_security: bool

    @property
    def cards_dir(self) -> Path:
        return self.settings.state_dir / "cards"

    def journal_path(self, terminal_id: str) -> Path:
        return self.settings.state_dir / "terminals" / f"{terminal_id}.journal"


def stack_access(settings: Settings | None = None) -> StackAccess:

    settings = settings or get_settings()
    try:
        e = load_endpoints(settings)
    except StackError as exc:
        raise fail(str(exc)) from exc
    pki = client_pki_dir(settings)
    return StackAccess(settings, e.gateway, e.registry, e.hsm, pki, e.terminal_security)


def keyring_for(access: StackAccess, terminals: Sequence[str]) -> Keyring | None:
    """The simulated terminals' keys (provisioned on first use); None: security off."""
    if not access.terminal_security:
        return None
    keyring = Keyring(keyring_file(access.settings))
    asyncio.run(keyring.provision(access.hsm, list(terminals), access.pki))
    return keyring


def institution_type(institution_id: str, settings: Settings) -> InstitutionType:

    found = load_institutions(settings.institutions_file).get(institution_id)
    return found.type if found is not None else InstitutionType.PHARMACY


@contextlib.contextmanager
def pos_stub(access: StackAccess) -> Iterator[object]:

    channel = sync_channel(access.gateway, Role.TERMINAL, access.pki)
    try:
        yield pos_pb2_grpc.PosServiceStub(channel)
    finally:
        channel.close()


def personalised(access: StackAccess, ssn: str, card_no: str, fresh: bool = False) -> CardImage:
    """The card's image from disk, or personalised now from the issuance data."""
    perso = Personaliser(access.hsm, access.registry, access.pki, access.cards_dir)
    path = perso.image_path(card_no)
    if path.exists() and not fresh:
        return CardImage.load(path)
    try:
        return asyncio.run(perso.personalise(ssn, card_no))
    except PersonalisationError as exc:
        raise fail(f"personalising {mask_card(card_no)}: {exc}") from exc
    except grpc.RpcError as exc:
        raise fail(f"personalising {mask_card(card_no)}: {status.describe(exc)}") from exc


def ssn_of_city_card(card_no: str, persons: int, seed: int) -> str:

    for r in city.residents(persons, seed):
        if r.card_no == card_no:
            return r.ssn
    raise fail(
        f"card {mask_card(card_no)} is not in the seeded city ({persons} persons, "
        f"seed {seed}); pass --ssn"
    )


# ---------------------------------------------------------------------------- emulator

CardOpt = Annotated[str, typer.Option(help="card number (as issued)")]
SsnOpt = Annotated[str, typer.Option(help="holder's social security number; else the city")]
PersonsOpt = Annotated[int, typer.Option(help="the seeded city's size (see `seed`)")]
SeedOpt = Annotated[int, typer.Option(help="the seeded city's seed")]


@emulator_app.command("personalise")
def emulator_personalise(
    card: CardOpt, ssn: SsnOpt = "", persons: PersonsOpt = 1000, seed: SeedOpt = 2026
) -> None:
    """Personalise a virtual card from the registry's issuance record and the HSM's card
    key (written to <state>/cards/<card>.json, owner-only)."""
    access = stack_access()
    image = personalised(access, ssn or ssn_of_city_card(card, persons, seed), card, fresh=True)
    console.print(f"personalised {mask_card(image.card_no)} (issued {image.issue_date})")


@emulator_app.command("run")
def emulator_run(
    card: CardOpt,
    ssn: SsnOpt = "",
    persons: PersonsOpt = 1000,
    seed: SeedOpt = 2026,
    host: Annotated[str, typer.Option(help="where pcscd's vpcd listens")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="vpcd port: 35963 reader 00 00, 35964 00 01")] = 35963,
    clone: Annotated[bool, typer.Option(help="a clone: same EF05/EF06, wrong key")] = False,
) -> None:
    """Insert the virtual card into a vpcd reader and serve it until Ctrl-C (the card's
    counter is saved on exit)."""
    access = stack_access()
    image = personalised(access, ssn or ssn_of_city_card(card, persons, seed), card)
    if clone:
        image = clone_of(image)
    path = Personaliser(access.hsm, access.registry, access.pki, access.cards_dir).image_path(card)
    virtual = VirtualCard(image, host, port)
    try:
        virtual.insert()
    except ConnectionError as exc:
        raise fail(str(exc)) from exc
    console.print(f"card {mask_card(card)} in the reader on {host}:{port}; Ctrl-C to pull it out")
    try:
        while virtual.inserted:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        virtual.remove()
        if not clone:
            virtual.image.save(path)
    console.print("card removed")


# ---------------------------------------------------------------------------- agent

ReaderOpt = Annotated[str, typer.Option(help="PC/SC reader name (see `medclear agent readers`)")]
TerminalOpt = Annotated[str, typer.Option(help="terminal id")]
InstitutionOpt = Annotated[str, typer.Option(help="designated institution id")]


def make_agent(
    access: StackAccess, reader: str, terminal: str, institution: str, pinpad: PinPad, stub: object
) -> Agent:
    keyring = keyring_for(access, [terminal])
    return Agent(
        Terminal(terminal, institution, institution_type(institution, access.settings)),
        PcscReader(reader),
        pinpad,
        Journal(access.journal_path(terminal)),
        stub,
        keyring,
        console=console,
    )


def agent_swipe(
    reader: str,
    amount_fen: int,
    institution: str,
    terminal: str,
    pin: str = "",
    partial: bool = False,
) -> None:
    """One swipe through the agent with the card in `reader` (also `pos swipe --reader`)."""
    access = stack_access()
    pinpad: PinPad = ScriptedPinPad([pin]) if pin else ConsolePinPad()
    with pos_stub(access) as stub:
        agent = make_agent(access, reader, terminal, institution, pinpad, stub)
        try:
            result = agent.swipe(amount_fen, partial)
        except (CardError, PinEntryCancelled) as exc:
            raise fail(str(exc)) from exc
        finally:
            agent.journal.close()
    if result.reversal is not None:
        state = "acknowledged" if result.reversal.acknowledged else "open (retried later)"
        console.print(f"reversal of trace {result.trace}: {state}")
    if not result.result.approved:
        raise typer.Exit(code=Exit.DECLINED)


@agent_app.command("swipe")
def swipe_cmd(
    reader: ReaderOpt,
    amount: Annotated[str, typer.Option(help="yuan, e.g. 12.50")],
    institution: InstitutionOpt,
    terminal: TerminalOpt,
    partial: Annotated[bool, typer.Option(help="pay what the account holds, rest cash")] = False,
) -> None:
    """Pay with the card in the reader: the PIN is asked for at the console (hidden)."""
    try:
        amount_fen = parse_yuan(amount)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    agent_swipe(reader, amount_fen, institution, terminal, partial=partial)


@agent_app.command("balance")
def balance_cmd(reader: ReaderOpt, institution: InstitutionOpt, terminal: TerminalOpt) -> None:
    """Balance enquiry with the card in the reader (PIN at the console)."""
    access = stack_access()
    with pos_stub(access) as stub:
        agent = make_agent(access, reader, terminal, institution, ConsolePinPad(), stub)
        try:
            card, reply = agent.balance()
        except (CardError, PinEntryCancelled) as exc:
            raise fail(str(exc)) from exc
    code = ResultCode(reply.result)
    if code != ResultCode.OK:
        raise fail(f"{code.name} ({int(code)}) {reply.message}")
    console.print(
        f"balance of {mask_card(card.card_no)}: [bold]{format_yuan(reply.balance_fen)}[/]"
    )


@agent_app.command("refund")
def refund_cmd(
    reader: ReaderOpt,
    original_trace: Annotated[int, typer.Option(help="trace number on the receipt")],
    amount: Annotated[str, typer.Option(help="yuan to return to the account")],
    institution: InstitutionOpt,
    terminal: TerminalOpt,
    original_terminal: Annotated[str, typer.Option(help="if another terminal took it")] = "",
) -> None:
    """Refund (退费) of a previous receipt to the card in the reader."""
    access = stack_access()
    try:
        amount_fen = parse_yuan(amount)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    with pos_stub(access) as stub:
        agent = make_agent(access, reader, terminal, institution, ScriptedPinPad([]), stub)
        try:
            card, reply = agent.refund(original_trace, amount_fen, original_terminal)
        except CardError as exc:
            raise fail(str(exc)) from exc
    code = ResultCode(reply.result)
    style = "green" if code == ResultCode.OK else "red"
    console.print(
        f"[{style}]refund {code.name} ({int(code)})[/] {reply.message}: "
        f"{format_yuan(reply.refunded_amount_fen)} to {mask_card(card.card_no)}, "
        f"balance {format_yuan(reply.balance_after_fen)}"
    )
    if code != ResultCode.OK:
        raise typer.Exit(code=Exit.DECLINED)


@agent_app.command("reversals")
def reversals_cmd(terminal: TerminalOpt, institution: InstitutionOpt) -> None:
    """Send every open reversal of this terminal's journal until acknowledged."""
    access = stack_access()
    with pos_stub(access) as stub:
        agent = make_agent(access, "", terminal, institution, ScriptedPinPad([]), stub)
        outcomes = agent.settle_reversals()
    for o in outcomes:
        state = "acknowledged" if o.acknowledged else "still open"
        console.print(f"trace {o.trace}: {o.result.name} — {state}")
    console.print(f"{len(agent.journal.open)} reversal(s) open")
    if agent.journal.open:
        raise typer.Exit(code=Exit.ERROR)


@agent_app.command("readers")
def readers_cmd() -> None:
    """List the PC/SC readers (PCSCLITE_CSOCK_NAME picks a non-default pcscd)."""
    try:
        names = reader_names()
    except CardError as exc:
        raise fail(str(exc)) from exc
    for name in names:
        console.print(name)


@agent_app.command("watch")
def watch_cmd(
    seconds: Annotated[float, typer.Option(help="how long to watch; 0: until Ctrl-C")] = 0,
) -> None:
    """Print reader events: card inserted or removed, reader added or unplugged."""
    events = ReaderEvents().start()
    deadline = time.monotonic() + seconds if seconds else float("inf")
    try:
        while time.monotonic() < deadline:
            try:
                e = events.events.get(timeout=0.5)
            except queue.Empty:
                continue
            console.print(f"{e.kind}: {e.reader} {e.atr}")
    except KeyboardInterrupt:
        pass
    finally:
        events.stop()


# ---------------------------------------------------------------------------- traffic, bench


@dataclass
class AgentStats:
    total_ms: list[float] = field(default_factory=list)
    card_ms: list[float] = field(default_factory=list)
    results: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    def percentile(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    @property
    def card_share(self) -> float:
        return sum(self.card_ms) / sum(self.total_ms) if self.total_ms else 0.0


def run_agent_traffic(
    access: StackAccess, persons: int, seed: int, count: int, label: str
) -> AgentStats:
    """The simulated day of swipes (medclear.sim.traffic.plan_swipes), each through the
    agent with the holder's virtual card in a reader of a private pcscd: card read,
    PIN pad, cryptogram, Authorize. Cards are personalised once (kept in <state>/cards)."""
    residents = {r.card_no: r for r in city.residents(persons, seed)}
    institutions = list(load_institutions(access.settings.institutions_file).values())
    plan = traffic.plan_swipes(
        list(residents.values()), institutions, count, seed, time.time_ns() // 1000
    )
    keyring = keyring_for(access, traffic.terminal_ids(plan))
    images: dict[str, CardImage] = {}
    for s in plan:
        if s.card_no not in images:
            images[s.card_no] = personalised(access, residents[s.card_no].ssn, s.card_no)
    stats = AgentStats()
    with tempfile.TemporaryDirectory(prefix="medclear-pcscd-") as base:
        try:
            daemon = PrivatePcscd(Path(base)).start()
        except PcscdUnavailable as exc:
            raise fail(f"pcscd: {exc}") from exc
        daemon.activate()
        virtual = VirtualCard(images[plan[0].card_no], port=daemon.port).insert()
        reader = PcscReader(daemon.readers[0])
        _wait_for_card(reader)
        journal = Journal(Path(base) / "agent.journal")
        started = time.perf_counter()
        try:
            with pos_stub(access) as stub, _progress(label, count) as advance:
                agents: dict[str, Agent] = {}
                for s in plan:
                    virtual.load(images[s.card_no])  # the next customer's card
                    inst = s.institution
                    agent = agents.get(s.terminal_id) or Agent(
                        Terminal(s.terminal_id, inst.institution_id, inst.type),
                        reader,
                        ScriptedPinPad([]),
                        journal,
                        stub,
                        keyring,
                    )
                    agents[s.terminal_id] = agent
                    agent.pinpad = ScriptedPinPad([s.pin])
                    result = agent.swipe(s.amount_fen)
                    stats.total_ms.append(result.total_seconds * 1000)
                    stats.card_ms.append(result.card_seconds * 1000)
                    stats.results[result.result.name] += 1
                    advance()
        finally:
            stats.wall_s = time.perf_counter() - started
            journal.close()
            virtual.remove()
            daemon.stop()
    return stats


def _wait_for_card(reader: PcscReader, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reader.connect().close()
            return
        except CardError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[], None]]:

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), console=console) as p:
        task = p.add_task(label, total=total)
        yield lambda: p.advance(task)


def agent_stats_table(title: str, stats: AgentStats) -> Table:
    table = Table(title=title)
    for column in (
        "swipes",
        "rate /s",
        "p50 ms",
        "p99 ms",
        "card read p50 ms",
        "card read p99 ms",
        "card read share",
    ):
        table.add_column(column, justify="right")
    n = len(stats.total_ms)
    table.add_row(
        f"{n:,}",
        f"{n / stats.wall_s:,.0f}" if stats.wall_s else "-",
        f"{stats.percentile(stats.total_ms, 0.5):.2f}",
        f"{stats.percentile(stats.total_ms, 0.99):.2f}",
        f"{stats.percentile(stats.card_ms, 0.5):.2f}",
        f"{stats.percentile(stats.card_ms, 0.99):.2f}",
        f"{stats.card_share:.0%}",
    )
    return table


@agent_app.command("bench")
def bench_cmd(
    swipes: Annotated[
        int, typer.Option(min=1, max=100_000, help="swipes, one after another")
    ] = 1000,
    persons: PersonsOpt = 1000,
    seed: SeedOpt = 2026,
) -> None:
    """Swipe latency seen by the agent, card read included: p50/p99 over N sequential
    swipes of seeded cards (virtual cards in a private pcscd), and the card read's share.
    Run `medclear seed` with the same --persons/--seed first."""
    access = stack_access()
    stats = run_agent_traffic(access, persons, seed, swipes, "agent swipes")
    console.print(agent_stats_table(f"{swipes:,} agent swipes (card read included)", stats))
    console.print(result_codes_table(stats.results))


if __name__ == "__main__":
    agent_app(prog_name="python -m medclear.cli.agent")
