"""Reading a 社保卡 through PC/SC (pyscard): the SSSE application, EF05 and EF06, and
the card's cryptogram. Every status word other than 9000 becomes a `CardError` that
says which step failed and why; a card taken out during the read is `CardRemoved`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

from smartcard.Exceptions import CardConnectionException, NoCardException, SmartcardException
from smartcard.pcsc.PCSCExceptions import BaseSCardException
from smartcard.System import readers

from clearing.validate import mask_card, mask_ssn
from reader_agent import apdu
from reader_agent.errors import ReaderAgentError


class CardError(ReaderAgentError):
    """Root of the reader's errors: the message is for the person at the counter."""


class NoReader(CardError):
    pass


class NoCard(CardError):
    pass


class CardRemoved(CardError):
    pass


class NotSocialSecurityCard(CardError):
    """The card has no SSSE application."""


class StatusWordError(CardError):
    def __init__(self, step: str, sw: int) -> None:
        super().__init__(f"{step}: card answered {apdu.describe_sw(sw)}")
        self.step = step
        self.sw = sw


class Transport(Protocol):
    """One connected card: send a command APDU, get (response data, SW)."""

    def transmit(self, command: bytes) -> tuple[bytes, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CardData:
    """What the agent read from EF05 and EF06."""

    card_no: str
    card_id: str
    issue_date: str
    expiry_date: str  # "" when the card has none
    ssn: str
    name: str
    sex: str
    ethnicity: int
    birthplace: str
    birth_date: str

    def __repr__(self) -> str:  # never a full card or social security number in a log
        return f"CardData(card_no={mask_card(self.card_no)}, ssn={mask_ssn(self.ssn)})"


@dataclass(frozen=True)
class Cryptogram:
    challenge: bytes
    counter: int
    cryptogram: bytes


def _check(step: str, response: tuple[bytes, int]) -> bytes:
    data, sw = response
    if sw != apdu.SW_OK:
        raise StatusWordError(step, sw)
    return data


def _record(transport: Transport, tag: int) -> bytes:
    data = _check(f"READ RECORD {tag:02X}", transport.transmit(apdu.read_record(tag)))
    size = apdu.RECORD_BYTES[tag]
    if len(data) != size + 2 or data[0] != tag or data[1] != size:
        raise CardError(f"READ RECORD {tag:02X}: malformed record ({len(data)} bytes)")
    return data[2:]


def select_ssse(transport: Transport) -> None:
    data, sw = transport.transmit(apdu.select_aid())
    if sw in (apdu.SW_FILE_NOT_FOUND, apdu.SW_FUNCTION_NOT_SUPPORTED):
        raise NotSocialSecurityCard(
            f"not a social security card: no SSSE application ({apdu.describe_sw(sw)})"
        )
    _check("SELECT SSSE", (data, sw))


def read_card(transport: Transport) -> CardData:
    """SELECT SSSE, then EF05 and EF06 record by record."""
    select_ssse(transport)
    _check("SELECT EF05", transport.transmit(apdu.select_ef(apdu.EF05)))
    ef05 = {tag: _record(transport, tag) for tag in apdu.EF05_TAGS}
    _check("SELECT EF06", transport.transmit(apdu.select_ef(apdu.EF06)))
    ef06 = {tag: _record(transport, tag) for tag in apdu.EF06_TAGS}
    try:
        expiry = apdu.unbcd(ef05[apdu.TAG_EXPIRY_DATE])
        return CardData(
            card_no=ef05[apdu.TAG_CARD_NO].decode("ascii"),
            card_id=ef05[apdu.TAG_CARD_ID].hex().upper(),
            issue_date=apdu.unbcd(ef05[apdu.TAG_ISSUE_DATE]),
            expiry_date="" if expiry == "00000000" else expiry,
            ssn=ef06[apdu.TAG_SSN].decode("ascii"),
            name=ef06[apdu.TAG_NAME].rstrip(b"\0 ").decode("gbk"),
            sex=ef06[apdu.TAG_SEX].decode("ascii"),
            ethnicity=ef06[apdu.TAG_ETHNICITY][0],
            birthplace=apdu.unbcd(ef06[apdu.TAG_BIRTHPLACE]),
            birth_date=apdu.unbcd(ef06[apdu.TAG_BIRTH_DATE]),
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise CardError(f"unreadable card data: {exc}") from exc


def authenticate(
    transport: Transport, challenge: bytes, amount_fen: int, terminal_id: str
) -> Cryptogram:
    """INTERNAL AUTHENTICATE over the terminal's challenge, the amount and the terminal:
    the card's counter and its 8-byte cryptogram."""
    command = apdu.internal_authenticate(challenge, amount_fen, terminal_id)
    data = _check("INTERNAL AUTHENTICATE", transport.transmit(command))
    if len(data) != apdu.COUNTER_BYTES + apdu.CRYPTOGRAM_BYTES:
        raise CardError(f"INTERNAL AUTHENTICATE: {len(data)} bytes, expected 12")
    return Cryptogram(challenge, int.from_bytes(data[:4], "big"), data[4:])


# ------------------------------------------------------------------------ PC/SC


class PcscTransport:
    """A pyscard connection to the card in one reader. Transport failures after the
    card was connected mean it was taken out (or the reader went away)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.apdu_seconds = 0.0

    def transmit(self, command: bytes) -> tuple[bytes, int]:

        started = time.perf_counter()
        try:
            data, sw1, sw2 = self._connection.transmit(list(command))
        except CardConnectionException as exc:
            raise CardRemoved(f"card removed during the read ({exc})") from exc
        finally:
            self.apdu_seconds += time.perf_counter() - started
        return bytes(data), (sw1 << 8) | sw2

    def close(self) -> None:

        with contextlib.suppress(CardConnectionException):  # already gone
            self._connection.disconnect()


def reader_names() -> list[str]:

    try:
        return [str(r) for r in readers()]
    except (BaseSCardException, SmartcardException) as exc:
        raise NoReader(f"PC/SC service not available: {exc}") from exc


class PcscReader:
    """One named PC/SC reader."""

    def __init__(self, name: str) -> None:
        self.name = name

    def connect(self) -> PcscTransport:

        found = [r for r in readers() if str(r) == self.name] if reader_names() else []
        if not found:
            raise NoReader(f"reader {self.name!r} not found (readers: {reader_names()})")
        connection = found[0].createConnection()
        try:
            connection.connect()
        except NoCardException as exc:
            raise NoCard(f"no card in {self.name}: insert the social security card") from exc
        except CardConnectionException as exc:
            raise NoCard(f"cannot connect to the card in {self.name}: {exc}") from exc
        return PcscTransport(connection)
