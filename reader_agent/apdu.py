"""The 社保卡 command set as the agent and the virtual card both speak it (DOMAIN.md
"On the card"), with the status words and what each means.

Commands (CLA 00):
    SELECT application   00 A4 04 00 0F <AID "sx1.sh.社会保障">
    SELECT file          00 A4 02 00 02 EF05 | EF06
    READ RECORD          00 B2 <tag> 00 <Le>  -> <tag> <len> <value>
    INTERNAL AUTHENTICATE 00 88 00 00 <Lc> <data> 00 -> counter (4) || cryptogram (8)
        data = len(challenge) || challenge || amount_fen (8, big endian)
               || len(terminal id) || terminal id (UTF-8)

The cryptogram is the one `hsm_sim.crypto.card_cryptogram` defines, under the card's
own key derived from the card master key; the card counts up before each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from reader_agent.errors import ReaderAgentError

SSSE_AID: Final = bytes.fromhex("7378312E73682EC9E7BBE1B1A3D5CF")
CLA: Final = 0x00
INS_SELECT: Final = 0xA4
INS_READ_RECORD: Final = 0xB2
INS_INTERNAL_AUTHENTICATE: Final = 0x88
SELECT_BY_NAME: Final = 0x04  # P1: select a DF by its application identifier
SELECT_EF: Final = 0x02  # P1: select an EF under the current DF
EF05: Final = 0xEF05  # card identification
EF06: Final = 0xEF06  # holder

# EF05 record tags
TAG_CARD_ID: Final = 0x01  # card identification code, 16 bytes
TAG_ISSUE_DATE: Final = 0x05  # YYYYMMDD, 4 bytes BCD
TAG_EXPIRY_DATE: Final = 0x06  # YYYYMMDD, 4 bytes BCD; 00000000: no expiry
TAG_CARD_NO: Final = 0x07  # 9 ASCII characters
# EF06 record tags
TAG_SSN: Final = 0x08  # 18 ASCII characters
TAG_NAME: Final = 0x09  # 30 bytes GBK, zero padded
TAG_SEX: Final = 0x0A  # "1" male, "2" female (ASCII)
TAG_ETHNICITY: Final = 0x0B  # GB 3304 code, 1 byte
TAG_BIRTHPLACE: Final = 0x0C  # region code, 3 bytes BCD
TAG_BIRTH_DATE: Final = 0x0D  # YYYYMMDD, 4 bytes BCD

RECORD_BYTES: Final[dict[int, int]] = {
    TAG_CARD_ID: 16,
    TAG_ISSUE_DATE: 4,
    TAG_EXPIRY_DATE: 4,
    TAG_CARD_NO: 9,
    TAG_SSN: 18,
    TAG_NAME: 30,
    TAG_SEX: 1,
    TAG_ETHNICITY: 1,
    TAG_BIRTHPLACE: 3,
    TAG_BIRTH_DATE: 4,
}
EF05_TAGS: Final = (TAG_CARD_ID, TAG_ISSUE_DATE, TAG_EXPIRY_DATE, TAG_CARD_NO)
EF06_TAGS: Final = (TAG_SSN, TAG_NAME, TAG_SEX, TAG_ETHNICITY, TAG_BIRTHPLACE, TAG_BIRTH_DATE)
COUNTER_BYTES: Final = 4
CRYPTOGRAM_BYTES: Final = 8
CHALLENGE_BYTES: Final = 8  # what the agent sends (the card takes 1..255)

SW_OK: Final = 0x9000
SW_WRONG_LENGTH: Final = 0x6700
SW_SECURITY_NOT_SATISFIED: Final = 0x6982
SW_CONDITIONS_NOT_SATISFIED: Final = 0x6985
SW_NO_CURRENT_EF: Final = 0x6986
SW_WRONG_DATA: Final = 0x6A80
SW_FUNCTION_NOT_SUPPORTED: Final = 0x6A81
SW_FILE_NOT_FOUND: Final = 0x6A82
SW_RECORD_NOT_FOUND: Final = 0x6A83
SW_WRONG_P1P2: Final = 0x6A86
SW_INS_NOT_SUPPORTED: Final = 0x6D00
SW_CLA_NOT_SUPPORTED: Final = 0x6E00

STATUS_MESSAGES: Final[dict[int, str]] = {
    SW_OK: "success",
    SW_WRONG_LENGTH: "wrong length (Lc/Le)",
    SW_SECURITY_NOT_SATISFIED: "security status not satisfied (PIN needed)",
    SW_CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SW_NO_CURRENT_EF: "command not allowed: no file selected",
    SW_WRONG_DATA: "incorrect data field",
    SW_FUNCTION_NOT_SUPPORTED: "function not supported",
    SW_FILE_NOT_FOUND: "file or application not found",
    SW_RECORD_NOT_FOUND: "record not found",
    SW_WRONG_P1P2: "incorrect P1/P2",
    SW_INS_NOT_SUPPORTED: "instruction not supported",
    SW_CLA_NOT_SUPPORTED: "class not supported",
}


def describe_sw(sw: int) -> str:
    """A status word in words: '6A82 file or application not found'."""
    if sw & 0xFF00 == 0x6C00:
        text = f"wrong Le: the card has {sw & 0xFF} bytes"
    elif sw & 0xFF00 == 0x6100:
        text = f"{sw & 0xFF} more bytes available (GET RESPONSE)"
    else:
        text = STATUS_MESSAGES.get(sw, "unknown status")
    return f"{sw:04X} {text}"


@dataclass(frozen=True)
class Command:
    """A parsed short command APDU (ISO 7816-4 cases 1 to 4)."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None  # None: no Le; 0 means 256

    def to_bytes(self) -> bytes:
        out = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            out += bytes((len(self.data),)) + self.data
        if self.le is not None:
            out += bytes((self.le & 0xFF,))
        return out


