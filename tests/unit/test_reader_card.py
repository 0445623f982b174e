"""The virtual 社保卡's SSSE application and the agent's reading of it, in process (no
pcscd): records, status words, and cryptograms the HSM's check accepts."""

from __future__ import annotations

import pytest

from hsm_sim import crypto
from hsm_sim.crypto import KeyAlgorithm
from reader_agent import apdu
from reader_agent.card import CardImage, SsseApplet
from reader_agent.personalise import clone_of, image_of
from reader_agent.reader import (
    CardError,
    NotSocialSecurityCard,
    StatusWordError,
    authenticate,
    read_card,
)

MASTER = bytes(range(16))
CARD_NO, SSN = "S26000001", "31010119900101123X"


def image() -> CardImage:
    key = crypto.derive_card_key(KeyAlgorithm.SM4, MASTER, CARD_NO)
    return image_of(CARD_NO, SSN, "欧阳小明", "2026-09-28T10:00:00.000+08:00", "", key)


class InProcess:
    """A Transport straight into the applet."""

    def __init__(self, applet: SsseApplet) -> None:
        self.applet = applet

    def transmit(self, command: bytes) -> tuple[bytes, int]:
        response = self.applet.process(command)
        return response[:-2], int.from_bytes(response[-2:], "big")

    def close(self) -> None:
        pass


def sw(applet: SsseApplet, hex_apdu: str) -> int:
    return int.from_bytes(applet.process(bytes.fromhex(hex_apdu))[-2:], "big")


def test_the_agent_reads_what_personalisation_wrote() -> None:
    card = read_card(InProcess(SsseApplet(image())))
    assert (card.card_no, card.ssn, card.name) == (CARD_NO, SSN, "欧阳小明")
    assert (card.issue_date, card.expiry_date) == ("20260928", "")
    assert (card.sex, card.birth_date, card.birthplace) == ("1", "19900101", "310101")
    assert card.card_id.startswith("310101D156000005") and len(card.card_id) == 32
    assert CARD_NO not in repr(card) and SSN not in repr(card)


def test_cryptograms_verify_under_the_derived_key_and_count_up() -> None:
    transport = InProcess(SsseApplet(image()))
    read_card(transport)
    key = crypto.derive_card_key(KeyAlgorithm.SM4, MASTER, CARD_NO)
    first = authenticate(transport, b"12345678", 12_50, "T1")
    second = authenticate(transport, b"12345678", 12_50, "T1")
    assert (first.counter, second.counter) == (1, 2) and first.cryptogram != second.cryptogram
    assert crypto.verify_card_cryptogram(
        KeyAlgorithm.SM4, key, b"12345678", 12_50, "T1", first.counter, first.cryptogram
    )
    assert not crypto.verify_card_cryptogram(
        KeyAlgorithm.SM4, key, b"12345678", 12_51, "T1", first.counter, first.cryptogram
    )


def test_a_clone_reads_the_same_but_cannot_make_a_valid_cryptogram() -> None:
    clone = InProcess(SsseApplet(clone_of(image())))
    assert read_card(clone) == read_card(InProcess(SsseApplet(image())))
    c = authenticate(clone, b"abcdefgh", 1_00, "T1")
    key = crypto.derive_card_key(KeyAlgorithm.SM4, MASTER, CARD_NO)
    assert not crypto.verify_card_cryptogram(
        KeyAlgorithm.SM4, key, b"abcdefgh", 1_00, "T1", c.counter, c.cryptogram
    )


