"""The POS reader agent against virtual 社保卡 cards in real pcscd (vsmartcard-vpcd), and
the whole secured stack behind it: the card is read through PC/SC, its cryptogram is
verified by the HSM, the PIN block and the MAC by the gateway and the worker."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console

from clearing.codes import InstitutionType, InsuranceCategory, ResultCode
from medclear import stack
from medclear.cli.agent import StackAccess
from medclear.infra.pki import Role
from medclear.infra.rpc import sync_channel
from medclear.infra.settings import Settings
from medclear.infra.terminals import Keyring
from medclear.sim import traffic
from medclear.sim.city import Resident, make_ssn
from medclear.v1 import common_pb2, pos_pb2_grpc, registry_pb2, registry_pb2_grpc
from reader_agent import apdu
from reader_agent.agent import Agent, Terminal
from reader_agent.card import CardImage
from reader_agent.emulator import VirtualCard
from reader_agent.events import ReaderEvents
from reader_agent.journal import Journal
from reader_agent.pcscd import PcscdUnavailable, PrivatePcscd
from reader_agent.personalise import Personaliser, clone_of
from reader_agent.pinpad import ScriptedPinPad
from reader_agent.reader import CardRemoved, PcscReader

pytestmark = [pytest.mark.stack, pytest.mark.kafka, pytest.mark.pcsc, pytest.mark.timeout(120)]
HOSPITAL = "310101H00001"
TERMINAL = "AGT1"
WRONG_PIN = "999999"
_rng = random.Random(55)
RESIDENTS = [
    Resident(
        make_ssn(_rng, 900 + i),
        name,
        InsuranceCategory.EMPLOYEE,
        "13900000000",
        f"RDR00000{i}",
        500_00,
        f"{246800 + i:06d}",
    )
    for i, name in enumerate(("王小明", "李芳", "张伟", "陈静"))
]
PAYER, LOSER, CLONED, CRASHER = RESIDENTS


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePcscd]:
    try:
        daemon = PrivatePcscd(tmp_path_factory.mktemp("pcscd")).start()
    except PcscdUnavailable as exc:
        pytest.skip(f"pcscd with vpcd cannot run here: {exc}")
    daemon.activate()
    try:
        yield daemon
    finally:
        daemon.stop()


@dataclass
class World:
    access: StackAccess
    keyring: Keyring
    images: dict[str, CardImage]
    journals: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("agent")
    settings = Settings(
        state_dir=base / ".medclear",
        command_partitions=2,
        event_partitions=2,
        terminal_security=True,
    )
    console = Console(stderr=True)
    try:
        endpoints = stack.up(settings, console)
        pki = stack.client_pki_dir(settings)
        keyring = Keyring(settings.state_dir / "terminals" / "keyring.json")
        asyncio.run(keyring.provision(endpoints.hsm, [traffic.SEED_WINDOW, TERMINAL], pki))
        asyncio.run(traffic.seed(endpoints.registry, RESIDENTS, 4, lambda _r: None, keyring, pki))
        access = StackAccess(
            settings, endpoints.gateway, endpoints.registry, endpoints.hsm, pki, True
        )
        perso = Personaliser(access.hsm, access.registry, pki, access.cards_dir)
        images = {r.card_no: asyncio.run(perso.personalise(r.ssn, r.card_no)) for r in RESIDENTS}
        yield World(access, keyring, images, base / "journals")
    finally:
        stack.down(settings, console, wipe=True)


@contextmanager
def card_in_reader(pcscd: PrivatePcscd, image: CardImage, **kwargs: Any) -> Iterator[VirtualCard]:
    """The card in reader 00 00 for the block; out again, and pcscd knows it, after."""
    virtual = VirtualCard(image, port=pcscd.port, **kwargs).insert()
    pcscd.wait_card(pcscd.readers[0], present=True)
    try:
        yield virtual
    finally:
        virtual.remove()
        pcscd.wait_card(pcscd.readers[0], present=False)


class _Stub:
    """The real PosService stub, except that the first Authorize reply can be lost after
    the gateway decided it, and the first Reverse calls can fail (a dead link)."""

    def __init__(self, real: Any, lose_reply: bool = False, failing_reverses: int = 0) -> None:
        self.real, self.lose_reply, self.failing_reverses = real, lose_reply, failing_reverses

    def Authorize(self, request: Any, timeout: float) -> Any:
        reply = self.real.Authorize(request, timeout=timeout)
        if self.lose_reply:
            self.lose_reply = False
            raise _Lost()
        return reply

    def Reverse(self, request: Any, timeout: float) -> Any:
        if self.failing_reverses:
            self.failing_reverses -= 1
            raise _Lost(grpc.StatusCode.UNAVAILABLE)
        return self.real.Reverse(request, timeout=timeout)


class _Lost(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.DEADLINE_EXCEEDED) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


@contextmanager
def agent_for(
    world: World, pcscd: PrivatePcscd, pins: list[str], journal: str = "agent", wrap: Any = None
) -> Iterator[Agent]:
    channel = sync_channel(world.access.gateway, Role.TERMINAL, world.access.pki)
    stub: Any = pos_pb2_grpc.PosServiceStub(channel)
    agent = Agent(
        Terminal(TERMINAL, HOSPITAL, InstitutionType.HOSPITAL),
        PcscReader(pcscd.readers[0]),
        ScriptedPinPad(pins),
        Journal(world.journals / f"{journal}.journal"),
        wrap(stub) if wrap else stub,
        world.keyring,
        console=Console(record=True, width=100),
        sleep=lambda _s: None,
    )
    try:
        yield agent
    finally:
        agent.journal.close()
        channel.close()


def balance_of(world: World, r: Resident) -> int:
    with sync_channel(world.access.registry, Role.WINDOW, world.access.pki) as channel:
        view = registry_pb2_grpc.CardRegistryServiceStub(channel).GetPerson(
            registry_pb2.GetPersonRequest(ssn=r.ssn)
        )
    return int(view.balance_fen)


def test_a_swipe_reads_the_card_verifies_it_and_prints_a_receipt(
    world: World, pcscd: PrivatePcscd
) -> None:
    before = balance_of(world, PAYER)
    with (
        card_in_reader(pcscd, world.images[PAYER.card_no]),
        agent_for(world, pcscd, [PAYER.pin]) as agent,
    ):
        result = agent.swipe(12_50)
        receipt = agent.console.export_text() if agent.console else ""
    assert result.result == ResultCode.OK, result.reply
    assert result.card.card_no == PAYER.card_no and result.card.name == PAYER.name
    assert result.reply is not None and result.reply.paid_from_account_fen == 12_50
    assert balance_of(world, PAYER) == before - 12_50
    assert 0 < result.card_seconds < result.total_seconds
    assert "*****0000" in receipt and PAYER.card_no not in receipt
    assert "交易成功" in receipt and "approved" in receipt and "12.50" in receipt
    assert not agent.journal.open


def test_a_wrong_pin_is_declined_with_the_tries_left(world: World, pcscd: PrivatePcscd) -> None:
    with (
        card_in_reader(pcscd, world.images[PAYER.card_no]),
        agent_for(world, pcscd, [WRONG_PIN, PAYER.pin]) as agent,
    ):
        wrong = agent.swipe(1_00)
        right = agent.swipe(1_00)  # resets the count of consecutive wrong PINs
    assert wrong.result == ResultCode.PIN_WRONG
    assert wrong.reply is not None and wrong.reply.pin_tries_remaining == 2
    assert right.result == ResultCode.OK


def test_a_card_reported_lost_is_declined(world: World, pcscd: PrivatePcscd) -> None:
    with sync_channel(world.access.registry, Role.WINDOW, world.access.pki) as channel:
        window = common_pb2.WindowContext(
            window_id="W12333", operator_id="hotline", request_id=f"loss-{time.time_ns()}"
        )
        reply = registry_pb2_grpc.CardRegistryServiceStub(channel).ReportPreLoss(
            registry_pb2.CardRequest(window=window, card_no=LOSER.card_no)
        )
    assert ResultCode(reply.result) == ResultCode.OK
    with (
        card_in_reader(pcscd, world.images[LOSER.card_no]),
        agent_for(world, pcscd, [LOSER.pin]) as agent,
    ):
        result = agent.swipe(5_00)
    assert result.result == ResultCode.CARD_PRE_LOST
    assert balance_of(world, LOSER) == LOSER.opening_balance_fen


def test_a_card_pulled_out_mid_read_is_a_clear_error_and_nothing_is_sent(
    world: World, pcscd: PrivatePcscd
) -> None:
    image = world.images[PAYER.card_no]
    with (
        card_in_reader(pcscd, image, pull_after_apdus=5),
        agent_for(world, pcscd, [PAYER.pin], journal="pulled") as agent,
    ):
        with pytest.raises(CardRemoved, match="card removed during the read"):
            agent.swipe(3_00)
        assert not agent.journal.open and agent.journal.last_trace == 0


def test_a_cloned_card_is_refused(world: World, pcscd: PrivatePcscd) -> None:
    """Same EF05/EF06 as the genuine card, another key: the HSM's check fails."""
    clone = clone_of(world.images[CLONED.card_no])
    with card_in_reader(pcscd, clone), agent_for(world, pcscd, [CLONED.pin]) as agent:
        result = agent.swipe(50_00)
    assert result.result == ResultCode.CRYPTOGRAM_INVALID
    assert result.card.card_no == CLONED.card_no  # it reads like the real one
    assert balance_of(world, CLONED) == CLONED.opening_balance_fen


