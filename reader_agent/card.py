"""A 社保卡 chip: its personalised contents (`CardImage`) and the SSSE application that
answers command APDUs (`SsseApplet`). Pure: no sockets, no clock; the emulator puts it
behind vpcd, the unit tests call it directly.

The applet: SELECT by AID and by EF, READ RECORD (answered `<tag> <len> <value>`), and
INTERNAL AUTHENTICATE with the card's own counter, counted up before every cryptogram.
Status words other than 9000:

    6A82     unknown AID or file
    6A83     unknown record
    6C<len>  Le too short (SW2 is the record's exact length)
    6986     READ RECORD with no EF selected
    6985     INTERNAL AUTHENTICATE before SELECT (or the counter worn out)
    6A80     bad INTERNAL AUTHENTICATE data
    6A86     wrong P1/P2
    6700     wrong length
    6D00     unknown INS
    6E00     unknown CLA
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hsm_sim import crypto
from hsm_sim.crypto import KeyAlgorithm
from reader_agent import apdu
from reader_agent.apdu import Command, MalformedApdu

NO_EXPIRY = "00000000"
COUNTER_MAX = 2**32 - 1


@dataclass(frozen=True)
class CardImage:
    """What personalisation writes into a card: EF05, EF06 and the card's own key."""

    card_no: str  # EF05 07
    card_id: str  # EF05 01: 32 hex digits (16 bytes)
    issue_date: str  # EF05 05: YYYYMMDD
    expiry_date: str  # EF05 06: YYYYMMDD, NO_EXPIRY for a social security card
    ssn: str  # EF06 08
    name: str  # EF06 09
    sex: str  # EF06 0A: "1" male, "2" female
    ethnicity: int  # EF06 0B: GB 3304 code (1 = 汉)
    birthplace: str  # EF06 0C: 6-digit region code
    birth_date: str  # EF06 0D: YYYYMMDD
    key_algorithm: int  # KeyAlgorithm of the card key
    card_key: str  # hex; derived from the card master key in the HSM, never leaves the card
    counter: int = 0  # application transaction counter: +1 before every cryptogram

    def records(self) -> dict[int, dict[int, bytes]]:
        """The EF05 and EF06 record values, each exactly `apdu.RECORD_BYTES` long."""
        name = self.name.encode("gbk")
        if len(name) > apdu.RECORD_BYTES[apdu.TAG_NAME]:
            raise ValueError("name longer than 30 bytes (GBK)")
        values = {
            apdu.EF05: {
                apdu.TAG_CARD_ID: bytes.fromhex(self.card_id),
                apdu.TAG_ISSUE_DATE: apdu.bcd(self.issue_date),
                apdu.TAG_EXPIRY_DATE: apdu.bcd(self.expiry_date),
                apdu.TAG_CARD_NO: self.card_no.encode("ascii"),
            },
            apdu.EF06: {
                apdu.TAG_SSN: self.ssn.encode("ascii"),
                apdu.TAG_NAME: name.ljust(apdu.RECORD_BYTES[apdu.TAG_NAME], b"\0"),
                apdu.TAG_SEX: self.sex.encode("ascii"),
                apdu.TAG_ETHNICITY: bytes((self.ethnicity,)),
                apdu.TAG_BIRTHPLACE: apdu.bcd(self.birthplace),
                apdu.TAG_BIRTH_DATE: apdu.bcd(self.birth_date),
            },
        }
        for records in values.values():
            for tag, value in records.items():
                if len(value) != apdu.RECORD_BYTES[tag]:
                    raise ValueError(f"record {tag:02X} must be {apdu.RECORD_BYTES[tag]} bytes")
        return values

    def save(self, path: Path) -> None:
        """Owner-only: the file holds the card key (it stands in for the chip)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: Path) -> CardImage:
        return cls(**json.loads(path.read_text()))


class SsseApplet:
    """The card's answers: SELECT (SSSE by AID, EF05/EF06), READ RECORD, INTERNAL
    AUTHENTICATE. Everything else gets the ISO 7816-4 status word that says why."""

    def __init__(self, image: CardImage) -> None:
        self.image = image
        self._records = image.records()
        self._app_selected = False
        self._ef: int | None = None

    def reset(self) -> None:
        """Power-on or reset: nothing selected."""
        self._app_selected = False
        self._ef = None

    def process(self, raw: bytes) -> bytes:
        """One command APDU → response APDU (data || SW1 SW2)."""
        try:
            command = apdu.parse(raw)
        except MalformedApdu:
            return _sw(apdu.SW_WRONG_LENGTH)
        if command.cla != apdu.CLA:
            return _sw(apdu.SW_CLA_NOT_SUPPORTED)
        if command.ins == apdu.INS_SELECT:
            return self._select(command)
        if command.ins == apdu.INS_READ_RECORD:
            return self._read_record(command)
        if command.ins == apdu.INS_INTERNAL_AUTHENTICATE:
            return self._authenticate(command)
        return _sw(apdu.SW_INS_NOT_SUPPORTED)

    def _select(self, c: Command) -> bytes:
        if c.p2 not in (0x00, 0x0C):
            return _sw(apdu.SW_WRONG_P1P2)
        if c.p1 == apdu.SELECT_BY_NAME:
            if not c.data:
                return _sw(apdu.SW_WRONG_LENGTH)
            if c.data != apdu.SSSE_AID:
                return _sw(apdu.SW_FILE_NOT_FOUND)
            self._app_selected, self._ef = True, None
            return _sw(apdu.SW_OK)
        if c.p1 == apdu.SELECT_EF:
            if len(c.data) != 2:
                return _sw(apdu.SW_WRONG_LENGTH)
            file_id = int.from_bytes(c.data, "big")
            if not self._app_selected or file_id not in self._records:
                return _sw(apdu.SW_FILE_NOT_FOUND)
            self._ef = file_id
            return _sw(apdu.SW_OK)
        return _sw(apdu.SW_WRONG_P1P2)

    def _read_record(self, c: Command) -> bytes:
        if c.data:
            return _sw(apdu.SW_WRONG_LENGTH)
        if c.p2 != 0x00:
            return _sw(apdu.SW_WRONG_P1P2)
        if self._ef is None:
            return _sw(apdu.SW_NO_CURRENT_EF)
        value = self._records[self._ef].get(c.p1)
        if value is None:
            return _sw(apdu.SW_RECORD_NOT_FOUND)
        record = bytes((c.p1, len(value))) + value
        if c.le is not None and c.le != 0 and c.le < len(record):
            return _sw(0x6C00 | len(record))  # wrong Le: SW2 says the exact length
        return record + _sw(apdu.SW_OK)

    def _authenticate(self, c: Command) -> bytes:
        if c.p1 != 0x00 or c.p2 != 0x00:
            return _sw(apdu.SW_WRONG_P1P2)
        if not self._app_selected:
            return _sw(apdu.SW_CONDITIONS_NOT_SATISFIED)
        if not c.data:
            return _sw(apdu.SW_WRONG_LENGTH)
        try:
            challenge, amount_fen, terminal_id = apdu.parse_authenticate_data(c.data)
        except (ValueError, UnicodeDecodeError):
            return _sw(apdu.SW_WRONG_DATA)
        if self.image.counter >= COUNTER_MAX:
            return _sw(apdu.SW_CONDITIONS_NOT_SATISFIED)  # the card has worn out its counter
        counter = self.image.counter + 1
        self.image = replace(self.image, counter=counter)
        cryptogram = crypto.card_cryptogram(
            KeyAlgorithm(self.image.key_algorithm),
            bytes.fromhex(self.image.card_key),
            challenge,
            amount_fen,
            terminal_id,
            counter,
        )
        return counter.to_bytes(apdu.COUNTER_BYTES, "big") + cryptogram + _sw(apdu.SW_OK)


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")