@pytest.mark.parametrize(
    ("apdus", "expected"),
    [
        (["00A404000F" + "00" * 15], apdu.SW_FILE_NOT_FOUND),  # unknown AID
        (["00A4040000"], apdu.SW_WRONG_LENGTH),  # SELECT by name without a name
        (["00A4020002EF05"], apdu.SW_FILE_NOT_FOUND),  # EF before the application
        ([apdu.select_aid().hex(), "00A4020002EF07"], apdu.SW_FILE_NOT_FOUND),  # needs a PIN
        ([apdu.select_aid().hex(), "00A4020003EF0500"], apdu.SW_WRONG_LENGTH),
        ([apdu.select_aid().hex(), "00B2070000"], apdu.SW_NO_CURRENT_EF),
        ([apdu.select_aid().hex(), "00A4020002EF05", "00B2080000"], apdu.SW_RECORD_NOT_FOUND),
        ([apdu.select_aid().hex(), "00A4020002EF05", "00B2070005"], 0x6C0B),  # Le too short
        ([apdu.select_aid().hex(), "00A4020002EF05", "00B207010B"], apdu.SW_WRONG_P1P2),
        ([apdu.select_aid().hex(), "00B20700020000"], apdu.SW_WRONG_LENGTH),  # data on a read
        (["00880000020102"], apdu.SW_CONDITIONS_NOT_SATISFIED),  # before SELECT
        ([apdu.select_aid().hex(), "00880000020102"], apdu.SW_WRONG_DATA),
        ([apdu.select_aid().hex(), "0088010000"], apdu.SW_WRONG_P1P2),
        (["80A4040000"], apdu.SW_CLA_NOT_SUPPORTED),
        (["00CA000000"], apdu.SW_INS_NOT_SUPPORTED),
        (["00A4"], apdu.SW_WRONG_LENGTH),
        (["00A404000F7378"], apdu.SW_WRONG_LENGTH),  # Lc says 15, 2 bytes came
        (["00A4080000"], apdu.SW_WRONG_P1P2),
    ],
)
def test_status_words(apdus: list[str], expected: int) -> None:
    applet = SsseApplet(image())
    *setup, last = apdus
    for command in setup:
        assert sw(applet, command) == apdu.SW_OK
    assert sw(applet, last) == expected


def test_le_zero_or_exact_returns_the_whole_record() -> None:
    applet = SsseApplet(image())
    sw(applet, apdu.select_aid().hex())
    sw(applet, "00A4020002EF05")
    assert (
        applet.process(bytes.fromhex("00B2070000")) == b"\x07\x09" + CARD_NO.encode() + b"\x90\x00"
    )
    assert applet.process(apdu.read_record(apdu.TAG_CARD_NO))[-2:] == b"\x90\x00"


def test_reset_deselects() -> None:
    applet = SsseApplet(image())
    sw(applet, apdu.select_aid().hex())
    applet.reset()
    assert sw(applet, "00A4020002EF05") == apdu.SW_FILE_NOT_FOUND


class Scripted:
    def __init__(self, answers: dict[bytes, bytes]) -> None:
        self.answers = answers

    def transmit(self, command: bytes) -> tuple[bytes, int]:
        response = self.answers.get(command, b"\x6d\x00")
        return response[:-2], int.from_bytes(response[-2:], "big")

    def close(self) -> None:
        pass


def test_every_non_9000_answer_is_a_clear_error() -> None:
    with pytest.raises(NotSocialSecurityCard, match="no SSSE application"):
        read_card(Scripted({apdu.select_aid(): b"\x6a\x82"}))
    with pytest.raises(StatusWordError, match="SELECT EF05: card answered 6982 security"):
        read_card(
            Scripted({apdu.select_aid(): b"\x90\x00", apdu.select_ef(apdu.EF05): b"\x69\x82"})
        )
    with pytest.raises(StatusWordError, match="READ RECORD 01: card answered 6D00 instruction"):
        read_card(
            Scripted({apdu.select_aid(): b"\x90\x00", apdu.select_ef(apdu.EF05): b"\x90\x00"})
        )
    malformed = {
        apdu.select_aid(): b"\x90\x00",
        apdu.select_ef(apdu.EF05): b"\x90\x00",
        apdu.read_record(apdu.TAG_CARD_ID): b"\x01\x02ab\x90\x00",
    }
    with pytest.raises(CardError, match="malformed record"):
        read_card(Scripted(malformed))
    assert apdu.describe_sw(0x6C0B) == "6C0B wrong Le: the card has 11 bytes"
    assert apdu.describe_sw(0x6F00) == "6F00 unknown status"


def test_apdu_parsing_cases() -> None:
    assert apdu.parse(bytes.fromhex("00A40400")) == apdu.Command(0, 0xA4, 4, 0)
    assert apdu.parse(bytes.fromhex("00B2070000")).le == 0
    c = apdu.parse(bytes.fromhex("0088000002AABB00"))
    assert (c.data, c.le) == (b"\xaa\xbb", 0)
    with pytest.raises(apdu.MalformedApdu):
        apdu.parse(bytes.fromhex("00A4040000AABB"))  # extended length
    assert apdu.parse_authenticate_data(apdu.authenticate_data(b"xy", 7, "终端1")) == (
        b"xy",
        7,
        "终端1",
    )