def test_a_lost_reply_is_reversed_even_after_the_agent_crashes(
    world: World, pcscd: PrivatePcscd
) -> None:
    """The swipe is decided but its reply is lost and the link stays down: the reversal
    stays open in the journal; the next agent process on that journal settles it."""
    before = balance_of(world, CRASHER)
    image = world.images[CRASHER.card_no]
    with card_in_reader(pcscd, image):
        lossy = lambda s: _Stub(s, lose_reply=True, failing_reverses=10)  # noqa: E731
        with agent_for(world, pcscd, [CRASHER.pin], "crash", lossy) as agent:
            result = agent.swipe(20_00)
            assert result.result == ResultCode.TIMEOUT and result.reversal is not None
            assert not result.reversal.acknowledged and len(agent.journal.open) == 1
        assert balance_of(world, CRASHER) == before - 20_00  # the lost swipe did pay
        with agent_for(world, pcscd, [], "crash") as restarted:  # a new process, same journal
            assert len(restarted.journal.open) == 1
            (outcome,) = restarted.settle_reversals()
            assert outcome.acknowledged and outcome.result == ResultCode.OK
            assert not restarted.journal.open
    assert balance_of(world, CRASHER) == before


def test_reader_events_report_insertion_and_removal(world: World, pcscd: PrivatePcscd) -> None:
    events = ReaderEvents().start()
    try:
        with card_in_reader(pcscd, world.images[PAYER.card_no]):
            inserted = events.wait("card inserted", 10)
        removed = events.wait("card removed", 10)
    finally:
        events.stop()
    assert inserted.reader == pcscd.readers[0] and inserted.atr.startswith("3B")
    assert removed.reader == pcscd.readers[0]


