"""Field checks for commands: small pure functions returning True when a value is well formed."""

from __future__ import annotations

import re

from clearing.limits import (
    AMOUNT_FEN_MAX,
    CARD_NO_CHARS,
    ID_CHARS_MAX,
    NAME_CHARS_MAX,
    PHONE_CHARS,
    PVV_BYTES,
    SSN_CHARS,
)

_SSN_RE = re.compile(r"^[0-9]{17}[0-9X]$")
_CARD_RE = re.compile(rf"^[A-Z0-9]{{{CARD_NO_CHARS}}}$")
_ID_RE = re.compile(rf"^[A-Za-z0-9._:/-]{{1,{ID_CHARS_MAX}}}$")
_PHONE_RE = re.compile(rf"^(1[3-9][0-9]{{{PHONE_CHARS - 2}}})?$")
_PVV_RE = re.compile(rf"^([0-9a-f]{{{2 * PVV_BYTES}}})?$")
_SSN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_SSN_CHECK = "10X98765432"


def ssn_check_char(first17: str) -> str:
    """GB 11643 check character (ISO 7064 MOD 11-2) of a citizen id's first 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _SSN_WEIGHTS, strict=True))
    return _SSN_CHECK[total % 11]


def is_ssn(value: str) -> bool:
    return (
        len(value) == SSN_CHARS
        and _SSN_RE.match(value) is not None
        and ssn_check_char(value[:17]) == value[17]
    )


def is_card_no(value: str) -> bool:
    return _CARD_RE.match(value) is not None


def is_id(value: str) -> bool:
    """Request ids, institution ids, source ids: short, printable, no spaces."""
    return _ID_RE.match(value) is not None


def is_pvv(value: str) -> bool:
    """A PIN verification value from the HSM, as lowercase hex; "" for none."""
    return _PVV_RE.match(value) is not None


def is_amount_fen(value: int) -> bool:
    return 0 < value <= AMOUNT_FEN_MAX


def is_name(value: str) -> bool:
    return 0 < len(value) <= NAME_CHARS_MAX and value.strip() == value


def is_phone(value: str) -> bool:
    return _PHONE_RE.match(value) is not None


def mask_ssn(ssn: str) -> str:
    """Keeps the region (6) and the last 4: 110105********123X."""
    return ssn[:6] + "*" * max(0, len(ssn) - 10) + ssn[-4:] if len(ssn) > 10 else "*" * len(ssn)


def mask_card(card_no: str) -> str:
    """Keeps the last 4: *****5678."""
    return "*" * max(0, len(card_no) - 4) + card_no[-4:]


def mask_phone(phone: str) -> str:
    """Keeps the first 3 and last 4: 138****5678."""
    return phone[:3] + "****" + phone[-4:] if len(phone) == 11 else "*" * len(phone)


def mask_name(name: str) -> str:
    """Keeps the family name (first character): 张**."""
    return name[:1] + "*" * max(0, len(name) - 1)
