"""The agent's journal and reversal logic, with the card in process and a stand-in
gateway: what happens when no decision arrives, and after a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console

from clearing.codes import InstitutionType, ResultCode
from hsm_sim import crypto
from hsm_sim.crypto import KeyAlgorithm
from medclear.infra.terminals import Keyring
from medclear.v1 import pos_pb2
from reader_agent import journal as journal_module
from reader_agent.agent import Agent, Terminal
from reader_agent.card import SsseApplet
from reader_agent.journal import Journal, JournalFull
from reader_agent.personalise import image_of
from reader_agent.pinpad import PinEntryCancelled, ScriptedPinPad
from reader_agent.receipt import Receipt, mask_name, render

CARD_NO, SSN = "S26000001", "31010119900101123X"
KEY = crypto.derive_card_key(KeyAlgorithm.SM4, bytes(16), CARD_NO)


class InProcess:
    def __init__(self) -> None:
        self.applet = SsseApplet(image_of(CARD_NO, SSN, "王小明", "2026-01-01", "", KEY))

    def connect(self) -> InProcess:
        return self

    def transmit(self, command: bytes) -> tuple[bytes, int]:
        r = self.applet.process(command)
        return r[:-2], int.from_bytes(r[-2:], "big")

    def close(self) -> None:
        pass


class Lost(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED


class Gateway:
    """Answers as told; records what it got; MACs its reversal replies under `keyring`."""

    def __init__(
        self, authorize: Any = None, reverse_fails: int = 0, keyring: Keyring | None = None
    ) -> None:
        self.authorize = authorize
        self.reverse_fails = reverse_fails
        self.keyring = keyring
        self.requests: list[Any] = []

    def Authorize(self, request: Any, timeout: float) -> Any:
        self.requests.append(request)
        if self.authorize is None:
            raise Lost()
        return self.authorize

    def Reverse(self, request: Any, timeout: float) -> Any:
        self.requests.append(request)
        if self.reverse_fails:
            self.reverse_fails -= 1
            raise Lost()
        reply = pos_pb2.ReverseReply(result=int(ResultCode.OK))  # type: ignore[arg-type]
        return self.keyring.sign("T1", reply) if self.keyring else reply


def agent(
    tmp_path: Path, gateway: Gateway, pins: list[str] | None = None, keyring: Keyring | None = None
) -> Agent:
    terminal = Terminal("T1", "310101H00001", InstitutionType.HOSPITAL)
    return Agent(
        terminal,
        InProcess(),
        ScriptedPinPad(pins or ["123456"]),
        Journal(tmp_path / "j.journal"),
        gateway,
        keyring,
        console=Console(record=True, width=100),
        sleep=lambda _s: None,
    )


def test_a_reply_without_the_gateways_mac_is_no_answer_and_the_swipe_is_reversed(
    tmp_path: Path,
) -> None:
    keyring = Keyring(tmp_path / "keyring.json")
    keyring.keys["T1"] = {"tpk": "11" * 16, "tak": "22" * 16}  # as provisioning leaves them
    approved = pos_pb2.AuthorizeReply(
        result=int(ResultCode.OK),
        request_id="T1:1",  # type: ignore[arg-type]
        paid_from_account_fen=12_50,
    )
    for forged in (b"", b"\0" * 16):  # no MAC at all; a MAC that is not the TAK's
        reply = pos_pb2.AuthorizeReply()
        reply.CopyFrom(approved)
        reply.mac = forged
        gateway = Gateway(reply, keyring=keyring)
        a = agent(tmp_path / forged.hex(), gateway, keyring=keyring)
        result = a.swipe(12_50)
        assert result.result == ResultCode.MAC_INVALID and result.reply is None
        assert result.reversal is not None and result.reversal.acknowledged
        assert not a.journal.open
        assert any(isinstance(r, pos_pb2.ReverseRequest) for r in gateway.requests)
    genuine = keyring.sign("T1", approved)
    a = agent(tmp_path / "genuine", Gateway(genuine, keyring=keyring), keyring=keyring)
    result = a.swipe(12_50)
    assert result.result == ResultCode.OK and result.reversal is None
    tampered = pos_pb2.AuthorizeReply()
    tampered.CopyFrom(genuine)
    tampered.paid_from_account_fen = 1  # changed after the MAC: a man in the middle
    assert not keyring.reply_is_genuine("T1", tampered)


def test_an_approved_swipe_carries_the_chip_data_and_closes_its_journal_entry(
    tmp_path: Path,
) -> None:
    ok = pos_pb2.AuthorizeReply(
        result=int(ResultCode.OK),
        paid_from_account_fen=12_50,  # type: ignore[arg-type]
        balance_after_fen=87_50,
    )
    gateway = Gateway(ok)
    a = agent(tmp_path, gateway)
    result = a.swipe(12_50)
    (request,) = gateway.requests
    assert (request.card_no, request.ssn, request.amount_fen) == (CARD_NO, SSN, 12_50)
    assert request.card_counter == 1 and len(request.card_cryptogram) == 8
    assert crypto.verify_card_cryptogram(
        KeyAlgorithm.SM4, KEY, request.card_challenge, 12_50, "T1", 1, request.card_cryptogram
    )
    assert result.result == ResultCode.OK and not a.journal.open and result.reversal is None
    text = a.console.export_text() if a.console else ""
    assert "*****0001" in text and CARD_NO not in text and "87.50" in text and "交易成功" in text


def test_no_decision_sends_a_reversal_and_a_crash_keeps_it_open(tmp_path: Path) -> None:
    gateway = Gateway(None, reverse_fails=100)
    a = agent(tmp_path, gateway)
    result = a.swipe(20_00)
    assert result.result == ResultCode.TIMEOUT
    assert result.reversal is not None and not result.reversal.acknowledged
    reversals = [r for r in gateway.requests if isinstance(r, pos_pb2.ReverseRequest)]
    assert len(reversals) == 3 and {r.original_trace_number for r in reversals} == {result.trace}
    assert len({r.terminal.trace_number for r in reversals}) == 1  # one reversal, resent
    a.journal.close()  # the agent dies here
    restarted = agent(tmp_path, Gateway(None))
    (open_swipe,) = restarted.journal.open.values()
    assert (open_swipe.trace, open_swipe.amount_fen) == (result.trace, 20_00)
    assert restarted.journal.next_trace() > open_swipe.reversal_trace  # never reused
    (outcome,) = restarted.settle_reversals()
    assert outcome.acknowledged and not restarted.journal.open
    restarted.journal.close()
    assert not Journal(tmp_path / "j.journal").open


def test_the_gateways_timeout_is_reversed_too(tmp_path: Path) -> None:
    timeout = pos_pb2.AuthorizeReply(result=int(ResultCode.TIMEOUT))  # type: ignore[arg-type]
    a = agent(tmp_path, Gateway(timeout))
    result = a.swipe(1_00)
    assert result.reversal is not None and result.reversal.acknowledged
    assert not a.journal.open


def test_a_cancelled_pin_entry_sends_nothing(tmp_path: Path) -> None:
    gateway = Gateway(None)
    a = agent(tmp_path, gateway)
    a.pinpad = ScriptedPinPad([])
    with pytest.raises(PinEntryCancelled):
        a.swipe(1_00)
    assert not gateway.requests and not a.journal.open


def test_a_terminal_with_too_many_open_reversals_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "OPEN_REVERSALS_MAX", 2)
    j = Journal(tmp_path / "j.journal")
    j.sent(j.next_trace(), CARD_NO, SSN, 1)
    j.sent(j.next_trace(), CARD_NO, SSN, 1)
    with pytest.raises(JournalFull):
        j.sent(j.next_trace(), CARD_NO, SSN, 1)


def test_receipt_masks_and_speaks_both_languages() -> None:
    receipt = Receipt(
        "310101P00001",
        "T1",
        7,
        CARD_NO,
        "王小明",
        30_00,
        20_00,
        10_00,
        0,
        ResultCode.PARTIALLY_APPROVED,
    )
    console = Console(record=True, width=100)
    console.print(render(receipt))
    text = console.export_text()
    assert "*****0001" in text and "王**" in text and "10.00" in text and "20.00" in text
    assert "部分支付" in text and "partial" in text
    assert mask_name("") == ""