@pytest.mark.skipif(shutil.which("opensc-tool") is None, reason="opensc not installed")
def test_opensc_tool_selects_ssse_and_reads_ef05(world: World, pcscd: PrivatePcscd) -> None:
    """A third-party PC/SC client speaks to the virtual card: the standard, not our agent."""
    commands = [
        apdu.select_aid().hex(),
        apdu.select_ef(apdu.EF05).hex(),
        apdu.read_record(apdu.TAG_CARD_NO).hex(),
        "00B2990000",
        "80A4040000",
    ]
    argv = ["opensc-tool", "--reader", pcscd.readers[0]]
    for c in commands:
        argv += ["--send-apdu", c]
    with card_in_reader(pcscd, world.images[PAYER.card_no]):
        out = subprocess.run(
            argv, env=pcscd.env(), capture_output=True, text=True, timeout=30, check=True
        ).stdout
    received = [line for line in out.splitlines() if line.startswith("Received")]
    assert received[:3] == ["Received (SW1=0x90, SW2=0x00)"] * 2 + [
        "Received (SW1=0x90, SW2=0x00):"
    ]
    assert PAYER.card_no in out  # EF05 tag 07 as text in opensc-tool's dump
    assert "SW1=0x6A, SW2=0x83" in received[3]  # no such record
    assert "SW1=0x6E, SW2=0x00" in received[4]  # class not supported