class MalformedApdu(ReaderAgentError, ValueError):
    """The bytes are not a short APDU: answered 6700."""


def parse(apdu: bytes) -> Command:
    """Short APDUs only (extended length is not used by the 社保卡 commands)."""
    if len(apdu) < 4:
        raise MalformedApdu("an APDU has at least 4 bytes")
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if not body:
        return Command(cla, ins, p1, p2)
    if len(body) == 1:
        return Command(cla, ins, p1, p2, le=body[0])
    lc = body[0]
    if lc == 0:
        raise MalformedApdu("extended-length APDUs are not supported")
    if len(body) == 1 + lc:
        return Command(cla, ins, p1, p2, data=bytes(body[1:]))
    if len(body) == 2 + lc:
        return Command(cla, ins, p1, p2, data=bytes(body[1:-1]), le=body[-1])
    raise MalformedApdu(f"Lc {lc} does not match {len(body) - 1} bytes of data")


def select_aid(aid: bytes = SSSE_AID) -> bytes:
    return Command(CLA, INS_SELECT, SELECT_BY_NAME, 0x00, aid).to_bytes()


def select_ef(file_id: int) -> bytes:
    return Command(CLA, INS_SELECT, SELECT_EF, 0x00, file_id.to_bytes(2, "big")).to_bytes()


def read_record(tag: int) -> bytes:
    return Command(CLA, INS_READ_RECORD, tag, 0x00, le=RECORD_BYTES[tag] + 2).to_bytes()


def authenticate_data(challenge: bytes, amount_fen: int, terminal_id: str) -> bytes:
    terminal = terminal_id.encode("utf-8")
    if not 1 <= len(challenge) <= 255 or not 1 <= len(terminal) <= 255:
        raise ValueError("challenge and terminal id are 1..255 bytes")
    if not 0 <= amount_fen < 2**63:
        raise ValueError("amount must be 0 .. 2**63-1 fen")
    return (
        bytes((len(challenge),))
        + challenge
        + amount_fen.to_bytes(8, "big")
        + bytes((len(terminal),))
        + terminal
    )


def parse_authenticate_data(data: bytes) -> tuple[bytes, int, str]:
    """(challenge, amount_fen, terminal_id); ValueError if malformed."""
    if not data:
        raise ValueError("empty")
    n = data[0]
    if n == 0 or len(data) < 1 + n + 8 + 1:
        raise ValueError("challenge")
    challenge = data[1 : 1 + n]
    amount_fen = int.from_bytes(data[1 + n : 9 + n], "big")
    t = data[9 + n]
    terminal = data[10 + n :]
    if t == 0 or len(terminal) != t or amount_fen >= 2**63:
        raise ValueError("terminal id")
    return challenge, amount_fen, terminal.decode("utf-8")


def internal_authenticate(challenge: bytes, amount_fen: int, terminal_id: str) -> bytes:
    data = authenticate_data(challenge, amount_fen, terminal_id)
    return Command(CLA, INS_INTERNAL_AUTHENTICATE, 0x00, 0x00, data, le=0).to_bytes()


def bcd(digits: str) -> bytes:
    if len(digits) % 2 or not digits.isdigit():
        raise ValueError(f"BCD needs an even number of digits: {digits!r}")
    return bytes.fromhex(digits)


def unbcd(data: bytes) -> str:
    text = data.hex()
    if not text.isdigit():
        raise ValueError(f"not BCD: {text}")
    return text
